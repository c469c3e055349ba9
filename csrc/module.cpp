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

// The sparse-teacher kernels of the instruction set the kernels run with.
const CpuTopKIsa& topk_isa() {
    const CpuTopKIsa* const tables[] = {&avx512::topk_isa, &avx2::topk_isa, &portable::topk_isa};  // as kIsas
    for (size_t i = 0; i < sizeof kIsas / sizeof kIsas[0]; ++i) {
        if (kIsas[i] == g_isa) return *tables[i];
    }
    return portable::topk_isa;
}

const CpuRelationalIsa& relational_isa() {
    const CpuRelationalIsa* const tables[] = {&avx512::relational_isa, &avx2::relational_isa,
                                              &portable::relational_isa};  // as kIsas
    for (int i = 0; i < 3; ++i) {
        if (kIsas[i] == g_isa) return *tables[i];
    }
    return portable::relational_isa;
}

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

// The OpenMP threads worth starting for a kernel over `elements` logits: waking a thread team costs more than the
// work below about kElementsPerThread per thread (measured: bench/overhead_cpu.py), and far more when the cores are
// oversubscribed. Rows still go to threads in a fixed order, so results do not depend on this.
constexpr int64_t kElementsPerThread = 1 << 15;

int threads_for(int requested, int64_t elements) {
    const int64_t useful = elements / kElementsPerThread;
    return static_cast<int>(useful < 1 ? 1 : (useful < requested ? useful : requested));
}

void kd_forward(const py::dict& d) {
    KDArgs a = common_args(d);
    a.num_threads = threads_for(a.num_threads, a.num_rows * a.num_cols);
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
    a.num_threads = threads_for(a.num_threads, a.num_rows * a.num_cols);
    read_backward_args(a, d);
    py::gil_scoped_release release;
    g_isa->backward(a);
}

// The arguments of the sparse-teacher kernels (kd_topk_cpu.h), checked.
TopKArgs topk_args(const py::dict& d) {
    TopKArgs a;
    a.student = rows(d, "student");
    a.values = rows(d, "values");
    a.indices = pointer<const void>(d, "indices");
    const int index_bytes = get<int>(d, "index_bytes");
    if (index_bytes != 4 && index_bytes != 8) throw std::invalid_argument("index_bytes must be 4 (int32) or 8 (int64)");
    a.indices_int32 = index_bytes == 4;
    a.indices_row_stride = get<int64_t>(d, "indices_row_stride");
    a.num_rows = get<int64_t>(d, "num_rows");
    a.num_cols = get<int64_t>(d, "num_cols");
    a.num_slots = get<int64_t>(d, "num_slots");
    a.labels = pointer<const int64_t>(d, "labels");
    a.ignore_index = get<int64_t>(d, "ignore_index");
    a.inv_temperature = get<float>(d, "inv_temperature");
    a.inv_teacher_temperature = get<float>(d, "inv_teacher_temperature");
    a.ce_weight = get<float>(d, "ce_weight");
    a.kd_scale = get<float>(d, "kd_scale");
    a.bucket = get<bool>(d, "bucket");
    a.spread = get<bool>(d, "spread");
    a.stats = pointer<float>(d, "stats");
    a.num_threads = get<int>(d, "num_threads");
    if (a.num_rows < 0 || a.num_cols < 1 || a.num_cols > INT32_MAX || a.num_slots < 1) {
        throw std::invalid_argument("num_rows must be >= 0, num_cols in [1, 2^31) and num_slots >= 1");
    }
    if (a.spread && !a.bucket) throw std::invalid_argument("the spread tail is a bucket");
    if (a.bucket && a.num_slots >= a.num_cols) throw std::invalid_argument("a bucket needs num_slots < num_cols");
    if (a.num_threads < 1) throw std::invalid_argument("num_threads must be >= 1");
    if (a.num_rows > 0 && (a.student.data == nullptr || a.values.data == nullptr || a.indices == nullptr ||
                           a.stats == nullptr)) {
        throw std::invalid_argument("null data pointer");
    }
    a.num_threads = threads_for(a.num_threads, a.num_rows * a.num_cols);
    return a;
}

void kd_topk_forward(const py::dict& d) {
    TopKArgs a = topk_args(d);
    a.loss = pointer<float>(d, "loss");
    a.metrics = pointer<float>(d, "metrics");
    if (a.num_rows > 0 && a.loss == nullptr) throw std::invalid_argument("null loss pointer");
    py::gil_scoped_release release;
    topk_isa().forward(a);
}

void kd_topk_backward(const py::dict& d) {
    TopKArgs a = topk_args(d);
    a.grad_loss = pointer<const float>(d, "grad_loss");
    a.grad_loss_stride = get<int64_t>(d, "grad_loss_stride");
    a.grad_student = pointer<void>(d, "grad_student");
    if (a.num_rows > 0 && (a.grad_loss == nullptr || a.grad_student == nullptr)) {
        throw std::invalid_argument("null gradient pointer");
    }
    py::gil_scoped_release release;
    topk_isa().backward(a);
}

// kd_loss reduced to one number in one call, where building and reading an argument dict would cost more than the
// kernel at classification shapes (positional arguments instead). Writes *loss_out = Σ row_loss / divisor (summed
// in double in row order: the same bits for any thread count); when grad_student is set (kl and reverse_kl), the
// gradient of that loss w.r.t. the student (and the teacher into grad_teacher if set); when metrics is set, the
// means of the fidelity metrics over the counted rows (kNumMetrics floats). divisor 0: the counted rows
// (label != ignore_index; all rows without labels), at least 1; NaN (a bad normalizer) makes the loss and the
// gradient NaN.
void kd_loss_reduced(const RowsSpec& student, const RowsSpec& teacher, int64_t num_rows, int64_t num_cols,
                     uintptr_t labels, int64_t ignore_index, int divergence,
                     const std::tuple<float, float, float, float, float>& scalars, float ce_weight, float kd_scale,
                     uintptr_t grad_student, uintptr_t grad_teacher, uintptr_t metrics, double divisor,
                     uintptr_t loss_out, int num_threads) {
    thread_local std::vector<float> row_loss, stats, row_metrics;  // scratch: the caller needs none of them
    row_loss.resize(static_cast<size_t>(num_rows > 0 ? num_rows : 0));
    stats.resize(row_loss.size() * kNumStats);
    float* metric_means = reinterpret_cast<float*>(metrics);
    if (metric_means != nullptr) row_metrics.resize(row_loss.size() * kNumMetrics);
    KDArgs a;
    a.student = rows(student, "student");
    a.teacher = rows(teacher, "teacher");
    a.num_rows = num_rows;
    a.num_cols = num_cols;
    a.labels = reinterpret_cast<const int64_t*>(labels);
    a.ignore_index = ignore_index;
    a.divergence = divergence;
    std::tie(a.inv_temperature, a.beta, a.one_minus_beta, a.log_beta, a.log_one_minus_beta) = scalars;
    a.ce_weight = ce_weight;
    a.kd_scale = kd_scale;
    a.loss = row_loss.data();
    a.stats = stats.data();
    a.fused_grad_student = reinterpret_cast<void*>(grad_student);
    a.fused_grad_teacher = reinterpret_cast<void*>(grad_teacher);
    a.metrics = metric_means != nullptr ? row_metrics.data() : nullptr;
    a.num_threads = num_threads;
    check_common_args(a);
    a.num_threads = threads_for(num_threads, num_rows * num_cols);
    float* out = reinterpret_cast<float*>(loss_out);
    if (out == nullptr) throw std::invalid_argument("null loss_out pointer");
    if (a.fused_grad_student == nullptr && a.fused_grad_teacher != nullptr) {
        throw std::invalid_argument("grad_teacher needs grad_student");
    }
    if (a.fused_grad_student != nullptr && divergence != kKL && divergence != kReverseKL) {
        throw std::invalid_argument("the fused gradient covers kl and reverse_kl only");
    }
    if (divisor < 0) throw std::invalid_argument("divisor must be >= 0 (0: count the rows) or NaN");
    int64_t counted = num_rows;
    if (a.labels != nullptr) {
        counted = 0;
        for (int64_t row = 0; row < num_rows; ++row) counted += a.labels[row] != ignore_index;
    }
    if (divisor == 0) divisor = counted > 0 ? static_cast<double>(counted) : 1.0;
    a.grad_scale = static_cast<float>(1.0 / divisor);
    {
        py::gil_scoped_release release;
        g_isa->forward(a);
    }
    double total = 0;
    for (float x : row_loss) total += x;
    *out = static_cast<float>(total / divisor);
    if (metric_means != nullptr) {  // each metric's mean over the counted rows (ignored rows hold 0), 0 if none
        for (int slot = 0; slot < kNumMetrics; ++slot) {
            double sum = 0;
            for (int64_t row = 0; row < num_rows; ++row) sum += row_metrics[slot * num_rows + row];
            metric_means[slot] = static_cast<float>(sum / static_cast<double>(counted > 0 ? counted : 1));
        }
    }
}

// The first position whose label is neither in [0, num_classes) nor ignore_index, or -1: labels are checked on
// the host without a tensor op (several of them cost more than a small kd_loss).
int64_t first_bad_label(uintptr_t labels, int64_t count, int64_t num_classes, int64_t ignore_index) {
    const int64_t* x = reinterpret_cast<const int64_t*>(labels);
    if (count > 0 && x == nullptr) throw std::invalid_argument("null labels pointer");
    for (int64_t i = 0; i < count; ++i) {
        if (x[i] != ignore_index && (x[i] < 0 || x[i] >= num_classes)) return i;
    }
    return -1;
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
    a.num_threads = threads_for(a.num_threads, a.num_rows * a.num_cols);
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

// RKD's angle loss (relational_cpu.h): the checked arguments, run on threads_for(B³) threads.
RKDAngleArgs rkd_angle_args(const py::dict& d) {
    RKDAngleArgs a;
    a.student = pointer<const float>(d, "student");
    a.teacher = pointer<const float>(d, "teacher");
    a.num = get<int64_t>(d, "num");
    a.row_stride = get<int64_t>(d, "row_stride");
    a.num_threads = get<int>(d, "num_threads");
    if (a.num < 0 || a.row_stride < a.num || a.num_threads < 1) {
        throw std::invalid_argument("num must be >= 0, row_stride >= num and num_threads >= 1");
    }
    if (a.num > 0 && (a.student == nullptr || a.teacher == nullptr)) throw std::invalid_argument("null distances");
    a.num_threads = threads_for(a.num_threads, a.num * a.num * a.num);
    return a;
}

void rkd_angle_forward(const py::dict& d) {
    RKDAngleArgs a = rkd_angle_args(d);
    a.loss = pointer<float>(d, "loss");
    if (a.loss == nullptr) throw std::invalid_argument("null loss pointer");
    py::gil_scoped_release release;
    relational_isa().rkd_angle_forward(a);
}

void rkd_angle_backward(const py::dict& d) {
    RKDAngleArgs a = rkd_angle_args(d);
    a.scale = get<float>(d, "scale");
    a.grad = pointer<float>(d, "grad");
    if (a.num > 0 && a.grad == nullptr) throw std::invalid_argument("null grad pointer");
    py::gil_scoped_release release;
    relational_isa().rkd_angle_backward(a);
}

// CRD's bank scores (relational_cpu.h): the checked arguments, run on threads_for(B·C·d) threads.
BankDotArgs bank_dot_args(const py::dict& d) {
    BankDotArgs a;
    a.bank = rows(d, "bank");
    a.num_bank_rows = get<int64_t>(d, "num_bank_rows");
    a.dim = get<int64_t>(d, "dim");
    a.index = pointer<const int64_t>(d, "index");
    a.num_queries = get<int64_t>(d, "num_queries");
    a.num_contrast = get<int64_t>(d, "num_contrast");
    a.num_threads = get<int>(d, "num_threads");
    if (a.num_bank_rows < 1 || a.dim < 1 || a.bank.row_stride < a.dim || a.num_queries < 0 || a.num_contrast < 0 ||
        a.num_threads < 1) {
        throw std::invalid_argument("bank sizes, dim, num_queries, num_contrast or num_threads out of range");
    }
    if (a.num_queries > 0 && a.num_contrast > 0 && (a.bank.data == nullptr || a.index == nullptr)) {
        throw std::invalid_argument("null data");
    }
    a.num_threads = threads_for(a.num_threads, a.num_queries * a.num_contrast * a.dim);
    return a;
}

void bank_gather_dot(const py::dict& d) {
    BankDotArgs a = bank_dot_args(d);
    a.query = pointer<const float>(d, "query");
    a.scores = pointer<float>(d, "scores");
    if (a.num_queries > 0 && a.num_contrast > 0 && (a.query == nullptr || a.scores == nullptr)) {
        throw std::invalid_argument("null data");
    }
    py::gil_scoped_release release;
    relational_isa().bank_gather_dot(a);
}

void bank_scatter_dot(const py::dict& d) {
    BankDotArgs a = bank_dot_args(d);
    a.grad = pointer<const float>(d, "grad");
    a.grad_query = pointer<float>(d, "grad_query");
    if (a.num_queries > 0 && (a.grad_query == nullptr || (a.num_contrast > 0 && a.grad == nullptr))) {
        throw std::invalid_argument("null data");
    }
    py::gil_scoped_release release;
    relational_isa().bank_scatter_dot(a);
}

void bank_score_grad(const py::dict& d) {
    BankDotArgs a = bank_dot_args(d);
    a.query = pointer<const float>(d, "query");
    a.scores = pointer<float>(d, "scores");
    a.grad_query = pointer<float>(d, "grad_query");
    a.inv_temperature = get<float>(d, "inv_temperature");
    a.inv_normalizer = get<float>(d, "inv_normalizer");
    a.noise = get<float>(d, "noise");
    a.grad_scale = get<float>(d, "grad_scale");
    if (a.num_queries > 0 && (a.query == nullptr || a.grad_query == nullptr || (a.num_contrast > 0 && !a.scores))) {
        throw std::invalid_argument("null data");
    }
    py::gil_scoped_release release;
    relational_isa().bank_score_grad(a);
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
    a.num_threads = threads_for(a.num_threads, a.num_n * a.num_c * a.num_s);
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

// feature_loss reduced to one number in one call, for contiguous features with no mask, normalisation or margin
// and an element-wise kind (positional arguments, as kd_loss_reduced): *loss_out = Σ term(s − t) / divisor, the
// blocks of feature_flat summed in double in order (the same bits for any thread count); when grad_student or
// grad_teacher is set, the gradient of that loss w.r.t. that input, in its dtype.
void feature_loss_flat(uintptr_t student, int student_dtype, uintptr_t teacher, int teacher_dtype, int64_t count,
                       int kind, float beta, double divisor, uintptr_t grad_student, uintptr_t grad_teacher,
                       uintptr_t loss_out, int num_threads) {
    FeatureFlatArgs a;
    a.student = reinterpret_cast<const void*>(student);
    a.teacher = reinterpret_cast<const void*>(teacher);
    a.student_dtype = dtype_code(student_dtype, "student");
    a.teacher_dtype = dtype_code(teacher_dtype, "teacher");
    a.count = count;
    a.kind = kind;
    a.beta = beta;
    a.grad_scale = static_cast<float>(1.0 / divisor);
    a.grad_student = reinterpret_cast<void*>(grad_student);
    a.grad_teacher = reinterpret_cast<void*>(grad_teacher);
    if (count < 0 || num_threads < 1) throw std::invalid_argument("count must be >= 0 and num_threads >= 1");
    if (kind != kKindMSE && kind != kKindL1 && kind != kKindSmoothL1) {
        throw std::invalid_argument("the flat pass covers the element-wise kinds (mse, l1, smooth_l1) only");
    }
    if (!(divisor > 0)) throw std::invalid_argument("divisor must be > 0");
    float* out = reinterpret_cast<float*>(loss_out);
    if (out == nullptr || (count > 0 && (a.student == nullptr || a.teacher == nullptr))) {
        throw std::invalid_argument("null pointer");
    }
    thread_local std::vector<double> block_sums;  // scratch
    block_sums.resize(static_cast<size_t>((count + kFeatureFlatBlock - 1) / kFeatureFlatBlock));
    a.block_sums = block_sums.data();
    a.num_threads = threads_for(num_threads, count);
    {
        py::gil_scoped_release release;
        g_isa->feature_flat(a);
    }
    double total = 0;
    for (double x : block_sums) total += x;
    *out = static_cast<float>(total / divisor);
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
    m.def("kd_topk_forward", &fastkd::kd_topk_forward, py::arg("args"),
          "kd_loss forward against a sparse (TopK) teacher over all rows (see kd_topk_cpu.h).");
    m.def("kd_topk_backward", &fastkd::kd_topk_backward, py::arg("args"),
          "kd_loss backward against a sparse (TopK) teacher over all rows (see kd_topk_cpu.h).");
    m.def("kd_loss_reduced", &fastkd::kd_loss_reduced,
          "kd_loss forward reduced to one number, with the fused gradient (positional arguments, see module.cpp).");
    m.def("first_bad_label", &fastkd::first_bad_label, py::arg("labels"), py::arg("count"), py::arg("num_classes"),
          py::arg("ignore_index"), "Index of the first label out of range (neither a class nor ignore_index), or -1.");
    m.def("scale_rows", &fastkd::scale_rows, py::arg("args"), "Rows times per-row factors, in place (kd_cpu.h).");
    m.def("power_iteration", &fastkd::power_iteration, py::arg("args"),
          "Grouped power iteration over a list of matrices (power_iteration_cpu.h).");
    m.def("feature_forward", &fastkd::feature_forward, py::arg("args"),
          "feature_loss: per-group sums of weighted terms and weights (feature_loss_cpu.h).");
    m.def("feature_backward", &fastkd::feature_backward, py::arg("args"),
          "feature_loss: gradients of the scaled sum of terms (feature_loss_cpu.h).");
    m.def("feature_loss_flat", &fastkd::feature_loss_flat,
          "feature_loss of plain contiguous features reduced to one number, with its gradients (module.cpp).");
    m.def("rkd_angle_forward", &fastkd::rkd_angle_forward, py::arg("args"),
          "RKD's angle loss: the sum of smooth L1 over the B³ triplets (relational_cpu.h).");
    m.def("rkd_angle_backward", &fastkd::rkd_angle_backward, py::arg("args"),
          "RKD's angle loss: the gradient w.r.t. the student's distances (relational_cpu.h).");
    m.def("bank_gather_dot", &fastkd::bank_gather_dot, py::arg("args"),
          "CRD: scores of query rows against bank rows read by index (relational_cpu.h).");
    m.def("bank_scatter_dot", &fastkd::bank_scatter_dot, py::arg("args"),
          "CRD: the scores' gradient w.r.t. the query rows (relational_cpu.h).");
    m.def("bank_score_grad", &fastkd::bank_score_grad, py::arg("args"),
          "CRD: scores and their NCE gradient w.r.t. the query rows from one read of each bank row "
          "(relational_cpu.h).");
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
