// The C++ CPU backend of fastkd.kd_loss (with a full teacher, and with a sparse one, kd_topk_cpu.h; and of
// feature_loss, feature_loss_cpu.h, and the power iteration of fastkd.lipschitz, power_iteration_cpu.h): the table
// of instruction sets and their kernels (the kd_loss launch arguments are in kd_args.h).
//
// No torch headers: Python passes data pointers, shapes, strides and dtype codes (fastkd/cpu_backend.py), so the
// extension builds in seconds and does not depend on the torch ABI.
#pragma once
#include <cstdint>

#include "feature_loss_cpu.h"
#include "kd_args.h"
#include "kd_topk_cpu.h"
#include "power_iteration_cpu.h"
#include "relational_cpu.h"

namespace fastkd {

using KDKernel = void (*)(const KDArgs&);

// rows[r, :] *= factors[r·factor_stride] for the rows whose factor is not 1 (contiguous rows of `dtype`).
struct ScaleRowsArgs {
    void* rows = nullptr;
    int dtype = kFloat32;
    int64_t num_rows = 0, num_cols = 0;
    const float* factors = nullptr;
    int64_t factor_stride = 1;
    int num_threads = 1;
};

// One compiled instruction set. The kernels are null when the compiler could not target it.
struct CpuIsa {
    const char* name;
    bool (*cpu_supports)();
    KDKernel forward;
    KDKernel backward;
    void (*scale_rows)(const ScaleRowsArgs&);
    void (*power_iteration)(const PowerArgs&);
    void (*feature_forward)(const FeatureArgs&);
    void (*feature_backward)(const FeatureArgs&);
    void (*feature_flat)(const FeatureFlatArgs&);
};

using TopKKernel = void (*)(const TopKArgs&);

// The sparse-teacher kernels of the same instruction set (kd_topk_cpu_impl.h), beside its CpuIsa entry; null when
// the compiler could not target it.
struct CpuTopKIsa {
    TopKKernel forward;
    TopKKernel backward;
};

// The relational kernels of the same instruction set (relational_cpu_impl.h), likewise.
struct CpuRelationalIsa {
    void (*rkd_angle_forward)(const RKDAngleArgs&);
    void (*rkd_angle_backward)(const RKDAngleArgs&);
    void (*bank_gather_dot)(const BankDotArgs&);
    void (*bank_scatter_dot)(const BankDotArgs&);
    void (*bank_score_grad)(const BankDotArgs&);
};

namespace avx512 {
extern const CpuIsa isa;
extern const CpuTopKIsa topk_isa;
extern const CpuRelationalIsa relational_isa;
}  // namespace avx512
namespace avx2 {
extern const CpuIsa isa;
extern const CpuTopKIsa topk_isa;
extern const CpuRelationalIsa relational_isa;
}  // namespace avx2
namespace portable {
extern const CpuIsa isa;
extern const CpuTopKIsa topk_isa;
extern const CpuRelationalIsa relational_isa;
}  // namespace portable

}  // namespace fastkd
