// The CUDA backend of fastkd.kd_loss (kd_cuda.cu): launchers for the forward and the backward on a given stream.
//
// A subset of the Triton kernels' options (fastkd.cuda_backend.covers says which; fastkd.dispatch sends the rest
// to Triton):
// divergences "kl" and "reverse_kl" with the hard-label CE term, labels and ignore_index, one teacher of the
// student's dtype (float32, float16 or bfloat16), unit column stride. No fidelity metrics.
#pragma once
#include <string>

#include "kd_args.h"

namespace fastkd {

// Both return an empty string on success, else the CUDA error (the launch is checked, not synchronised).
// forward: loss and stats of `a`; backward: grad_student (and grad_teacher when set) from a.grad_loss and a.stats.
std::string kd_forward_cuda(const KDArgs& a, void* stream);
std::string kd_backward_cuda(const KDArgs& a, void* stream);

// The CUDA runtime version the kernels were built (and statically linked) with, as CUDART_VERSION (13000: 13.0).
int kd_cuda_runtime_version();

}  // namespace fastkd
