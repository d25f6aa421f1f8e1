/* Norms and scaling of flat gradients (fp32, bf16, fp16), for clip_grad_norm_fused_.
 *
 *   grad_sumsq_T(x, n)     = sum_i x_i^2: fp32 sums of BLOCK elements (a block that overflows
 *                            fp32 is summed again in fp64), added up in fp64
 *   grad_maxabs_T(x, n)    = max_i |x_i|, NaN if any x_i is NaN (as torch's inf-norm)
 *   grad_scale_T(x, n, c)  : x_i <- x_i * c in fp32, rounded once to T
 *
 * bf16/fp16 blocks are converted to fp32 on the stack first (fused_half.h). Each function
 * splits n into pieces of PIECE elements over `threads` OpenMP threads (torch's own, see
 * fused_core/native.py); `omp simd` lets the compiler vectorise the reductions. The 2-norm
 * is sqrt(grad_sumsq). The *_segments_T variants do the same over gradients that lie apart
 * (each parameter's own tensor, as autograd hands them over).
 */
#include <stdint.h>
#include <stdlib.h>

#include "fused_half.h"
#include "fused_segments.h"

#define PIECE 65536
#define BLOCK 256

static double sumsq_block(const float *x, int64_t n) {
    float total = 0.0f;
#pragma omp simd reduction(+ : total)
    for (int64_t i = 0; i < n; i++) total += x[i] * x[i];
    if (total - total == 0.0f) return total; /* finite */
    double exact = 0.0;
    for (int64_t i = 0; i < n; i++) exact += (double)x[i] * (double)x[i];
    return exact;
}

static float maxabs_block(const float *x, int64_t n, int *nan_seen) {
    float largest = 0.0f;
    int nan = 0;
#pragma omp simd reduction(max : largest) reduction(| : nan)
    for (int64_t i = 0; i < n; i++) {
        float v = x[i] < 0.0f ? -x[i] : x[i];
        largest = v > largest ? v : largest;
        nan |= v != v;
    }
    *nan_seen |= nan;
    return largest;
}

static void scale_block(float *x, int64_t n, float c) {
    for (int64_t i = 0; i < n; i++) x[i] *= c;
}

/* Run BODY(block, count) over the fp32 image of each block of x[0:n], pieces shared out by
 * OMP_PRAGMA (a parallel for over `threads` threads); with WRITE_BACK, the block is stored
 * back (rounded) afterwards. */
#define OMP_FOR "omp parallel for num_threads(threads) schedule(static) if(threads > 1 && n > PIECE)"
#define FOR_EACH_BLOCK(TO_F32, FROM_F32, WRITE_BACK, OMP_PRAGMA, BODY)                                 \
    _Pragma(OMP_PRAGMA)                                                                                  \
    for (int64_t k = 0; k < (n + PIECE - 1) / PIECE; k++) {                                              \
        int64_t end = n - k * PIECE < PIECE ? n : k * PIECE + PIECE;                                     \
        float scratch[BLOCK];                                                                            \
        for (int64_t start = k * PIECE; start < end; start += BLOCK) {                                   \
            int64_t count = end - start < BLOCK ? end - start : BLOCK;                                   \
            float *block = TO_F32(x + start, scratch, count);                                            \
            BODY;                                                                                        \
            if (WRITE_BACK) FROM_F32(block, x + start, count);                                           \
        }                                                                                                \
    }

#define DEFINE_GRAD_KERNELS(SUFFIX, T, TO_F32, FROM_F32)                                                  \
    double grad_sumsq_##SUFFIX(T *x, int64_t n, int threads) {                                            \
        double total = 0.0;                                                                              \
        FOR_EACH_BLOCK(TO_F32, FROM_F32, 0, "omp parallel for num_threads(threads) schedule(static) if(threads > 1 && n > PIECE) reduction(+ : total)", total += sumsq_block(block, count)) \
        return total;                                                                                    \
    }                                                                                                    \
    double grad_maxabs_##SUFFIX(T *x, int64_t n, int threads) {                                           \
        float largest = 0.0f;                                                                            \
        int nan_seen = 0;                                                                                \
        FOR_EACH_BLOCK(TO_F32, FROM_F32, 0, "omp parallel for num_threads(threads) schedule(static) if(threads > 1 && n > PIECE) reduction(max : largest) reduction(| : nan_seen)", \
                       float m = maxabs_block(block, count, &nan_seen); largest = m > largest ? m : largest) \
        return nan_seen ? (double)fused_bits_to_f32(0x7fc00000u) : (double)largest;                     \
    }                                                                                                    \
    void grad_scale_##SUFFIX(T *x, int64_t n, float c, int threads) {                                     \
        FOR_EACH_BLOCK(TO_F32, FROM_F32, 1, OMP_FOR, scale_block(block, count, c))                          \
    }

/* fp32 blocks are used in place; 16-bit blocks are converted into `scratch`. */
FUSED_INLINE float *f32_in_place(float *x, float *scratch, int64_t n) { (void)scratch; (void)n; return x; }
FUSED_INLINE void f32_nothing(const float *block, float *x, int64_t n) { (void)block; (void)x; (void)n; }
FUSED_INLINE float *bf16_block(uint16_t *x, float *scratch, int64_t n) { fused_bf16_to_f32(x, scratch, n); return scratch; }
FUSED_INLINE float *fp16_block(uint16_t *x, float *scratch, int64_t n) { fused_fp16_to_f32(x, scratch, n); return scratch; }

DEFINE_GRAD_KERNELS(f32, float, f32_in_place, f32_nothing)
DEFINE_GRAD_KERNELS(bf16, uint16_t, bf16_block, fused_f32_to_bf16)
DEFINE_GRAD_KERNELS(fp16, uint16_t, fp16_block, fused_f32_to_fp16)

/* The same over segments: segment s is the dense array of numels[s] elements at address
 * ptrs[s], skipped where has[s] == 0 (a parameter without a gradient). The elements of all
 * segments are split into pieces of PIECE elements; each piece's partial result is kept, and
 * the partials are added in piece order, so the result does not depend on the thread count
 * (fused_segments.h: the pieces' starts in a per-thread buffer, the slot holding a piece's start).
 * FOR_EACH_PIECE_RUN: BODY(T *x, int64_t n) for every run of elements of piece k (from..to) of the
 * concatenation. */
#define FOR_EACH_PIECE_RUN(T, BODY)                                                                      \
    int64_t from = k * PIECE, to = from + PIECE < total ? from + PIECE : total;                          \
    for (int64_t s = fused_slot_at(starts, count, from); s < count && starts[s] < to; s++) {             \
        if (!has[s] || numels[s] == 0) continue;                                                         \
        int64_t a = from > starts[s] ? from - starts[s] : 0;                                             \
        int64_t b = (to < starts[s + 1] ? to : starts[s + 1]) - starts[s];                               \
        T *x = (T *)(intptr_t)ptrs[s] + a;                                                               \
        int64_t n = b - a;                                                                               \
        BODY;                                                                                            \
    }

#define DEFINE_SEGMENT_KERNELS(SUFFIX, T, TO_F32, FROM_F32)                                                \
    static double piece_sumsq_##SUFFIX(T *x, int64_t n) {                                                 \
        double total = 0.0;                                                                              \
        float scratch[BLOCK];                                                                            \
        for (int64_t start = 0; start < n; start += BLOCK) {                                             \
            int64_t count = n - start < BLOCK ? n - start : BLOCK;                                       \
            total += sumsq_block(TO_F32(x + start, scratch, count), count);                              \
        }                                                                                                \
        return total;                                                                                    \
    }                                                                                                    \
    static float piece_maxabs_##SUFFIX(T *x, int64_t n, int *nan_seen) {                                  \
        float largest = 0.0f, scratch[BLOCK];                                                            \
        for (int64_t start = 0; start < n; start += BLOCK) {                                             \
            int64_t count = n - start < BLOCK ? n - start : BLOCK;                                       \
            float m = maxabs_block(TO_F32(x + start, scratch, count), count, nan_seen);                  \
            largest = m > largest ? m : largest;                                                         \
        }                                                                                                \
        return largest;                                                                                  \
    }                                                                                                    \
    static void piece_scale_##SUFFIX(T *x, int64_t n, float c) {                                          \
        float scratch[BLOCK];                                                                            \
        for (int64_t start = 0; start < n; start += BLOCK) {                                             \
            int64_t count = n - start < BLOCK ? n - start : BLOCK;                                       \
            float *block = TO_F32(x + start, scratch, count);                                            \
            scale_block(block, count, c);                                                                \
            FROM_F32(block, x + start, count);                                                           \
        }                                                                                                \
    }                                                                                                    \
    double grad_sumsq_segments_##SUFFIX(const int64_t *ptrs, const int64_t *numels, const int8_t *has,    \
                                        int64_t count, int threads) {                                    \
        int64_t *starts = fused_segment_starts(has, numels, count);                                      \
        if (starts == 0) return -1.0;                                                                    \
        int64_t total = starts[count], pieces = (total + PIECE - 1) / PIECE;                             \
        double *partial = calloc((size_t)(pieces + 1), sizeof(double));                                  \
        _Pragma("omp parallel for num_threads(threads) schedule(static) if(threads > 1 && pieces > 1)")  \
        for (int64_t k = 0; k < pieces; k++) {                                                           \
            FOR_EACH_PIECE_RUN(T, partial[k] += piece_sumsq_##SUFFIX(x, n))                              \
        }                                                                                                \
        double sum = 0.0;                                                                                \
        for (int64_t k = 0; k < pieces; k++) sum += partial[k];                                          \
        free(partial);                                                                                   \
        return sum;                                                                                      \
    }                                                                                                    \
    double grad_maxabs_segments_##SUFFIX(const int64_t *ptrs, const int64_t *numels, const int8_t *has,   \
                                         int64_t count, int threads) {                                   \
        int64_t *starts = fused_segment_starts(has, numels, count);                                      \
        if (starts == 0) return -1.0;                                                                    \
        int64_t total = starts[count], pieces = (total + PIECE - 1) / PIECE;                             \
        float largest = 0.0f;                                                                            \
        int nan_seen = 0;                                                                                \
        _Pragma("omp parallel for num_threads(threads) schedule(static) if(threads > 1 && pieces > 1) reduction(max : largest) reduction(| : nan_seen)") \
        for (int64_t k = 0; k < pieces; k++) {                                                           \
            FOR_EACH_PIECE_RUN(T, float m = piece_maxabs_##SUFFIX(x, n, &nan_seen);                      \
                               largest = m > largest ? m : largest)                                      \
        }                                                                                                \
        return nan_seen ? (double)fused_bits_to_f32(0x7fc00000u) : (double)largest;                     \
    }                                                                                                    \
    int grad_scale_segments_##SUFFIX(const int64_t *ptrs, const int64_t *numels, const int8_t *has,       \
                                     int64_t count, float c, int threads) {                              \
        int64_t *starts = fused_segment_starts(has, numels, count);                                      \
        if (starts == 0) return -1;                                                                      \
        int64_t total = starts[count], pieces = (total + PIECE - 1) / PIECE;                             \
        _Pragma("omp parallel for num_threads(threads) schedule(dynamic, 1) if(threads > 1 && pieces > 1)") \
        for (int64_t k = 0; k < pieces; k++) {                                                           \
            FOR_EACH_PIECE_RUN(T, piece_scale_##SUFFIX(x, n, c))                                         \
        }                                                                                                \
        return 0;                                                                                        \
    }

DEFINE_SEGMENT_KERNELS(f32, float, f32_in_place, f32_nothing)
DEFINE_SEGMENT_KERNELS(bf16, uint16_t, bf16_block, fused_f32_to_bf16)
DEFINE_SEGMENT_KERNELS(fp16, uint16_t, fp16_block, fused_f32_to_fp16)
