// The C++ CPU backend of fastkd.kd_loss with a sparse (TopK) teacher: the arguments of one launch of its kernels
// (kd_topk_cpu_impl.h), as fastkd/cpu_backend.py passes them. No torch headers.
#pragma once
#include <cstdint>

#include "kd_args.h"  // the dtype codes, Rows and the TopKStat slots

namespace fastkd {

constexpr int64_t kEmptySlot = -1;  // the index of an empty slot (fastkd.topk.EMPTY)

struct TopKArgs {
    Rows student;  // (num_rows, num_cols) logits, unit column stride
    Rows values;   // (num_rows, num_slots) the teacher's values, unit column stride
    // (num_rows, num_slots) int32 or int64 indices, unit column stride, row stride in elements; −1: an empty slot
    const void* indices = nullptr;
    bool indices_int32 = false;
    int64_t indices_row_stride = 0;
    int64_t num_rows = 0, num_cols = 0, num_slots = 0;
    const int64_t* labels = nullptr;  // (num_rows,) or null
    int64_t ignore_index = -100;
    float inv_temperature = 1;          // 1/T of the student
    float inv_teacher_temperature = 1;  // 1/T_t of the teacher's log-weights v/T_t
    float ce_weight = 0, kd_scale = 1;
    // the tail, decided per launch as the Triton launcher does (kernels/kd.py _topk_args): bucket: "bucket" or
    // "spread" and num_slots < num_cols; spread: "spread" and num_slots < num_cols
    bool bucket = false, spread = false;
    // forward outputs, float32: loss (num_rows,), stats (kNumStats, num_rows) in the TopKStat slots, and the
    // optional fidelity metrics (kNumMetrics, num_rows), or null
    float* loss = nullptr;
    float* stats = nullptr;
    float* metrics = nullptr;
    // backward: grad_loss (float32, stride in elements, may be 0), stats from either backend's forward, and the
    // student's gradient, contiguous (num_rows, num_cols) in the student's dtype
    const float* grad_loss = nullptr;
    int64_t grad_loss_stride = 1;
    void* grad_student = nullptr;
    int num_threads = 1;
};

}  // namespace fastkd
