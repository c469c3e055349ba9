// fastkd CPU kernels (kd_loss with a full or a sparse teacher, feature_loss, power iteration) for AVX-512 (setup.py
// compiles this file with -mavx512f -mavx512bw -mavx512dq -mavx512vl -mfma); empty entries when the compiler did
// not target it.
#include "kd_cpu.h"
#if defined(__x86_64__) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && \
    defined(__AVX512VL__) && defined(__FMA__)
#define FASTKD_ISA avx512
#define FASTKD_ISA_NAME "avx512"
#define FASTKD_VEC_BYTES 64
#define FASTKD_CPU_SUPPORTS()                                                                             \
    (__builtin_cpu_init(), __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&     \
                               __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") && \
                               __builtin_cpu_supports("fma"))
#include "kd_cpu_impl.h"
#include "power_iteration_impl.h"
#include "feature_loss_impl.h"
#include "cpu_isa_entry.h"
#include "kd_topk_cpu_impl.h"
#include "relational_cpu_impl.h"
#else
extern const fastkd::CpuIsa fastkd::avx512::isa = {"avx512", nullptr, nullptr, nullptr, nullptr,
                                                    nullptr, nullptr, nullptr, nullptr};
extern const fastkd::CpuTopKIsa fastkd::avx512::topk_isa = {nullptr, nullptr};
extern const fastkd::CpuRelationalIsa fastkd::avx512::relational_isa = {nullptr, nullptr, nullptr, nullptr,
                                                                          nullptr};
#endif
