// What both pybind11 modules (module.cpp: fastkd._C, the CPU backend; cuda_module.cpp: fastkd._C_cuda) read out of
// the argument dicts that Python passes: typed values, data pointers, checked dtype codes and the kd_loss launch
// arguments, each checked before any kernel runs.
#pragma once
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <tuple>

#include "kd_args.h"
#include "static_switch.h"

namespace fastkd {

namespace py = pybind11;

template <typename T>
inline T get(const py::dict& d, const char* key) {
    if (!d.contains(key)) throw std::invalid_argument(std::string("missing kernel argument '") + key + "'");
    return d[key].cast<T>();
}

template <typename T>
inline T* pointer(const py::dict& d, const char* key) {
    return reinterpret_cast<T*>(get<uintptr_t>(d, key));
}

// A checked dtype code; masks (allow_uint8) may also be kUInt8.
inline int dtype_code(int code, const char* key, bool allow_uint8 = false) {
    if (code != kFloat32 && code != kFloat16 && code != kBFloat16 && !(allow_uint8 && code == kUInt8)) {
        throw std::invalid_argument(std::string(key) + ": unknown dtype code " + std::to_string(code));
    }
    return code;
}

using RowsSpec = std::tuple<uintptr_t, int, int64_t>;  // (pointer, dtype code, row stride)

inline Rows rows(const RowsSpec& spec, const char* key) {
    return Rows{reinterpret_cast<const void*>(std::get<0>(spec)), dtype_code(std::get<1>(spec), key),
                std::get<2>(spec)};
}

inline Rows rows(const py::dict& d, const char* key) { return rows(get<RowsSpec>(d, key), key); }

// Checks every kernel takes for granted in a, whichever way its arguments came in.
inline void check_common_args(const KDArgs& a) {
    if (a.num_rows < 0 || a.num_cols < 1 || a.num_cols > INT32_MAX) {
        throw std::invalid_argument("num_rows must be >= 0 and num_cols in [1, 2^31)");
    }
    divergence_switch(a.divergence, [](auto) {});  // throws for a code outside the enum
    if (a.num_threads < 1) throw std::invalid_argument("num_threads must be >= 1");
    if (a.num_rows > 0 && (a.student.data == nullptr || a.teacher.data == nullptr || a.stats == nullptr)) {
        throw std::invalid_argument("null data pointer");
    }
}

inline KDArgs common_args(const py::dict& d) {
    KDArgs a;
    a.student = rows(d, "student");
    a.teacher = rows(d, "teacher");
    a.num_rows = get<int64_t>(d, "num_rows");
    a.num_cols = get<int64_t>(d, "num_cols");
    a.labels = pointer<const int64_t>(d, "labels");
    a.ignore_index = get<int64_t>(d, "ignore_index");
    a.divergence = get<int>(d, "divergence");
    a.inv_temperature = get<float>(d, "inv_temperature");
    a.beta = get<float>(d, "beta");
    a.one_minus_beta = get<float>(d, "one_minus_beta");
    a.log_beta = get<float>(d, "log_beta");
    a.log_one_minus_beta = get<float>(d, "log_one_minus_beta");
    a.ce_weight = get<float>(d, "ce_weight");
    a.kd_scale = get<float>(d, "kd_scale");
    a.alpha = get<float>(d, "alpha");
    a.stats = pointer<float>(d, "stats");
    a.num_threads = get<int>(d, "num_threads");
    check_common_args(a);
    return a;
}

// The backward's own arguments: the incoming gradient of the row losses and the gradients to write.
inline void read_backward_args(KDArgs& a, const py::dict& d) {
    a.grad_loss = pointer<const float>(d, "grad_loss");
    a.grad_loss_stride = get<int64_t>(d, "grad_loss_stride");
    a.grad_student = pointer<void>(d, "grad_student");
    a.grad_teacher = pointer<void>(d, "grad_teacher");
    if (a.num_rows > 0 && (a.grad_loss == nullptr || a.grad_student == nullptr)) {
        throw std::invalid_argument("null gradient pointer");
    }
}

}  // namespace fastkd
