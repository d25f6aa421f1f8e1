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

/* One update over n elements, computed in type C, stored as T. */
#define DEFINE_UPDATE(NAME, T, C, FMA, LOAD, STORE)                                                       \
    FUSED_INLINE void NAME##_special(T *restrict param, const T *restrict grad, T *restrict buf, int64_t n, \
                                     C lr, C wd, C mom, C damp1, const int maximize, const int has_wd,   \
                                     const enum momentum_mode mode, const int nesterov) {                \
        for (int64_t i = 0; i < n; i++) {                                                                 \
            C p = LOAD(param[i]);                                                                         \
            C d = LOAD(grad[i]);                                                                          \
            if (maximize) d = -d;                                                                         \
            if (has_wd) d = FMA(p, wd, d);                                                                \
            if (mode != NO_MOMENTUM) {                                                                    \
                C b = mode == FIRST_STEP ? d : FMA(d, damp1, LOAD(buf[i]) * mom);                         \
                buf[i] = STORE(b);                                                                        \
                d = nesterov ? FMA(b, mom, d) : b;                                                        \
            }                                                                                             \
            param[i] = STORE(FMA(d, -lr, p));                                                             \
        }                                                                                                 \
    }                                                                                                     \
    static void NAME(T *param, const T *grad, T *buf, int64_t n, struct sgd_hyper h, enum momentum_mode mode) { \
        C lr = (C)h.lr, wd = (C)h.wd, mom = (C)h.mom, damp1 = (C)h.damp1;                                  \
        int has_wd = h.wd != 0.0;                                                                         \
        /* Each flag combination its own loop (constant arguments), so that each vectorises. */          \
        for (int maximize = 0; maximize < 2; maximize++)                                                  \
            for (int wd_on = 0; wd_on < 2; wd_on++) {                                                     \
                if (maximize != h.maximize || wd_on != has_wd) continue;                                  \
                if (mode == NO_MOMENTUM) NAME##_special(param, grad, buf, n, lr, wd, mom, damp1, maximize, wd_on, NO_MOMENTUM, 0); \
                else if (mode == FIRST_STEP && h.nesterov) NAME##_special(param, grad, buf, n, lr, wd, mom, damp1, maximize, wd_on, FIRST_STEP, 1); \
                else if (mode == FIRST_STEP) NAME##_special(param, grad, buf, n, lr, wd, mom, damp1, maximize, wd_on, FIRST_STEP, 0); \
                else if (h.nesterov) NAME##_special(param, grad, buf, n, lr, wd, mom, damp1, maximize, wd_on, LATER_STEP, 1); \
                else NAME##_special(param, grad, buf, n, lr, wd, mom, damp1, maximize, wd_on, LATER_STEP, 0); \
            }                                                                                             \
    }

FUSED_INLINE float same_f32(float x) { return x; }
FUSED_INLINE double same_f64(double x) { return x; }

DEFINE_UPDATE(update_f32, float, float, fmaf, same_f32, same_f32)
DEFINE_UPDATE(update_f64, double, double, fma, same_f64, same_f64)
DEFINE_UPDATE(update_bf16, uint16_t, float, fmaf, fused_load_bf16, fused_store_bf16)

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
