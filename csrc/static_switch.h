// Compile-time modes from run-time values: each helper calls `f` with a std::integral_constant holding the value,
// so that a kernel is instantiated once per mode and every flag is a constant inside it (the pattern of
// FlashAttention's static_switch.h, as function templates instead of macros). Read the value back with
// `decltype(x)::value`:
//
//     divergence_switch(args.divergence, [&](auto divergence) {
//         bool_switch(args.ce_weight != 0, [&](auto has_ce) {
//             run<decltype(divergence)::value, decltype(has_ce)::value>(args);
//         });
//     });
//
// The divergence switch names every enumerator and has no default: a new divergence that is not added here is a
// compile error (-Werror=switch, setup.py and fastkd/cuda_build.py), and a code outside the enum is an exception.
#pragma once
#include <stdexcept>
#include <string>
#include <type_traits>

#include "kd_args.h"

namespace fastkd {

template <typename F>
decltype(auto) bool_switch(bool value, F&& f) {
    if (value) return f(std::true_type{});
    return f(std::false_type{});
}

template <int kValue>
using IntConstant = std::integral_constant<int, kValue>;

template <typename F>
decltype(auto) divergence_switch(int code, F&& f) {
    switch (static_cast<Divergence>(code)) {
        case kKL: return f(IntConstant<kKL>{});
        case kReverseKL: return f(IntConstant<kReverseKL>{});
        case kJSD: return f(IntConstant<kJSD>{});
        case kCosine: return f(IntConstant<kCosine>{});
        case kDKD: return f(IntConstant<kDKD>{});
        case kTVD: return f(IntConstant<kTVD>{});
    }
    throw std::invalid_argument("unknown divergence code " + std::to_string(code));
}

}  // namespace fastkd
