// The C++ CPU backend of fastkd.feature_loss: the arguments of one launch (see feature_loss_impl.h).
#pragma once
#include <cstdint>

#include "kd_args.h"  // the dtype codes

namespace fastkd {

// A strided (N, C, S) view: element (n, c, s) at data + n·stride[0] + c·stride[1] + s·stride[2] (in elements).
struct Strided3 {
    const void* data = nullptr;
    int dtype = 0;
    int64_t stride[3] = {0, 0, 0};
};

struct FeatureArgs {
    Strided3 student, teacher, mask;  // mask.data null: every element present with weight 1
    int64_t num_n = 0, num_c = 0, num_s = 0;
    const float* margin = nullptr;     // (C,) contiguous, or null
    int kind = 0;                      // 0 mse, 1 l1, 2 smooth_l1, 3 cosine (kernels/features.py KIND_CODES)
    int normalize = 0;                 // 0 none, 1 standardise over the group, 2 l2
    int group = 0;                     // 0 (n, c) over S, 1 (n, s) over C, 2 n over C·S
    float beta = 1.0f;
    // forward: per group Σ mask·term and Σ mask, float32
    float* terms = nullptr;
    float* weights = nullptr;
    // backward: scale (one float32: incoming gradient ÷ divisor), gradients written through their strides in
    // their own dtype (data of grad_teacher null: not wanted)
    const float* scale = nullptr;
    Strided3 grad_student, grad_teacher;
    int num_threads = 1;
};

}  // namespace fastkd
