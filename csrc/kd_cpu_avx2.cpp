// fastkd CPU kernels (kd_loss with a full or a sparse teacher, feature_loss, power iteration) for AVX2 (setup.py
// compiles this file with -mavx2 -mfma); empty entries when the compiler did not target it.
#include "kd_cpu.h"
#if defined(__x86_64__) && defined(__AVX2__) && defined(__FMA__)
#define FASTKD_ISA avx2
#define FASTKD_ISA_NAME "avx2"
#define FASTKD_VEC_BYTES 32
#define FASTKD_CPU_SUPPORTS() \
    (__builtin_cpu_init(), __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
#include "kd_cpu_impl.h"
#include "power_iteration_impl.h"
#include "feature_loss_impl.h"
#include "cpu_isa_entry.h"
#include "kd_topk_cpu_impl.h"
#include "relational_cpu_impl.h"
#else
extern const fastkd::CpuIsa fastkd::avx2::isa = {"avx2", nullptr, nullptr, nullptr, nullptr,
                                                    nullptr, nullptr, nullptr, nullptr};
extern const fastkd::CpuTopKIsa fastkd::avx2::topk_isa = {nullptr, nullptr};
extern const fastkd::CpuRelationalIsa fastkd::avx2::relational_isa = {nullptr, nullptr, nullptr, nullptr,
                                                                          nullptr};
#endif
