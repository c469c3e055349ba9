// This instruction set's entry in the table of kd_cpu.h: included last by kd_cpu_<isa>.cpp, after the kernels
// (kd_cpu_impl.h, power_iteration_impl.h, feature_loss_impl.h), with FASTKD_ISA, FASTKD_ISA_NAME and
// FASTKD_CPU_SUPPORTS defined.
#pragma once
#include "kd_cpu.h"

namespace fastkd {
namespace FASTKD_ISA {
namespace {
bool cpu_supports() { return FASTKD_CPU_SUPPORTS(); }
}  // namespace
extern const CpuIsa isa = {FASTKD_ISA_NAME,  cpu_supports,    forward,         backward,    scale_rows,
                           power_iteration, feature_forward, feature_backward, feature_flat};
}  // namespace FASTKD_ISA
}  // namespace fastkd
