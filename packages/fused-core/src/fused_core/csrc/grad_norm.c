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
 * is sqrt(grad_sumsq).
 */
#include <stdint.h>

#include "fused_half.h"

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
