/* SGD on fp16 and bf16 flat slices in one pass over memory, computed in fp32, rounded once.
 *
 * Per element, with p, g, b loaded to fp32 (fused_half.h), sign = -1 if maximize else 1 and
 * damp1 = 1 - dampening (fused_sgd.kernels.sgd_composite's math):
 *
 *     d = sign * g
 *     d = d + wd * p                      if wd != 0
 *     b = d                               first step  } if a momentum buffer is given
 *     b = mom * b + damp1 * d             later steps }
 *     d = d + mom * b if nesterov else b
 *     p = p - lr * d
 *
 * then p (and b) are stored rounded to nearest even. Each flag combination gets its own
 * branch-free loop, so that it vectorises. bf16 converts inside the loop (a shift and a
 * rounding add); fp16 converts blocks of FP16_BLOCK elements to fp32 arrays on the stack
 * (with x86's F16C where the compiler targets it), which measured faster than converting
 * inside the loop.
 *
 * The exported functions split n into pieces of PIECE elements over `threads` OpenMP threads.
 * Built with -fopenmp, this library binds to the libgomp already loaded by torch, so the
 * pieces run on torch's own intra-op threads (no second pool competing for the cores);
 * built without it, the pragma is ignored and one thread does all.
 */
#include <stdint.h>

#include "fused_half.h"

#define FP16_BLOCK 128
#define PIECE 32768

enum momentum_mode { NO_MOMENTUM, FIRST_STEP, LATER_STEP };

struct sgd_hyper { float lr, wd, mom, damp1, sign; };

FUSED_INLINE float f32_load(float x) { return x; }
FUSED_INLINE float f32_store(float x) { return x; }

/* The specialised loop for these flags (constants, so each call site compiles to its own loop). */
#define BY_MODE(NAME, HAS_WD)                                                                            \
    do {                                                                                                 \
        if (mode == NO_MOMENTUM) NAME##_special(param, grad, buf, n, h, HAS_WD, NO_MOMENTUM, 0);          \
        else if (mode == FIRST_STEP && nesterov) NAME##_special(param, grad, buf, n, h, HAS_WD, FIRST_STEP, 1); \
        else if (mode == FIRST_STEP) NAME##_special(param, grad, buf, n, h, HAS_WD, FIRST_STEP, 0);       \
        else if (nesterov) NAME##_special(param, grad, buf, n, h, HAS_WD, LATER_STEP, 1);                 \
        else NAME##_special(param, grad, buf, n, h, HAS_WD, LATER_STEP, 0);                               \
    } while (0)

/* NAME(param, grad, buf, n, hyper, mode, nesterov): the update over n elements of type T. */
#define DEFINE_SGD_LOOP(NAME, T, LOAD, STORE)                                                             \
    FUSED_INLINE void NAME##_special(T *restrict param, const T *restrict grad, T *restrict buf, int64_t n, \
                                     struct sgd_hyper h, const int has_wd, const enum momentum_mode mode, \
                                     const int nesterov) {                                                \
        for (int64_t i = 0; i < n; i++) {                                                                 \
            float p = LOAD(param[i]);                                                                     \
            float d = h.sign * LOAD(grad[i]);                                                             \
            if (has_wd) d = d + h.wd * p;                                                                 \
            if (mode != NO_MOMENTUM) {                                                                    \
                float m = mode == FIRST_STEP ? d : h.mom * LOAD(buf[i]) + h.damp1 * d;                    \
                buf[i] = STORE(m);                                                                        \
                d = nesterov ? d + h.mom * m : m;                                                         \
            }                                                                                             \
            param[i] = STORE(p - h.lr * d);                                                               \
        }                                                                                                 \
    }                                                                                                     \
    static void NAME(T *restrict param, const T *restrict grad, T *restrict buf, int64_t n,               \
                     struct sgd_hyper h, enum momentum_mode mode, int nesterov) {                         \
        if (h.wd != 0.0f) BY_MODE(NAME, 1);                                                               \
        else BY_MODE(NAME, 0);                                                                            \
    }

DEFINE_SGD_LOOP(sgd_loop_bf16, uint16_t, fused_load_bf16, fused_store_bf16)
DEFINE_SGD_LOOP(sgd_loop_f32, float, f32_load, f32_store)

static void sgd_piece_fp16(uint16_t *param, const uint16_t *grad, uint16_t *buf, int64_t n,
                           struct sgd_hyper h, enum momentum_mode mode, int nesterov) {
    float p[FP16_BLOCK], g[FP16_BLOCK], b[FP16_BLOCK];
    for (int64_t start = 0; start < n; start += FP16_BLOCK) {
        int64_t count = n - start < FP16_BLOCK ? n - start : FP16_BLOCK;
        fused_fp16_to_f32(param + start, p, count);
        fused_fp16_to_f32(grad + start, g, count);
        if (mode == LATER_STEP) fused_fp16_to_f32(buf + start, b, count);
        sgd_loop_f32(p, g, b, count, h, mode, nesterov);
        fused_f32_to_fp16(p, param + start, count);
        if (mode != NO_MOMENTUM) fused_f32_to_fp16(b, buf + start, count);
    }
}

/* Exported: sgd_bf16 (converting inside the loop) and sgd_fp16 (by blocks). buf is NULL without momentum; damp1 = 1 - dampening. */
#define DEFINE_SGD_EXPORT(NAME, PIECE_FUNCTION)                                                            \
    void NAME(uint16_t *param, const uint16_t *grad, uint16_t *buf, int64_t n, float lr, float wd,         \
              float mom, float damp1, int nesterov, int maximize, int first, int threads) {                \
        struct sgd_hyper h = {lr, wd, mom, damp1, maximize ? -1.0f : 1.0f};                                \
        enum momentum_mode mode = buf == 0 ? NO_MOMENTUM : first ? FIRST_STEP : LATER_STEP;                \
        int64_t pieces = (n + PIECE - 1) / PIECE;                                                          \
        _Pragma("omp parallel for num_threads(threads) schedule(static) if(pieces > 1 && threads > 1)")    \
        for (int64_t k = 0; k < pieces; k++) {                                                             \
            int64_t start = k * PIECE, count = n - start < PIECE ? n - start : PIECE;                      \
            PIECE_FUNCTION(param + start, grad + start, buf == 0 ? 0 : buf + start, count, h, mode, nesterov); \
        }                                                                                                  \
    }

DEFINE_SGD_EXPORT(sgd_bf16, sgd_loop_bf16)
DEFINE_SGD_EXPORT(sgd_fp16, sgd_piece_fp16)
