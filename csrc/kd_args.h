// The arguments of one kd_loss kernel launch, shared by the C++ CPU backend (kd_cpu.h) and the CUDA backend
// (kd_cuda.h): data pointers, shapes, strides and dtype codes, as fastkd/cpu_backend.py and fastkd/cuda_backend.py
// pass them. No torch headers.
#pragma once
#include <cstdint>

namespace fastkd {

// The codes and slots below are the table of fastkd/kernel_args.py (DType, Divergence, Stat, Metric), which the
// Triton kernels read too; tests/test_kernel_args.py checks that this header agrees with it.

// dtype codes of the tensors Python passes; kUInt8 is a mask dtype beside the float ones (bool masks read as uint8)
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kUInt8 = 3 };

enum Divergence : int {
    kKL = 0,         // KL(p_t‖p_s)
    kReverseKL = 1,  // KL(p_s‖p_t)
    kJSD = 2,        // generalized Jensen–Shannon, weight beta
    kCosine = 3,     // 1 − cos(p_s, p_t)
    kDKD = 4,        // decoupled KD (dkd_loss): alpha·TCKD + beta·NCKD, the target class split off
    kTVD = 5,        // total variation distance ½ Σ |p_s − p_t|
};

// Slots of the per-row statistics, laid out (kNumStats, num_rows) float32; a = s/T, b = t/T.
enum Stat : int {
    kStatMaxA = 0,     // max a (dkd: over the non-target classes)
    kStatLogSumA = 1,  // log Σ exp(a − max a) (cosine: log ‖exp(a − max a)‖₂)
    kStatMaxB = 2,     // the same for b
    kStatLogSumB = 3,
    kStatD0 = 4,       // kl, reverse_kl: the divergence; jsd: KL(p_t‖m); cosine: the cosine; dkd: NCKD;
                       // tvd: Σ p_s·sign(p_s − p_t)
    kStatD1 = 5,       // jsd: KL(p_s‖m); dkd: p_t,gt − p_s,gt; tvd: Σ p_t·sign(p_s − p_t); otherwise 0
    kStatMaxS = 6,     // max s and log Σ exp(s − max s), at T = 1 (the CE term)
    kStatLogSumS = 7,
    kNumStats = 8,
};

// The statistics slots of a sparse (TopK) teacher's kernels (kd_topk_cpu.h), in the same (kNumStats, num_rows)
// layout; a = s/T, the rest: the columns outside the row's entries.
enum TopKStat : int {
    kTopKMaxA = 0,         // max a over the row
    kTopKLogSumA = 1,      // log Σ exp(a − max a)
    kTopKLogPTail = 2,     // log p_t of the tail bucket (−inf without one)
    kTopKKL = 3,           // the row's KL
    kTopKMaxS = 4,         // max s and log Σ exp(s − max s), at T = 1 (the CE term)
    kTopKLogSumS = 5,
    kTopKMaxRest = 6,      // max a and log Σ exp(a − max) over the rest (with a bucket)
    kTopKLogSumRest = 7,
};

// Slots of the optional fidelity metrics, laid out (kNumMetrics, num_rows) float32, at T = 1
enum Metric : int {
    kMetricTop1Agreement = 0,  // argmax s = argmax t (1 or 0)
    kMetricPredictiveKL = 1,   // KL(p_t‖p_s)
    kMetricTeacherEntropy = 2,
    kMetricStudentEntropy = 3,
    kNumMetrics = 4,
};

// (num_rows, num_cols) logits with unit column stride and any row stride (in elements).
struct Rows {
    const void* data = nullptr;
    int dtype = kFloat32;
    int64_t row_stride = 0;
};

struct KDArgs {
    Rows student, teacher;
    int64_t num_rows = 0, num_cols = 0;
    const int64_t* labels = nullptr;  // (num_rows,) or null
    int64_t ignore_index = -100;
    int divergence = kKL;
    float inv_temperature = 1, beta = 0.5f, one_minus_beta = 0.5f, log_beta = 0, log_one_minus_beta = 0;
    float ce_weight = 0, kd_scale = 1;
    float alpha = 1;  // dkd: the TCKD weight (beta weighs NCKD)
    // forward outputs: loss (num_rows,), stats (kNumStats, num_rows), float32
    float* loss = nullptr;
    float* stats = nullptr;
    // optional forward output: (kNumMetrics, num_rows) float32 fidelity metrics at T = 1 (kernel_args.py), or null
    float* metrics = nullptr;
    // forward with the gradient (kl and reverse_kl only): when fused_grad_student is set, the forward also writes
    // ∂(grad_scale·Σ row_loss)/∂s there (and ∂/∂t into fused_grad_teacher if set), contiguous, in the input dtype
    void* fused_grad_student = nullptr;
    void* fused_grad_teacher = nullptr;
    float grad_scale = 1;
    // backward: grad_loss (float32, stride in elements, may be 0), stats from the forward, and the gradients,
    // contiguous (num_rows, num_cols) in the dtype of their input; grad_teacher null unless it is wanted
    const float* grad_loss = nullptr;
    int64_t grad_loss_stride = 1;
    void* grad_student = nullptr;
    void* grad_teacher = nullptr;
    int num_threads = 1;  // CPU backend: OpenMP threads
};

}  // namespace fastkd
