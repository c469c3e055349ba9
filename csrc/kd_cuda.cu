// The CUDA kernels of fastkd.kd_loss (the subset of kd_cuda.h): one block per row, the row math of kd_cuda_row.h.
//
// Forward: each thread folds chunks of kUnroll 16-byte vectors of the student and teacher rows (all loads of a
// chunk issued before their use; a warp's loads of one vector are one coalesced 512-byte sweep) into its
// OnlineRow, the warp merges its 32 states with shuffles, the block merges its warps' through shared memory, and
// thread 0 writes the row loss and its statistics. Backward: one sweep per row, the same vectors, the gradients
// written as 16-byte vectors. Rows or strides that are not 16-byte aligned take the one-entry-per-load
// instantiation (VEC = 1). Offsets are 64-bit. Launches go on the stream the caller gives (PyTorch's current one).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "kd_cuda.h"
#include "kd_cuda_row.h"

namespace fastkd {
namespace {

using cuda_row::Label;
using cuda_row::OnlineRow;
using cuda_row::Options;
using cuda_row::RowGradient;

using cuda_row::kUnroll;
using cuda_row::kWarp;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// VEC entries of a row from `start` as float32, −inf past num_cols: one 16-byte load for a whole vector when
// VEC·sizeof(T) = 16 (the launcher checked the alignment).
template <typename T, int VEC>
__device__ __forceinline__ void load(const T* row, int64_t start, int64_t num_cols, float* out) {
    if (start + VEC <= num_cols) {
        if constexpr (VEC * sizeof(T) == 16) {
            const uint4 raw = __ldg(reinterpret_cast<const uint4*>(row + start));
            const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
            for (int i = 0; i < VEC; ++i) out[i] = to_float(v[i]);
        } else {
#pragma unroll
            for (int i = 0; i < VEC; ++i) out[i] = to_float(row[start + i]);
        }
    } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) out[i] = start + i < num_cols ? to_float(row[start + i]) : -cuda_row::kInf;
    }
}

template <typename T, int VEC>
__device__ __forceinline__ void store(T* row, int64_t start, int64_t num_cols, const float* values) {
    if (start + VEC <= num_cols) {
        if constexpr (VEC * sizeof(T) == 16) {
            uint4 raw;
            T* v = reinterpret_cast<T*>(&raw);
#pragma unroll
            for (int i = 0; i < VEC; ++i) v[i] = from_float<T>(values[i]);
            *reinterpret_cast<uint4*>(row + start) = raw;
        } else {
#pragma unroll
            for (int i = 0; i < VEC; ++i) row[start + i] = from_float<T>(values[i]);
        }
    } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
            if (start + i < num_cols) row[start + i] = from_float<T>(values[i]);
        }
    }
}

__device__ __forceinline__ OnlineRow shuffle_xor(const OnlineRow& x, int mask) {
    OnlineRow y;
    y.m_a = __shfl_xor_sync(0xffffffffu, x.m_a, mask);
    y.s_a = __shfl_xor_sync(0xffffffffu, x.s_a, mask);
    y.m_b = __shfl_xor_sync(0xffffffffu, x.m_b, mask);
    y.s_b = __shfl_xor_sync(0xffffffffu, x.s_b, mask);
    y.w = __shfl_xor_sync(0xffffffffu, x.w, mask);
    y.m_1 = __shfl_xor_sync(0xffffffffu, x.m_1, mask);
    y.s_1 = __shfl_xor_sync(0xffffffffu, x.s_1, mask);
    return y;
}

// Every lane ends with the merge of the warp's 32 states (butterfly: lane l merges with lane l ^ 16, 8, 4, 2, 1).
__device__ __forceinline__ OnlineRow warp_merge(OnlineRow x, const Options& o) {
#pragma unroll
    for (int mask = kWarp / 2; mask > 0; mask >>= 1) x = cuda_row::merge(x, shuffle_xor(x, mask), o);
    return x;
}

// The merge of the block's states, in thread 0 (blockDim.x a multiple of 32, at most 1024).
__device__ __forceinline__ OnlineRow block_merge(OnlineRow x, const Options& o) {
    __shared__ OnlineRow partial[kWarp];
    const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
    x = warp_merge(x, o);
    if (lane == 0) partial[warp] = x;
    __syncthreads();
    if (warp == 0) {
        x = warp_merge(lane < static_cast<int>(blockDim.x) / kWarp ? partial[lane] : cuda_row::empty_row(), o);
    }
    return x;
}

template <typename T, int VEC>
__global__ void __launch_bounds__(cuda_row::kMaxThreads)
    kd_forward_kernel(const T* __restrict__ student, int64_t student_stride, const T* __restrict__ teacher,
                      int64_t teacher_stride, const int64_t* __restrict__ labels, int64_t ignore_index,
                      int64_t num_rows, int64_t num_cols, Options o, float kd_scale, float ce_weight,
                      float* __restrict__ loss, float* __restrict__ stats) {
    const int64_t row = blockIdx.x;
    const Label label = cuda_row::row_label(labels, row, num_cols, ignore_index);
    const T* s_row = student + row * student_stride;
    const T* t_row = teacher + row * teacher_stride;
    const int threads = blockDim.x, tid = threadIdx.x;
    OnlineRow state = cuda_row::empty_row();
    if (label.counted) {  // uniform over the block: ignored rows skip the sweep
        for (int64_t chunk = 0; cuda_row::chunk_start<VEC, kUnroll>(chunk, 0, threads) < num_cols; ++chunk) {
            const int64_t start = cuda_row::chunk_start<VEC, kUnroll>(chunk, tid, threads);
            float s[VEC * kUnroll], t[VEC * kUnroll];
#pragma unroll
            for (int u = 0; u < kUnroll; ++u) {
                const int64_t at = start + cuda_row::vector_offset<VEC>(u, threads);
                load<T, VEC>(s_row, at, num_cols, s + u * VEC);
                if (o.has_kd) load<T, VEC>(t_row, at, num_cols, t + u * VEC);
            }
            cuda_row::fold(state, s, t, o);
        }
    }
    state = block_merge(state, o);
    if (tid == 0) {
        const float target = label.counted && label.ok && o.has_ce ? to_float(s_row[label.index]) : 0.0f;
        float row_stats[kNumStats];
        loss[row] = cuda_row::finish(state, label, target, kd_scale, ce_weight, o, row_stats);
#pragma unroll
        for (int i = 0; i < kNumStats; ++i) stats[i * num_rows + row] = row_stats[i];
    }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(cuda_row::kMaxThreads)
    kd_backward_kernel(const T* __restrict__ student, int64_t student_stride, const T* __restrict__ teacher,
                       int64_t teacher_stride, const int64_t* __restrict__ labels, int64_t ignore_index,
                       int64_t num_rows, int64_t num_cols, Options o, float kd_scale, float ce_weight,
                       const float* __restrict__ stats, const float* __restrict__ grad_loss,
                       int64_t grad_loss_stride, T* __restrict__ grad_student, T* __restrict__ grad_teacher) {
    const int64_t row = blockIdx.x;
    const Label label = cuda_row::row_label(labels, row, num_cols, ignore_index);
    const T* s_row = student + row * student_stride;
    const T* t_row = teacher + row * teacher_stride;
    T* gs_row = grad_student + row * num_cols;
    T* gt_row = grad_teacher != nullptr ? grad_teacher + row * num_cols : nullptr;
    const RowGradient g = cuda_row::row_gradient(stats, row, num_rows, grad_loss[row * grad_loss_stride], label,
                                                 kd_scale, ce_weight, o);
    const int threads = blockDim.x;
    for (int64_t chunk = 0; cuda_row::chunk_start<VEC, kUnroll>(chunk, 0, threads) < num_cols; ++chunk) {
        const int64_t start = cuda_row::chunk_start<VEC, kUnroll>(chunk, threadIdx.x, threads);
        float s[VEC * kUnroll], t[VEC * kUnroll];
        if (label.counted) {
#pragma unroll
            for (int u = 0; u < kUnroll; ++u) {
                const int64_t at = start + cuda_row::vector_offset<VEC>(u, threads);
                load<T, VEC>(s_row, at, num_cols, s + u * VEC);
                if (o.has_kd) load<T, VEC>(t_row, at, num_cols, t + u * VEC);
            }
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const int64_t at = start + cuda_row::vector_offset<VEC>(u, threads);
            float gs[VEC], gt[VEC];
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
                gs[i] = 0.0f;
                gt[i] = 0.0f;
                if (label.counted) {  // an ignored row's gradient is 0 (its statistics are zeros, not a state)
                    const int k = u * VEC + i;
                    cuda_row::gradient(s[k], o.has_kd ? t[k] : 0.0f, at + i == label.index, g, o, gs[i], gt[i]);
                }
            }
            store<T, VEC>(gs_row, at, num_cols, gs);
            if (gt_row != nullptr) store<T, VEC>(gt_row, at, num_cols, gt);
        }
    }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

Options options_of(const KDArgs& a) {
    return Options{a.inv_temperature, a.divergence == kReverseKL, a.kd_scale != 0.0f, a.ce_weight != 0.0f};
}

std::string launch_status() {
    const cudaError_t status = cudaGetLastError();
    return status == cudaSuccess ? std::string() : std::string(cudaGetErrorName(status)) + ": " +
                                                       cudaGetErrorString(status);
}

template <typename T>
std::string forward(const KDArgs& a, cudaStream_t stream) {
    constexpr int kVec = 16 / sizeof(T);
    const bool vectors = aligned16(a.student.data) && aligned16(a.teacher.data) &&
                         a.student.row_stride % kVec == 0 && a.teacher.row_stride % kVec == 0;
    const int threads = cuda_row::threads_per_row(a.num_cols, vectors ? kVec : 1);
    const auto* s = static_cast<const T*>(a.student.data);
    const auto* t = static_cast<const T*>(a.teacher.data);
    auto kernel = vectors ? kd_forward_kernel<T, kVec> : kd_forward_kernel<T, 1>;
    kernel<<<static_cast<unsigned>(a.num_rows), threads, 0, stream>>>(
        s, a.student.row_stride, t, a.teacher.row_stride, a.labels, a.ignore_index, a.num_rows, a.num_cols,
        options_of(a), a.kd_scale, a.ce_weight, a.loss, a.stats);
    return launch_status();
}

template <typename T>
std::string backward(const KDArgs& a, cudaStream_t stream) {
    constexpr int kVec = 16 / sizeof(T);
    const bool vectors = aligned16(a.student.data) && aligned16(a.teacher.data) && aligned16(a.grad_student) &&
                         (a.grad_teacher == nullptr || aligned16(a.grad_teacher)) &&
                         a.student.row_stride % kVec == 0 && a.teacher.row_stride % kVec == 0 &&
                         a.num_cols % kVec == 0;
    const int threads = cuda_row::threads_per_row(a.num_cols, vectors ? kVec : 1);
    auto kernel = vectors ? kd_backward_kernel<T, kVec> : kd_backward_kernel<T, 1>;
    kernel<<<static_cast<unsigned>(a.num_rows), threads, 0, stream>>>(
        static_cast<const T*>(a.student.data), a.student.row_stride, static_cast<const T*>(a.teacher.data),
        a.teacher.row_stride, a.labels, a.ignore_index, a.num_rows, a.num_cols, options_of(a), a.kd_scale,
        a.ce_weight, a.stats, a.grad_loss, a.grad_loss_stride, static_cast<T*>(a.grad_student),
        static_cast<T*>(a.grad_teacher));
    return launch_status();
}

template <template <typename> class Op>
std::string by_dtype(const KDArgs& a, void* stream) {
    if (a.num_rows == 0) return std::string();
    const auto s = static_cast<cudaStream_t>(stream);
    switch (static_cast<DType>(a.student.dtype)) {
        case kFloat32: return Op<float>::run(a, s);
        case kFloat16: return Op<__half>::run(a, s);
        case kBFloat16: return Op<__nv_bfloat16>::run(a, s);
        case kUInt8: break;  // a mask dtype, never logits
    }
    return "unknown logits dtype code " + std::to_string(a.student.dtype);
}

template <typename T>
struct Forward {
    static std::string run(const KDArgs& a, cudaStream_t s) { return forward<T>(a, s); }
};
template <typename T>
struct Backward {
    static std::string run(const KDArgs& a, cudaStream_t s) { return backward<T>(a, s); }
};

}  // namespace

std::string kd_forward_cuda(const KDArgs& a, void* stream) { return by_dtype<Forward>(a, stream); }
int kd_cuda_runtime_version() { return CUDART_VERSION; }
std::string kd_backward_cuda(const KDArgs& a, void* stream) { return by_dtype<Backward>(a, stream); }

}  // namespace fastkd
