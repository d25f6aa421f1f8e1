/* Per-slot reductions over a flat buffer (fused_core.reductions): for every slot s of a bucket,
 * lying at elements [offsets[s], offsets[s] + numels[s]) of x (and y),
 *
 *   segment_sumsq_T(x)     out[s] = sum_i x_i^2
 *   segment_dot_T(x, y)    out[s] = sum_i x_i * y_i
 *
 * Products and sums in fp64 (bf16/fp16 blocks are converted to fp32 on the stack first,
 * fused_half.h). Each slot is cut into pieces of PIECE elements; the pieces of all slots are
 * shared out dynamically over `threads` OpenMP threads (torch's, see fused_core/native.py), so
 * thousands of small slots and one huge slot both spread over every thread; each piece's partial
 * sum is kept and a slot's partials are added in piece order, so the result does not depend on
 * the thread count. Return 0, or -1 when the piece table cannot be allocated.
 */
#include <stdint.h>
#include <stdlib.h>

#include "fused_half.h"

#define PIECE 32768
#define BLOCK 256

typedef struct {
    int64_t slot, from, to;
} piece_t;

/* The pieces of every slot, in slot order; *count gets their number. NULL when out of memory. */
static piece_t *cut_pieces(const int64_t *offsets, const int64_t *numels, int64_t slots, int64_t *count) {
    int64_t total = 0;
    for (int64_t s = 0; s < slots; s++) total += numels[s] > PIECE ? (numels[s] + PIECE - 1) / PIECE : 1;
    piece_t *pieces = malloc((size_t)(total > 0 ? total : 1) * sizeof(piece_t));
    if (pieces == 0) return 0;
    int64_t k = 0;
    for (int64_t s = 0; s < slots; s++) {
        int64_t from = offsets[s], end = offsets[s] + numels[s];
        do {
            int64_t to = end - from > PIECE ? from + PIECE : end;
            pieces[k++] = (piece_t){s, from, to};
            from = to;
        } while (from < end);
    }
    *count = total;
    return pieces;
}

static double dot_f32(const float *x, const float *y, int64_t n) {
    double total = 0.0;
#pragma omp simd reduction(+ : total)
    for (int64_t i = 0; i < n; i++) total += (double)x[i] * (double)y[i];
    return total;
}

static double dot_f64(const double *x, const double *y, int64_t n) {
    double total = 0.0;
#pragma omp simd reduction(+ : total)
    for (int64_t i = 0; i < n; i++) total += x[i] * y[i];
    return total;
}

/* PIECE_SUM(x, y, n): the sum over one piece (y == x for a sum of squares). */
#define DEFINE_REDUCTIONS(SUFFIX, T, PIECE_SUM)                                                           \
    static int reduce_##SUFFIX(const T *x, const T *y, const int64_t *offsets, const int64_t *numels,     \
                               int64_t slots, double *out, int threads) {                                \
        int64_t count = 0;                                                                               \
        piece_t *pieces = cut_pieces(offsets, numels, slots, &count);                                    \
        double *partial = malloc((size_t)(count > 0 ? count : 1) * sizeof(double));                      \
        if (pieces == 0 || partial == 0) {                                                               \
            free(pieces);                                                                                \
            free(partial);                                                                               \
            return -1;                                                                                   \
        }                                                                                                \
        _Pragma("omp parallel for num_threads(threads) schedule(dynamic, 16) if(threads > 1 && count > 16)") \
        for (int64_t k = 0; k < count; k++)                                                              \
            partial[k] = PIECE_SUM(x + pieces[k].from, y + pieces[k].from, pieces[k].to - pieces[k].from); \
        for (int64_t s = 0; s < slots; s++) out[s] = 0.0;                                                \
        for (int64_t k = 0; k < count; k++) out[pieces[k].slot] += partial[k];                           \
        free(pieces);                                                                                    \
        free(partial);                                                                                   \
        return 0;                                                                                        \
    }                                                                                                    \
    int segment_sumsq_##SUFFIX(const T *x, const int64_t *offsets, const int64_t *numels, int64_t slots,  \
                               double *out, int threads) {                                               \
        return reduce_##SUFFIX(x, x, offsets, numels, slots, out, threads);                              \
    }                                                                                                    \
    int segment_dot_##SUFFIX(const T *x, const T *y, const int64_t *offsets, const int64_t *numels,       \
                             int64_t slots, double *out, int threads) {                                  \
        return reduce_##SUFFIX(x, y, offsets, numels, slots, out, threads);                              \
    }

/* 16-bit pieces: BLOCK elements at a time through fp32 scratch. */
#define DEFINE_HALF_PIECE_SUM(NAME, TO_F32)                                                               \
    static double NAME(const uint16_t *x, const uint16_t *y, int64_t n) {                                 \
        float xs[BLOCK], ys[BLOCK];                                                                      \
        double total = 0.0;                                                                              \
        for (int64_t start = 0; start < n; start += BLOCK) {                                             \
            int64_t count = n - start < BLOCK ? n - start : BLOCK;                                       \
            TO_F32((uint16_t *)(x + start), xs, count);                                                  \
            if (y == x) {                                                                                \
                total += dot_f32(xs, xs, count);                                                         \
            } else {                                                                                     \
                TO_F32((uint16_t *)(y + start), ys, count);                                              \
                total += dot_f32(xs, ys, count);                                                         \
            }                                                                                            \
        }                                                                                                \
        return total;                                                                                    \
    }

DEFINE_HALF_PIECE_SUM(dot_bf16, fused_bf16_to_f32)
DEFINE_HALF_PIECE_SUM(dot_fp16, fused_fp16_to_f32)

DEFINE_REDUCTIONS(f32, float, dot_f32)
DEFINE_REDUCTIONS(f64, double, dot_f64)
DEFINE_REDUCTIONS(bf16, uint16_t, dot_bf16)
DEFINE_REDUCTIONS(fp16, uint16_t, dot_fp16)
