/* Lion over the slots of a flat buffer, each slot's gradient read where it lies.
 *
 * Per element, with p, g, m the parameter, gradient and exp_avg (fp16/bf16 loaded to fp32 by
 * fused_half.h; fp64 computed in double), the operations of fused_lion.reference.Lion (the paper's
 * reference implementation), each rounded where ATen's CPU kernels round it. "fma(a, x, y)" is
 * a*x + y rounded once, as ATen's add(y, a, alpha=x) computes it; the other products and sums are
 * rounded one by one:
 *
 *     g = -g                       maximize         grad = -grad (its sign bit flipped)
 *     p = p * decay                wd != 0          param.mul_(1 - lr * wd)
 *     c = m * beta1 + g * c1       c1 = 1 - beta1   exp_avg * beta1 + grad * (1 - beta1)
 *     s = (c > 0) - (c < 0)                         c.sign_(): 0 for zeros and NaN, as torch's CPU sign
 *     p = fma(s, -lr, p)                            param.add_(c, alpha=-lr)
 *     m = fma(g, c2, m * beta2)    c2 = 1 - beta2   exp_avg.mul_(beta2).add_(grad, alpha=c2)
 *
 * The caller passes decay as the step computes it (in float32 for a float32 tensor lr) and -lr as
 * a double; c1 and c2 are computed here in double, as Python computes them, and every scalar is
 * converted to the compute type as ATen converts a Scalar argument. fp16/bf16 use the fp32
 * arithmetic and round p and m (to nearest even) once per step.
 *
 * Slot i occupies param[offsets[i] : offsets[i] + numels[i]] (and the same range of exp_avg); its
 * gradient is the dense array at grad_ptrs[i], with the parameter's memory order. Slots with
 * has_grad[i] == 0 are skipped. A slot whose state is not initialised (initialized[i] == 0) starts
 * from exp_avg = 0 (its range is zeroed, never read before) and is then marked initialized[i] = 2;
 * the return value counts them (-1: out of memory).
 *
 * The elements of all slots with a gradient are split into pieces of PIECE elements, run on
 * `threads` OpenMP threads (torch's own libgomp, see fused_core.native), taken dynamically, as in
 * fused-sgd's sgd.c. Memory is crossed once: p, g, m read, p, m written. Built with
 * -ffp-contract=off (no fusing but the explicit fma calls): every flag set gives the same bits.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fused_half.h"
#include "fused_segments.h"

#define PIECE 32768
#define FP16_BLOCK 256

struct lion_hyper { double neg_lr, decay, beta1, beta2; int has_decay, maximize; };

/* One element's update, computed in type C, in place: p, g, m the loaded values in, p and m the
 * new parameter and exp_avg out (unrounded; the caller stores them). */
#define LION_VALUES(C, FMA, p, g, m)                                                                       \
    if (maximize) g = -g;                                                                                  \
    if (has_decay) p = p * decay;                                                                          \
    {                                                                                                      \
        C c = m * beta1 + g * c1;                                                                          \
        C s = (C)(c > 0) - (C)(c < 0);                                                                     \
        p = FMA(s, neg_lr, p);                                                                             \
        m = FMA(g, c2, m * beta2);                                                                         \
    }

#define LION_FLAG_PARAMS(C)                                                                                \
    const C neg_lr, const C decay, const C beta1, const C c1, const C beta2, const C c2, const int has_decay, \
        const int maximize
#define LION_FLAGS neg_lr, decay, beta1, c1, beta2, c2, has_decay, maximize

/* The leading elements bf16 takes its own way, and how many: the pairs of fused_half.h (all but an
 * odd last element); fp32/fp64 take FUSED_NO_PAIRS. */
FUSED_INLINE int64_t bf16_pairs(uint16_t *param, const uint16_t *grad, uint16_t *exp_avg, int64_t n,
                                LION_FLAG_PARAMS(float)) {
    fused_bf16_pair *restrict pw = (fused_bf16_pair *)param, *restrict mw = (fused_bf16_pair *)exp_avg;
    const fused_bf16_pair *restrict gw = (const fused_bf16_pair *)grad;
    for (int64_t i = 0; i < n / 2; i++) {
        float p0 = fused_pair_low(pw[i]), g0 = fused_pair_low(gw[i]), m0 = fused_pair_low(mw[i]);
        float p1 = fused_pair_high(pw[i]), g1 = fused_pair_high(gw[i]), m1 = fused_pair_high(mw[i]);
        LION_VALUES(float, fmaf, p0, g0, m0)
        LION_VALUES(float, fmaf, p1, g1, m1)
        pw[i] = fused_pair_of(p0, p1);
        mw[i] = fused_pair_of(m0, m1);
    }
    return n & ~(int64_t)1;
}

/* One step over n elements, computed in type C, stored as T: HEAD's elements, then the rest one by
 * one. NAME##_loop takes its flags as compile-time constants in each call of NAME, so that every
 * combination is its own loop, which vectorises. */
#define DEFINE_UPDATE(NAME, T, C, FMA, LOAD, STORE, HEAD)                                                  \
    FUSED_INLINE void NAME##_loop(T *restrict param, const T *restrict grad, T *restrict exp_avg, int64_t n, \
                                  LION_FLAG_PARAMS(C)) {                                                   \
        for (int64_t i = HEAD(param, grad, exp_avg, n, LION_FLAGS); i < n; i++) {                          \
            C p = LOAD(param[i]), g = LOAD(grad[i]), m = LOAD(exp_avg[i]);                                 \
            LION_VALUES(C, FMA, p, g, m)                                                                   \
            param[i] = STORE(p);                                                                           \
            exp_avg[i] = STORE(m);                                                                         \
        }                                                                                                  \
    }                                                                                                      \
    static void NAME(T *param, const T *grad, T *exp_avg, int64_t n, const struct lion_hyper *h) {         \
        const C neg_lr = (C)h->neg_lr, decay = (C)h->decay, beta1 = (C)h->beta1, beta2 = (C)h->beta2;      \
        const C c1 = (C)(1.0 - h->beta1), c2 = (C)(1.0 - h->beta2);                                        \
        if (h->has_decay && h->maximize)                                                                   \
            NAME##_loop(param, grad, exp_avg, n, neg_lr, decay, beta1, c1, beta2, c2, 1, 1);               \
        else if (h->has_decay)                                                                             \
            NAME##_loop(param, grad, exp_avg, n, neg_lr, decay, beta1, c1, beta2, c2, 1, 0);               \
        else if (h->maximize)                                                                              \
            NAME##_loop(param, grad, exp_avg, n, neg_lr, decay, beta1, c1, beta2, c2, 0, 1);               \
        else                                                                                               \
            NAME##_loop(param, grad, exp_avg, n, neg_lr, decay, beta1, c1, beta2, c2, 0, 0);               \
    }

FUSED_INLINE float same_f32(float x) { return x; }
FUSED_INLINE double same_f64(double x) { return x; }

DEFINE_UPDATE(update_f32, float, float, fmaf, same_f32, same_f32, FUSED_NO_PAIRS)
DEFINE_UPDATE(update_f64, double, double, fma, same_f64, same_f64, FUSED_NO_PAIRS)
DEFINE_UPDATE(update_bf16, uint16_t, float, fmaf, fused_load_bf16, fused_store_bf16, bf16_pairs)

/* fp16: blocks converted to fp32 arrays on the stack (F16C where targeted), updated, stored back. */
static void update_fp16(uint16_t *param, const uint16_t *grad, uint16_t *exp_avg, int64_t n,
                        const struct lion_hyper *h) {
    float p[FP16_BLOCK], g[FP16_BLOCK], m[FP16_BLOCK];
    for (int64_t at = 0; at < n; at += FP16_BLOCK) {
        int64_t count = n - at < FP16_BLOCK ? n - at : FP16_BLOCK;
        fused_fp16_to_f32(param + at, p, count);
        fused_fp16_to_f32(grad + at, g, count);
        fused_fp16_to_f32(exp_avg + at, m, count);
        update_f32(p, g, m, count, h);
        fused_f32_to_fp16(p, param + at, count);
        fused_f32_to_fp16(m, exp_avg + at, count);
    }
}

/* The driver: pieces of PIECE elements over the concatenation of the slots that have a gradient. */
#define DEFINE_SEGMENTS(NAME, T, UPDATE)                                                                     \
    int64_t NAME(T *param, T *exp_avg, const int64_t *grad_ptrs, const int8_t *has_grad,                   \
                 const int64_t *offsets, const int64_t *numels, uint8_t *initialized, int64_t slots,        \
                 double neg_lr, double decay, double beta1, double beta2, int has_decay, int maximize,      \
                 int threads) {                                                                              \
        struct lion_hyper h = {neg_lr, decay, beta1, beta2, has_decay, maximize};                           \
        int64_t *starts = fused_segment_starts(has_grad, numels, slots);                                    \
        if (starts == 0) return -1;                                                                         \
        int64_t total = starts[slots], pieces = (total + PIECE - 1) / PIECE;                                \
        _Pragma("omp parallel for num_threads(threads) schedule(dynamic, 1) if(pieces > 1 && threads > 1)") \
        for (int64_t k = 0; k < pieces; k++) {                                                              \
            int64_t from = k * PIECE, to = from + PIECE < total ? from + PIECE : total;                     \
            for (int64_t i = fused_slot_at(starts, slots, from); i < slots && starts[i] < to; i++) {        \
                if (!has_grad[i] || numels[i] == 0) continue;                                               \
                /* Slots whose parameters and gradients both lie back to back (bound gradients) run   \
                   as one segment. */                                                                   \
                int64_t j = i;                                                                              \
                while (j + 1 < slots && starts[j + 1] < to &&                                               \
                       fused_back_to_back(has_grad, offsets, numels, grad_ptrs, j, (int64_t)sizeof(T)))     \
                    j++;                                                                                    \
                int64_t a = from > starts[i] ? from - starts[i] : 0;                                        \
                int64_t b = (to < starts[j + 1] ? to : starts[j + 1]) - starts[i];                          \
                const T *grad = (const T *)(intptr_t)grad_ptrs[i];                                          \
                T *m = exp_avg + offsets[i] + a;                                                            \
                /* Zero state where a slot starts (slot by slot: a merged segment's slots may differ). */ \
                for (int64_t q = i; q <= j; q++) {                                                          \
                    if (initialized[q]) continue;                                                           \
                    int64_t lo = starts[q] - starts[i] > a ? starts[q] - starts[i] : a;                     \
                    int64_t hi = starts[q + 1] - starts[i] < b ? starts[q + 1] - starts[i] : b;             \
                    if (hi > lo) memset(m + (lo - a), 0, (size_t)(hi - lo) * sizeof(T));                    \
                }                                                                                           \
                UPDATE(param + offsets[i] + a, grad + a, m, b - a, &h);                                     \
                i = j;                                                                                      \
            }                                                                                               \
        }                                                                                                   \
        return fused_mark_started(has_grad, initialized, slots);                                            \
    }

DEFINE_SEGMENTS(lion_segments_f32, float, update_f32)
DEFINE_SEGMENTS(lion_segments_f64, double, update_f64)
DEFINE_SEGMENTS(lion_segments_bf16, uint16_t, update_bf16)
DEFINE_SEGMENTS(lion_segments_fp16, uint16_t, update_fp16)
