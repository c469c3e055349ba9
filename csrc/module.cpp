// fastkd._C: the pybind11 binding of the C++ CPU backend. A narrow surface: Python (fastkd/cpu_backend.py) passes
// data pointers, shapes, strides and dtype codes in a dict, checked here before any kernel runs; no torch headers.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "binding_args.h"
#include "buffer_pool.h"
#include "kd_cpu.h"

namespace py = pybind11;

namespace fastkd {
namespace {

const CpuIsa* const kIsas[] = {&avx512::isa, &avx2::isa, &portable::isa};  // best first

bool usable(const CpuIsa& isa) { return isa.forward != nullptr && isa.cpu_supports(); }

const CpuIsa* best_isa() {
    for (const CpuIsa* isa : kIsas) {
        if (usable(*isa)) return isa;
    }
    return &portable::isa;
}

const CpuIsa* g_isa = best_isa();

std::vector<std::string> usable_isas() {
    std::vector<std::string> names;
    for (const CpuIsa* isa : kIsas) {
        if (usable(*isa)) names.emplace_back(isa->name);
    }
    return names;
}

void set_isa(const std::string& name) {
    for (const CpuIsa* isa : kIsas) {
        if (name == isa->name) {
            if (!usable(*isa)) throw std::invalid_argument("instruction set '" + name + "' is not usable here");
            g_isa = isa;
            return;
        }
    }
    throw std::invalid_argument("unknown instruction set '" + name + "'");
}

void kd_forward(const py::dict& d) {
    KDArgs a = common_args(d);
    a.loss = pointer<float>(d, "loss");
    if (a.num_rows > 0 && a.loss == nullptr) throw std::invalid_argument("null loss pointer");
    a.fused_grad_student = pointer<void>(d, "fused_grad_student");
    a.fused_grad_teacher = pointer<void>(d, "fused_grad_teacher");
    a.grad_scale = get<float>(d, "grad_scale");
    a.metrics = pointer<float>(d, "metrics");
    if (a.fused_grad_student == nullptr && a.fused_grad_teacher != nullptr) {
        throw std::invalid_argument("fused_grad_teacher needs fused_grad_student");
    }
    py::gil_scoped_release release;
    g_isa->forward(a);
}

void kd_backward(const py::dict& d) {
    KDArgs a = common_args(d);
    read_backward_args(a, d);
    py::gil_scoped_release release;
    g_isa->backward(a);
}

void scale_rows(const py::dict& d) {
    ScaleRowsArgs a;
    a.rows = pointer<void>(d, "rows");
    a.dtype = dtype_code(get<int>(d, "dtype"), "rows");
    a.num_rows = get<int64_t>(d, "num_rows");
    a.num_cols = get<int64_t>(d, "num_cols");
    a.factors = pointer<const float>(d, "factors");
    a.factor_stride = get<int64_t>(d, "factor_stride");
    a.num_threads = get<int>(d, "num_threads");
    if (a.num_rows < 0 || a.num_cols < 0 || a.num_threads < 1) throw std::invalid_argument("bad sizes");
    if (a.num_rows > 0 && a.num_cols > 0 && (a.rows == nullptr || a.factors == nullptr)) {
        throw std::invalid_argument("null pointer");
    }
    py::gil_scoped_release release;
    g_isa->scale_rows(a);
}

void power_iteration(const py::dict& d) {
    PowerArgs a;
    a.dtype = dtype_code(get<int>(d, "dtype"), "matrices");
    for (const auto& spec : get<std::vector<std::tuple<uintptr_t, int64_t, int64_t, int64_t>>>(d, "matrices")) {
        const PowerMatrix w{reinterpret_cast<const void*>(std::get<0>(spec)), std::get<1>(spec), std::get<2>(spec),
                            std::get<3>(spec)};  // (pointer, rows, cols, row stride)
        if (w.data == nullptr || w.rows < 1 || w.cols < 1 || w.row_stride < w.cols) {
            throw std::invalid_argument("matrices: each needs a pointer, rows >= 1, cols >= 1, row stride >= cols");
        }
        a.matrices.push_back(w);
    }
    if (a.matrices.empty()) throw std::invalid_argument("matrices is empty");
    a.n_iter = get<int64_t>(d, "n_iter");
    a.eps = get<float>(d, "eps");
    a.u = pointer<const float>(d, "u");
    a.v = pointer<const float>(d, "v");
    a.sigma = pointer<float>(d, "sigma");
    a.u_out = pointer<float>(d, "u_out");
    a.v_out = pointer<float>(d, "v_out");
    a.v_prev = pointer<float>(d, "v_prev");
    a.num_threads = get<int>(d, "num_threads");
    if (a.n_iter < 1 || !(a.eps > 0) || a.num_threads < 1) throw std::invalid_argument("n_iter, eps, num_threads");
    if (!a.u || !a.v || !a.sigma || !a.u_out || !a.v_out || !a.v_prev) throw std::invalid_argument("null pointer");
    py::gil_scoped_release release;
    g_isa->power_iteration(a);
}

Strided3 strided3(const py::dict& d, const char* key, bool allow_uint8 = false) {
    // (pointer, dtype code, (stride n, stride c, stride s)); pointer 0: absent
    const auto spec = get<std::tuple<uintptr_t, int, std::tuple<int64_t, int64_t, int64_t>>>(d, key);
    const auto strides = std::get<2>(spec);
    Strided3 x;
    x.data = reinterpret_cast<const void*>(std::get<0>(spec));
    x.dtype = dtype_code(std::get<1>(spec), key, allow_uint8);
    x.stride[0] = std::get<0>(strides);
    x.stride[1] = std::get<1>(strides);
    x.stride[2] = std::get<2>(strides);
    return x;
}

FeatureArgs feature_args(const py::dict& d) {
    FeatureArgs a;
    a.student = strided3(d, "student");
    a.teacher = strided3(d, "teacher");
    a.mask = strided3(d, "mask", /*allow_uint8=*/true);
    a.num_n = get<int64_t>(d, "num_n");
    a.num_c = get<int64_t>(d, "num_c");
    a.num_s = get<int64_t>(d, "num_s");
    a.margin = pointer<const float>(d, "margin");
    a.kind = get<int>(d, "kind");
    a.normalize = get<int>(d, "normalize");
    a.group = get<int>(d, "group");
    a.beta = get<float>(d, "beta");
    a.num_threads = get<int>(d, "num_threads");
    if (a.num_n < 0 || a.num_c < 0 || a.num_s < 0 || a.num_threads < 1) throw std::invalid_argument("bad sizes");
    if (a.kind < kKindMSE || a.kind > kKindCosine || a.normalize < kNormalizeNone ||
        a.normalize > kNormalizeL2 || a.group < kGroupChannel || a.group > kGroupSample) {
        throw std::invalid_argument("unknown kind, normalize or group code");
    }
    if (a.num_n * a.num_c * a.num_s > 0 && (a.student.data == nullptr || a.teacher.data == nullptr)) {
        throw std::invalid_argument("null feature pointer");
    }
    return a;
}

void feature_forward(const py::dict& d) {
    FeatureArgs a = feature_args(d);
    a.terms = pointer<float>(d, "terms");
    a.weights = pointer<float>(d, "weights");
    if (a.terms == nullptr || a.weights == nullptr) throw std::invalid_argument("null output pointer");
    py::gil_scoped_release release;
    g_isa->feature_forward(a);
}

void feature_backward(const py::dict& d) {
    FeatureArgs a = feature_args(d);
    a.scale = pointer<const float>(d, "scale");
    a.grad_student = strided3(d, "grad_student");
    a.grad_teacher = strided3(d, "grad_teacher");
    if (a.scale == nullptr || a.grad_student.data == nullptr) throw std::invalid_argument("null pointer");
    py::gil_scoped_release release;
    g_isa->feature_backward(a);
}

// An uninitialised uint8 numpy array of nbytes from the buffer pool; its memory goes back to the pool when the
// array (and every tensor made from it with torch.from_numpy) is gone.
py::array_t<uint8_t> empty_buffer(size_t nbytes) {
    void* block = buffer_pool::allocate(nbytes);
    py::capsule owner(block, [](void* b) { buffer_pool::release(b); });
    return py::array_t<uint8_t>({static_cast<py::ssize_t>(nbytes)}, {static_cast<py::ssize_t>(1)},
                                static_cast<uint8_t*>(block), owner);
}

}  // namespace
}  // namespace fastkd

PYBIND11_MODULE(_C, m) {
    m.doc() = "fastkd's C++ CPU kernels (see fastkd.cpu_backend for the Python interface)";
    m.def("isa", [] { return std::string(fastkd::g_isa->name); }, "The instruction set the kernels run with.");
    m.def("usable_isas", &fastkd::usable_isas, "Instruction sets compiled in and supported by this CPU, best first.");
    m.def("set_isa", &fastkd::set_isa, py::arg("name"), "Run the kernels with this instruction set.");
    m.def("kd_forward", &fastkd::kd_forward, py::arg("args"), "kd_loss forward over all rows (see kd_cpu.h).");
    m.def("kd_backward", &fastkd::kd_backward, py::arg("args"), "kd_loss backward over all rows (see kd_cpu.h).");
    m.def("scale_rows", &fastkd::scale_rows, py::arg("args"), "Rows times per-row factors, in place (kd_cpu.h).");
    m.def("power_iteration", &fastkd::power_iteration, py::arg("args"),
          "Grouped power iteration over a list of matrices (power_iteration_cpu.h).");
    m.def("feature_forward", &fastkd::feature_forward, py::arg("args"),
          "feature_loss: per-group sums of weighted terms and weights (feature_loss_cpu.h).");
    m.def("feature_backward", &fastkd::feature_backward, py::arg("args"),
          "feature_loss: gradients of the scaled sum of terms (feature_loss_cpu.h).");
    m.def("empty_buffer", &fastkd::empty_buffer, py::arg("nbytes"),
          "Uninitialised uint8 array from the buffer pool (csrc/buffer_pool.h).");
    m.def("empty_cache", &fastkd::buffer_pool::empty, "Free the pool's cached blocks.");
    m.def("cached_bytes", &fastkd::buffer_pool::cached_bytes, "Bytes held in the pool's free blocks.");
    m.def("cache_limit", &fastkd::buffer_pool::limit, "The most bytes the pool keeps in free blocks.");
    m.def("set_cache_limit", &fastkd::buffer_pool::set_limit, py::arg("nbytes"),
          "Set the most bytes the pool keeps in free blocks (0 turns caching off).");
#ifdef _OPENMP
    m.attr("openmp") = true;
#else
    m.attr("openmp") = false;
#endif
}
