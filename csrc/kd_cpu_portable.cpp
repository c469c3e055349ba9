// fastkd CPU kernels (kd_loss with a full or a sparse teacher, feature_loss, power iteration) for any CPU: 16-byte
// vectors (SSE2 on x86-64, NEON on ARM, scalar code elsewhere).
#define FASTKD_ISA portable
#define FASTKD_ISA_NAME "portable"
#define FASTKD_VEC_BYTES 16
#define FASTKD_CPU_SUPPORTS() true
#include "kd_cpu_impl.h"
#include "power_iteration_impl.h"
#include "feature_loss_impl.h"
#include "cpu_isa_entry.h"
#include "kd_topk_cpu_impl.h"
#include "relational_cpu_impl.h"
