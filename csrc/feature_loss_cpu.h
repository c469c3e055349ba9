// The C++ CPU backend of fastkd.feature_loss: the arguments of one launch (see feature_loss_impl.h).
#pragma once
#include <cstdint>

#include "kd_args.h"  // the dtype codes

namespace fastkd {

// The codes of fastkd/kernel_args.py (FeatureKind, FeatureNormalize, FeatureGroup), checked against this header
// by tests/test_kernel_args.py.
enum FeatureKind : int { kKindMSE = 0, kKindL1 = 1, kKindSmoothL1 = 2, kKindCosine = 3 };
enum FeatureNormalize : int {
    kNormalizeNone = 0,
    kNormalizeStandardize = 1,  // (x − mean)/sqrt(var + eps) over the group ("channel" or "sample")
    kNormalizeL2 = 2,           // x/max(‖x‖₂, eps) along the channels
};
// the elements a program (a task here) owns: its normalisation group
enum FeatureGroup : int {
    kGroupChannel = 0,   // one (n, c): the S elements of a channel map
    kGroupPosition = 1,  // one (n, s): the C channels at one position
    kGroupSample = 2,    // one n: all C·S elements of a sample
};

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
    int kind = kKindMSE;               // FeatureKind
    int normalize = kNormalizeNone;    // FeatureNormalize
    int group = kGroupChannel;         // FeatureGroup
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

// feature_loss of contiguous features with no mask, normalisation or margin and an element-wise kind, in one pass
// (feature_flat in feature_loss_impl.h; module.cpp's feature_loss_flat reduces it): the sum of term(s − t) of
// each block of kFeatureFlatBlock elements into block_sums (one thread per block: the same bits for any thread
// count) and, where the gradient pointers are set, grad_scale·∂term/∂s (its negative for t) in the inputs' dtypes.
constexpr int64_t kFeatureFlatBlock = 1 << 14;

struct FeatureFlatArgs {
    const void* student = nullptr;
    const void* teacher = nullptr;
    int student_dtype = kFloat32, teacher_dtype = kFloat32;
    int64_t count = 0;  // elements
    int kind = kKindMSE;  // mse, l1 or smooth_l1
    float beta = 1.0f;
    float grad_scale = 1.0f;
    void* grad_student = nullptr;  // null: not wanted
    void* grad_teacher = nullptr;
    double* block_sums = nullptr;  // ceil(count / kFeatureFlatBlock) of them
    int num_threads = 1;
};

}  // namespace fastkd
