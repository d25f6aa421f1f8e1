// Read and reset the gradients of many parameters at once, without a Python call per parameter.
//
// A parameter is named by its TensorImpl address (`Tensor._cdata`), which stays the same for the
// life of the Python object (`.data = t` re-points the storage, not the TensorImpl). The
// functions run with the GIL held (loaded through ctypes.PyDLL): resetting a gradient may free
// its Python object.
//
// fused_read_grads, per parameter i:
//   status[i] = NO_GRAD     .grad is None                               grad_ptrs[i] = 0
//             = IN_PLACE    .grad can be read where it lies: strided, same dtype, device and
//                           sizes as the parameter, same strides (size-1 dims aside)
//                                                                       grad_ptrs[i] = its data
//             = NEEDS_COPY  same dtype, device and sizes, other strides: copy it into place
//             = MISMATCH    another dtype, device or sizes, or not strided: an error to report
//             = MOVED       the parameter no longer lives at param_ptrs[i] (re-allocated)
// It returns how many are NEEDS_COPY, MISMATCH or MOVED (0 on the fast path), or -1 if torch
// threw (the Python side then falls back to its own reading).
#include <ATen/core/Tensor.h>

#include <cstdint>

namespace {

enum Status : int8_t { NO_GRAD = 0, IN_PLACE = 1, NEEDS_COPY = 2, MISMATCH = 3, MOVED = 4 };

bool same_strides(const c10::TensorImpl* a, const c10::TensorImpl* b) {
    auto sizes = a->sizes();
    auto sa = a->strides(), sb = b->strides();
    for (size_t d = 0; d < sizes.size(); d++) {
        if (sizes[d] != 1 && sa[d] != sb[d]) return false;
    }
    return true;
}

Status read_one(const c10::TensorImpl* param, int64_t param_ptr, int64_t* grad_ptr) {
    *grad_ptr = 0;
    const int64_t numel = param->numel();
    if (numel != 0 && reinterpret_cast<int64_t>(param->data()) != param_ptr) return MOVED;
    const at::Tensor& grad = param->grad();
    if (!grad.defined()) return NO_GRAD;
    const c10::TensorImpl* g = grad.unsafeGetTensorImpl();
    if (g->layout() != c10::kStrided || g->dtype() != param->dtype() || g->device() != param->device() ||
        g->sizes() != param->sizes())
        return MISMATCH;
    if (numel == 0) return IN_PLACE;
    if (!g->has_storage() || !same_strides(g, param)) return NEEDS_COPY;
    *grad_ptr = reinterpret_cast<int64_t>(g->data());
    return IN_PLACE;
}

// Reading one parameter's gradient follows a chain of pointers (the parameter's TensorImpl, its
// autograd meta, the gradient's TensorImpl, the gradient's storage), each usually a cache miss.
// The chains of different parameters are independent, so each is started ahead of its turn, one
// link per distance: by the time parameter i is read, its whole chain is in cache.
constexpr int64_t AHEAD = 4;
constexpr int64_t READ_BLOCK = 2048;  // parameters per unit of work of the threads

inline const c10::TensorImpl* param_at(const int64_t* params, int64_t n, int64_t i) {
    return i < n ? reinterpret_cast<const c10::TensorImpl*>(params[i]) : nullptr;
}

void prefetch_ahead(const int64_t* params, int64_t n, int64_t i) {
    if (const c10::TensorImpl* p = param_at(params, n, i + 4 * AHEAD)) __builtin_prefetch(p);
    if (const c10::TensorImpl* p = param_at(params, n, i + 3 * AHEAD)) __builtin_prefetch(p->autograd_meta());
    if (const c10::TensorImpl* p = param_at(params, n, i + 2 * AHEAD)) {
        if (p->autograd_meta() != nullptr) {
            const at::Tensor& grad = p->grad();
            if (grad.defined()) __builtin_prefetch(grad.unsafeGetTensorImpl());
        }
    }
    if (const c10::TensorImpl* p = param_at(params, n, i + AHEAD)) {
        if (p->autograd_meta() != nullptr) {
            const at::Tensor& grad = p->grad();
            if (grad.defined() && grad.unsafeGetTensorImpl()->has_storage())
                __builtin_prefetch(grad.unsafeGetTensorImpl()->storage().unsafeGetStorageImpl());
        }
    }
}

}  // namespace

extern "C" {

// Reading changes nothing (no reference count moves), so parameters are read on `threads` OpenMP
// threads (torch's own libgomp, as the C kernels): the work is waiting on memory, which overlaps.
int64_t fused_read_grads(const int64_t* params, const int64_t* param_ptrs, int64_t n, int64_t* grad_ptrs,
                         int8_t* status, int threads) {
    int64_t problems = 0;
    int failed = 0;
    const int64_t blocks = (n + READ_BLOCK - 1) / READ_BLOCK;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1) if (threads > 1 && blocks > 1) reduction(+ : problems) reduction(| : failed)
    for (int64_t block = 0; block < blocks; block++) {
        const int64_t end = (block + 1) * READ_BLOCK < n ? (block + 1) * READ_BLOCK : n;
        try {
            for (int64_t i = block * READ_BLOCK; i < end; i++) {
                prefetch_ahead(params, end, i);
                Status s = read_one(reinterpret_cast<const c10::TensorImpl*>(params[i]), param_ptrs[i], &grad_ptrs[i]);
                status[i] = s;
                problems += s >= NEEDS_COPY;
            }
        } catch (...) {
            failed = 1;
        }
    }
    return failed ? -1 : problems;
}

// p.grad = None for every parameter that has one. Returns 0, or -1 if torch threw.
int64_t fused_clear_grads(const int64_t* params, int64_t n) {
    try {
        for (int64_t i = 0; i < n; i++) {
            auto* param = reinterpret_cast<c10::TensorImpl*>(params[i]);
            if (param->grad().defined()) param->mutable_grad().reset();
        }
        return 0;
    } catch (...) {
        return -1;
    }
}

}  // extern "C"
