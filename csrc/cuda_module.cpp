// fastkd._C_cuda: the pybind11 binding of the CUDA backend (kd_cuda.cu). The same narrow surface as fastkd._C
// (module.cpp): Python (fastkd/cuda_backend.py) passes data pointers, shapes, strides, dtype codes and the CUDA
// stream as integers in a dict, checked here before any kernel runs; no torch headers, so it builds with nvcc
// alone and does not depend on the torch ABI.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "binding_args.h"
#include "kd_cuda.h"
#include "kd_cuda_row.h"

namespace fastkd {
namespace {

KDArgs cuda_args(const py::dict& d) {
    KDArgs a = common_args(d);
    if (a.divergence != kKL && a.divergence != kReverseKL) {
        throw std::invalid_argument("the CUDA kernels take divergences kl and reverse_kl, got code " +
                                    std::to_string(a.divergence));
    }
    if (a.student.dtype != a.teacher.dtype) {
        throw std::invalid_argument("the CUDA kernels take student and teacher logits of one dtype");
    }
    if (a.num_rows > 0x7fffffff) throw std::invalid_argument("the CUDA kernels take at most 2^31 - 1 rows");
    return a;
}

void raise_if_failed(const std::string& error, const char* what) {
    if (!error.empty()) throw std::runtime_error(std::string("fastkd CUDA kd_loss ") + what + ": " + error);
}

void kd_forward(const py::dict& d) {
    KDArgs a = cuda_args(d);
    a.loss = pointer<float>(d, "loss");
    if (a.num_rows > 0 && a.loss == nullptr) throw std::invalid_argument("null loss pointer");
    void* stream = pointer<void>(d, "stream");
    std::string error;
    {
        py::gil_scoped_release release;
        error = kd_forward_cuda(a, stream);
    }
    raise_if_failed(error, "forward");
}

void kd_backward(const py::dict& d) {
    KDArgs a = cuda_args(d);
    read_backward_args(a, d);
    void* stream = pointer<void>(d, "stream");
    std::string error;
    {
        py::gil_scoped_release release;
        error = kd_backward_cuda(a, stream);
    }
    raise_if_failed(error, "backward");
}

}  // namespace
}  // namespace fastkd

PYBIND11_MODULE(_C_cuda, m) {
    m.doc() = "fastkd's CUDA kernels (kd_loss: kl and reverse_kl with CE); see fastkd/cuda_backend.py";
    m.def("kd_forward", &fastkd::kd_forward, "kd_loss row losses and statistics (arguments in a dict)");
    m.def("kd_backward", &fastkd::kd_backward, "kd_loss gradients (arguments in a dict)");
    m.def("threads_per_row", &fastkd::cuda_row::threads_per_row, "the block size for rows of num_cols entries");
    m.attr("runtime_version") = fastkd::kd_cuda_runtime_version();
    m.attr("archs") = FASTKD_CUDA_ARCHS;  // the compute capabilities with machine code, e.g. "80,90" (cuda_build.py)
}
