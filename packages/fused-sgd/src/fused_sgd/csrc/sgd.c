/* SGD over the slots of a flat buffer, each slot's gradient read where it lies.
 *
 * Per element, with p, g, b the parameter, gradient and momentum (fp16/bf16 loaded to fp32 by
 * fused_half.h; fp64 computed in double) and the operations of torch.optim.SGD(foreach=False),
 * where "fma(a, x, y)" is a*x + y rounded once, as ATen's add(y, a, alpha=x) computes it:
 *
 *     d = -g if maximize else g
 *     d = fma(p, wd, d)                       if wd != 0
 *     b = d                                   first step  } with momentum
 *     b = fma(d, damp1, b * mom)              later steps }   (damp1 = 1 - dampening)
 *     d = fma(b, mom, d) if nesterov else b
 *     p = fma(d, -lr, p)
 *
 * fp16/bf16 parameters and momentum are rounded (to nearest even) once per step.
 *
 * Slot i occupies param[offsets[i] : offsets[i] + numels[i]] (and the same range of buf); its
 * gradient is the dense array at grad_ptrs[i], with the parameter's memory order. Slots with
 * has_grad[i] == 0 are skipped. With momentum (buf != NULL), a slot with initialized[i] == 0 takes
 * the first-step branch and is then marked initialized[i] = 2 ("initialised by this call"); the
 * return value counts them.
 *
 * The elements of all slots with a gradient are split into pieces of PIECE elements, run on
 * `threads` OpenMP threads (torch's own libgomp, see fused_core.native), taken dynamically so that a
 * thread the OS delays holds up no other: a large slot spreads over
 * every thread, thousands of small ones share a piece.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "fused_half.h"
#include "fused_segments.h"

#define PIECE 32768
#define FP16_BLOCK 128

enum momentum_mode { NO_MOMENTUM, FIRST_STEP, LATER_STEP };

struct sgd_hyper { double lr, wd, mom, damp1; int nesterov, maximize; };

/* One element, computed in type C: the parameter p, gradient d and (later steps) buffer b in; the new
 * parameter and buffer out, unrounded (the caller stores them). */
#define DEFINE_ELEMENT(NAME, C, FMA)                                                                      \
    struct NAME##_out { C p, b; };                                                                        \
    FUSED_INLINE struct NAME##_out NAME(C p, C d, C b, const C lr, const C wd, const C mom, const C damp1, \
                        const int maximize, const int has_wd, const enum momentum_mode mode,              \
                        const int nesterov) {                                                             \
        if (maximize) d = -d;                                                                             \
        if (has_wd) d = FMA(p, wd, d);                                                                    \
        if (mode != NO_MOMENTUM) {                                                                        \
            b = mode == FIRST_STEP ? d : FMA(d, damp1, b * mom);                                          \
            d = nesterov ? FMA(b, mom, d) : b;                                                            \
        }                                                                                                 \
        return (struct NAME##_out){FMA(d, -lr, p), b};                                                    \
    }

DEFINE_ELEMENT(sgd_element_f32, float, fmaf)
DEFINE_ELEMENT(sgd_element_f64, double, fma)

#define SGD_FLAGS lr, wd, mom, damp1, maximize, has_wd, mode, nesterov
#define SGD_FLAG_PARAMS(C)                                                                                \
    const C lr, const C wd, const C mom, const C damp1, const int maximize, const int has_wd,             \
        const enum momentum_mode mode, const int nesterov

/* The leading elements bf16 takes its own way, and how many: the pairs of fused_half.h (all but an
 * odd last element); fp32/fp64 take FUSED_NO_PAIRS. */
FUSED_INLINE int64_t bf16_pairs(uint16_t *param, const uint16_t *grad, uint16_t *buf, int64_t n,
                                SGD_FLAG_PARAMS(float)) {
    fused_bf16_pair *restrict pw = (fused_bf16_pair *)param, *restrict bw = (fused_bf16_pair *)buf;
    const fused_bf16_pair *restrict gw = (const fused_bf16_pair *)grad;
    for (int64_t i = 0; i < n / 2; i++) {
        uint32_t b = mode == LATER_STEP ? bw[i] : 0;
        struct sgd_element_f32_out low = sgd_element_f32(fused_pair_low(pw[i]), fused_pair_low(gw[i]),
                                                         fused_pair_low(b), SGD_FLAGS);
        struct sgd_element_f32_out high = sgd_element_f32(fused_pair_high(pw[i]), fused_pair_high(gw[i]),
                                                          fused_pair_high(b), SGD_FLAGS);
        if (mode != NO_MOMENTUM) bw[i] = fused_pair_of(low.b, high.b);
        pw[i] = fused_pair_of(low.p, high.p);
    }
    return n & ~(int64_t)1;
}

/* One update over n elements, computed in type C (ELEMENT), stored as T: HEAD's elements, then the
 * rest one by one. */
#define DEFINE_UPDATE(NAME, T, C, ELEMENT, HEAD, LOAD, STORE)                                             \
    FUSED_INLINE void NAME##_special(T *restrict param, const T *restrict grad, T *restrict buf, int64_t n, \
                                     SGD_FLAG_PARAMS(C)) {                                                \
        for (int64_t i = HEAD(param, grad, buf, n, SGD_FLAGS); i < n; i++) {                              \
            struct ELEMENT##_out out = ELEMENT(LOAD(param[i]), LOAD(grad[i]),                              \
                                               mode == LATER_STEP ? LOAD(buf[i]) : (C)0, SGD_FLAGS);      \
            if (mode != NO_MOMENTUM) buf[i] = STORE(out.b);                                               \
            param[i] = STORE(out.p);                                                                      \
        }                                                                                                 \
    }                                                                                                     \
    static void NAME(T *param, const T *grad, T *buf, int64_t n, struct sgd_hyper h, enum momentum_mode mode) { \
        C lr = (C)h.lr, wd = (C)h.wd, mom = (C)h.mom, damp1 = (C)h.damp1;                                  \
        int has_wd = h.wd != 0.0;                                                                         \
        /* Each flag combination its own loop (literal arguments), so that each vectorises. */          \
        if (h.maximize && has_wd) SGD_MODES(NAME##_special, 1, 1);                                        \
        else if (h.maximize) SGD_MODES(NAME##_special, 1, 0);                                             \
        else if (has_wd) SGD_MODES(NAME##_special, 0, 1);                                                 \
        else SGD_MODES(NAME##_special, 0, 0);                                                             \
    }

/* F(param, grad, buf, n, lr, wd, mom, damp1, MAXIMIZE, HAS_WD, mode, nesterov) with every flag a literal. */
#define SGD_MODES(F, MAXIMIZE, HAS_WD)                                                                    \
    do {                                                                                                  \
        if (mode == NO_MOMENTUM) F(param, grad, buf, n, lr, wd, mom, damp1, MAXIMIZE, HAS_WD, NO_MOMENTUM, 0); \
        else if (mode == FIRST_STEP && h.nesterov) F(param, grad, buf, n, lr, wd, mom, damp1, MAXIMIZE, HAS_WD, FIRST_STEP, 1); \
        else if (mode == FIRST_STEP) F(param, grad, buf, n, lr, wd, mom, damp1, MAXIMIZE, HAS_WD, FIRST_STEP, 0); \
        else if (h.nesterov) F(param, grad, buf, n, lr, wd, mom, damp1, MAXIMIZE, HAS_WD, LATER_STEP, 1); \
        else F(param, grad, buf, n, lr, wd, mom, damp1, MAXIMIZE, HAS_WD, LATER_STEP, 0);                 \
    } while (0)

FUSED_INLINE float same_f32(float x) { return x; }
FUSED_INLINE double same_f64(double x) { return x; }

DEFINE_UPDATE(update_f32, float, float, sgd_element_f32, FUSED_NO_PAIRS, same_f32, same_f32)
DEFINE_UPDATE(update_f64, double, double, sgd_element_f64, FUSED_NO_PAIRS, same_f64, same_f64)
DEFINE_UPDATE(update_bf16, uint16_t, float, sgd_element_f32, bf16_pairs, fused_load_bf16, fused_store_bf16)

/* fp16: blocks converted to fp32 arrays on the stack (F16C where targeted), updated, stored back. */
static void update_fp16(uint16_t *param, const uint16_t *grad, uint16_t *buf, int64_t n, struct sgd_hyper h,
                        enum momentum_mode mode) {
    float p[FP16_BLOCK], g[FP16_BLOCK], b[FP16_BLOCK];
    for (int64_t start = 0; start < n; start += FP16_BLOCK) {
        int64_t count = n - start < FP16_BLOCK ? n - start : FP16_BLOCK;
        fused_fp16_to_f32(param + start, p, count);
        fused_fp16_to_f32(grad + start, g, count);
        if (mode == LATER_STEP) fused_fp16_to_f32(buf + start, b, count);
        update_f32(p, g, b, count, h, mode);
        fused_f32_to_fp16(p, param + start, count);
        if (mode != NO_MOMENTUM) fused_f32_to_fp16(b, buf + start, count);
    }
}

/* The driver: pieces of PIECE elements over the concatenation of the slots that have a gradient. */
#define DEFINE_SEGMENTS(NAME, T, UPDATE)                                                                    \
    int64_t NAME(T *param, T *buf, const int64_t *grad_ptrs, const int8_t *has_grad, const int64_t *offsets, \
                 const int64_t *numels, uint8_t *initialized, int64_t slots, double lr, double wd, double mom, \
                 double damp1, int nesterov, int maximize, int threads) {                                     \
        struct sgd_hyper h = {lr, wd, mom, damp1, nesterov, maximize};                                     \
        int64_t *starts = fused_segment_starts(has_grad, numels, slots);                                   \
        if (starts == 0) return -1;                                                                        \
        int64_t total = starts[slots], pieces = (total + PIECE - 1) / PIECE;                               \
        _Pragma("omp parallel for num_threads(threads) schedule(dynamic, 1) if(pieces > 1 && threads > 1)")    \
        for (int64_t k = 0; k < pieces; k++) {                                                             \
            int64_t from = k * PIECE, to = from + PIECE < total ? from + PIECE : total;                    \
            for (int64_t i = fused_slot_at(starts, slots, from); i < slots && starts[i] < to; i++) {    \
                if (!has_grad[i] || numels[i] == 0) continue;                                              \
                enum momentum_mode mode = buf == 0 ? NO_MOMENTUM : initialized[i] ? LATER_STEP : FIRST_STEP; \
                /* Slots whose parameters and gradients both lie back to back (bound gradients) and    \
                   that take the same branch run as one segment. */                                   \
                int64_t j = i;                                                                             \
                while (j + 1 < slots && starts[j + 1] < to &&                                              \
                       fused_back_to_back(has_grad, offsets, numels, grad_ptrs, j, (int64_t)sizeof(T)) &&  \
                       (buf == 0 || initialized[j + 1] == initialized[i]))                                 \
                    j++;                                                                                   \
                int64_t a = from > starts[i] ? from - starts[i] : 0;                                       \
                int64_t b = (to < starts[j + 1] ? to : starts[j + 1]) - starts[i];                         \
                const T *grad = (const T *)(intptr_t)grad_ptrs[i];                                         \
                UPDATE(param + offsets[i] + a, grad + a, buf == 0 ? 0 : buf + offsets[i] + a, b - a, h, mode); \
                i = j;                                                                                     \
            }                                                                                              \
        }                                                                                                  \
        return buf == 0 ? 0 : fused_mark_started(has_grad, initialized, slots);                            \
    }

DEFINE_SEGMENTS(sgd_segments_f32, float, update_f32)
DEFINE_SEGMENTS(sgd_segments_f64, double, update_f64)
DEFINE_SEGMENTS(sgd_segments_bf16, uint16_t, update_bf16)
DEFINE_SEGMENTS(sgd_segments_fp16, uint16_t, update_fp16)
