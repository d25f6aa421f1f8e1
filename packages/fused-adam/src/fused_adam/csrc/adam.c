/* Adam and AdamW over the slots of a flat buffer, each slot's gradient read where it lies.
 *
 * Per element, with p, g, m, v, mx the parameter, gradient, exp_avg, exp_avg_sq and
 * max_exp_avg_sq (fp16/bf16 loaded to fp32 by fused_half.h; fp64 computed in double), the
 * operations of torch 2.13's torch.optim.Adam/AdamW(foreach=False) (the non-capturable
 * _single_tensor_adam), each rounded where ATen's CPU kernel rounds it. "fma(a, x, y)" is a*x + y
 * rounded once: ATen's add(alpha=), lerp and addcmul are fused multiply-adds (in their vectorised
 * loops and their scalar tails alike), addcdiv and the division by a Python float are not:
 *
 *     g  = -g                                   maximize        grad = -grad (its sign bit flipped)
 *     p  = p * decay                            AdamW, wd != 0  param.mul_(1 - lr * wd)
 *     g  = fma(p, wd, g)                        Adam,  wd != 0  grad.add(param, alpha=wd)
 *     m  = fma(w, g - m, m)      if |w| < 0.5,  w = 1 - beta1   exp_avg.lerp_(grad, w)
 *          fma(w - 1, g - m, g)  otherwise
 *     v  = fma(c2 * g, g, v * beta2)            c2 = 1 - beta2  exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=c2)
 *     mx = maximum(mx, v), NaN if either is     amsgrad         torch.maximum(max_exp_avg_sq, exp_avg_sq, out=...)
 *     d  = SQRT(amsgrad ? mx : v) / bc2_sqrt + eps              (exp_avg_sq.sqrt() / bc2_sqrt).add_(eps)
 *     p  = p + (-step_size * m) / d                             param.addcdiv_(exp_avg, denom, value=-step_size)
 *
 * SQRT is, in fp64 and in fp32 with torch_sqrt = 1, torch's CPU sqrt: where torch is built with MKL
 * (x86-64 Linux and Windows wheels), ATen's vml.h computes it with MKL's vmsSqrt/vmdSqrt(VML_HA |
 * VML_FTZDAZ_OFF | VML_ERRMODE_IGNORE), which is not correctly rounded (one fp32 result in 130 to
 * 150 is 1 ulp off sqrt() on an AVX-512 Intel CPU, one in 6 on an AVX2 AMD one, where it also costs
 * as much as the rest of the update). In fp32 with torch_sqrt = 0 (the default of
 * fused_core.kernels' FUSED_OPTIM_TORCH_SQRT), fp16 and bf16, SQRT is sqrtf(), correctly rounded,
 * as torch's fused kernels take it, in one loop per element (DEFINE_DIRECT). For torch's, the
 * kernel calls the very functions, found in the loaded libtorch_cpu (or its dependencies), on
 * blocks of BLOCK values, with MKL sequential on its threads; where they are not there (torch
 * without MKL) it uses sqrt(), which is what ATen's Vectorized<T>::sqrt computes (fused-core's
 * fused_sqrt.h, shared with fused-rmsprop's rmsprop.c). NaN payloads are not reproduced (torch's
 * own differ between its vectorised loops and their scalar tails).
 *
 * The scalars, for a slot at step t (the count after this step's increment, as torch uses it), are
 * computed in double as Python computes them:
 *
 *     bc1 = 1 - beta1**t,  bc2 = 1 - beta2**t,  bc2_sqrt = pow(bc2, 0.5)   (Python's bc2 ** 0.5)
 *     step_size = lr / bc1,  decay = 1 - lr * wd
 *
 * except where lr is a float32 tensor (lr_single): torch then computes these two as float32 tensor
 * ops, step_size = (float)lr / (float)bc1 and decay = 1.0f - (float)lr * (float)wd, each operation
 * rounded to float. Each scalar is then converted to the compute type as ATen converts a Scalar
 * argument: (float)(1 - beta1), (float)(1 - beta2), (float)-step_size, ... in fp32.
 *
 * Slots whose state is not initialised (initialized[i] == 0) start from torch's zero state: their
 * ranges of m, v and mx are zeroed (piece by piece, just before the update reads them back from
 * cache), never read before; they are then marked initialized[i] = 2, and the return value counts
 * them (-1: out of memory). fp16/bf16 use the fp32 arithmetic above, except that SQRT is the
 * correctly rounded sqrtf() (the processor's instruction, as torch's fused kernels take it; fp16/bf16
 * results are not torch's bits anyway), and round p, m, v and mx (to nearest even) once per step.
 *
 * Slot i occupies param[offsets[i] : offsets[i] + numels[i]] (and the same range of each state
 * buffer); its gradient is the dense array at grad_ptrs[i], with the parameter's memory order.
 * Slots with has_grad[i] == 0 are skipped. steps[i] (float32, or float64 with steps_double) is the
 * slot's step count t; with count_steps the kernel counts this step into it first, as torch does
 * (t = 1 where the slot's state starts now, t + 1 where it has a gradient), else the caller has.
 *
 * The elements of all slots with a gradient are split into pieces of PIECE elements, run on
 * `threads` OpenMP threads (torch's own libgomp, see fused_core.native), taken dynamically, as in
 * fused-sgd's sgd.c. Memory is crossed once: p, g, m, v (mx) read, p, m, v (mx) written. With the
 * correctly rounded square root (DEFINE_DIRECT) that is one loop per element. With torch's
 * (DEFINE_UPDATE: fp64, fp32 with torch_sqrt), within a block of BLOCK elements, a first loop
 * updates the state and leaves p, m and the sqrt argument in small fp32/fp64 scratch arrays (in
 * L1), the square roots are taken, a second loop updates p; the next blocks' cache lines are
 * prefetched meanwhile. Segments shorter than a block share one: each thread stages consecutive
 * segments' first loops in its scratch arrays and takes one square root call per full block
 * (DEFINE_STAGED); the scalars are computed once per run of equal steps, and a later small slot's
 * (scattered) lines are prefetched. Built with -ffp-contract=off (no fusing but the
 * explicit fma calls) and -fno-math-errno (so that the fallback sqrt vectorises; the bits are the
 * same without it); every flag set of fused_core.native gives the same bits.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fused_half.h"
#include "fused_segments.h"
#include "fused_sqrt.h"

#define PIECE 32768
#define BLOCK 256
#define PREFETCH_AHEAD (2 * BLOCK)

/* 1 where the kernels take MKL's square roots (torch built with MKL), 0 where sqrt()'s. */
int adam_sqrt_is_mkl(void) { return fused_sqrt_is_mkl(); }

/* ------------------------------------------------------------------------------------------------
 * The update. */

/* Asks for the cache lines of `bytes` bytes of each array: the block PREFETCH_AHEAD elements on,
 * so that memory keeps streaming while a block's second loop computes (the hardware prefetchers
 * idle then; 20% faster on one core). */
FUSED_INLINE void prefetch(const void *param, const void *grad, const void *exp_avg, const void *exp_avg_sq,
                           const void *max_exp_avg_sq, int64_t bytes) {
    for (int64_t b = 0; b < bytes; b += 64) {
        __builtin_prefetch((const char *)param + b, 1);
        __builtin_prefetch((const char *)grad + b, 0);
        __builtin_prefetch((const char *)exp_avg + b, 1);
        __builtin_prefetch((const char *)exp_avg_sq + b, 1);
        if (max_exp_avg_sq != 0) __builtin_prefetch((const char *)max_exp_avg_sq + b, 1);
    }
}

/* prefetch() of the block PREFETCH_AHEAD elements (of `itemsize` bytes) after element `at`, where
 * that block lies within the `n` elements of the arrays (max_exp_avg_sq may be NULL). */
FUSED_INLINE void prefetch_next_block(const void *param, const void *grad, const void *exp_avg,
                                      const void *exp_avg_sq, const void *max_exp_avg_sq, int64_t at, int64_t n,
                                      int64_t itemsize) {
    const int64_t ahead = at + PREFETCH_AHEAD, offset = ahead * itemsize;
    if (ahead + BLOCK > n) return;
    prefetch((const char *)param + offset, (const char *)grad + offset, (const char *)exp_avg + offset,
             (const char *)exp_avg_sq + offset, max_exp_avg_sq == 0 ? 0 : (const char *)max_exp_avg_sq + offset,
             BLOCK * itemsize);
}

enum weight_decay_mode { WD_NONE, WD_L2, WD_DECOUPLED };

struct adam_hyper {
    double lr, beta1, beta2, eps, wd;
    int decoupled, maximize, lr_single, amsgrad;
};

/* The scalars of one step, in double, before their conversion to the compute type. */
struct adam_scalars {
    double lerp_weight, c2, beta2, wd, decay, bc2_sqrt, eps, neg_step_size;
};

static struct adam_scalars adam_scalars(const struct adam_hyper *h, double step) {
    double bc1 = 1.0 - pow(h->beta1, step), bc2 = 1.0 - pow(h->beta2, step);
    struct adam_scalars s;
    s.lerp_weight = 1.0 - h->beta1;
    s.c2 = 1.0 - h->beta2;
    s.beta2 = h->beta2;
    s.wd = h->wd;
    s.eps = h->eps;
    s.bc2_sqrt = pow(bc2, 0.5); /* Python's bc2 ** 0.5 is pow(), not sqrt() */
    if (h->lr_single) {         /* lr / bc1 and 1 - lr * wd as float32 tensor ops */
        float lr = (float)h->lr;
        s.neg_step_size = -(double)(lr / (float)bc1);
        s.decay = (double)(1.0f - lr * (float)h->wd);
    } else {
        s.neg_step_size = -(h->lr / bc1);
        s.decay = 1.0 - h->lr * h->wd;
    }
    return s;
}

/* maximize and lerp's branch without loops of their own: g's sign bit flipped under a mask (exactly
 * torch's neg), lerp's base picked by a mask (both of its branches are fma(coef, g - m, base)). */
FUSED_INLINE float flip_f32(float x, uint32_t sign) { return fused_bits_to_f32(fused_f32_to_bits(x) ^ sign); }
FUSED_INLINE float pick_f32(uint32_t mask, float a, float b) {
    return fused_bits_to_f32((fused_f32_to_bits(a) & mask) | (fused_f32_to_bits(b) & ~mask));
}
FUSED_INLINE uint64_t f64_bits(double x) { uint64_t u; memcpy(&u, &x, 8); return u; }
FUSED_INLINE double bits_f64(uint64_t u) { double x; memcpy(&x, &u, 8); return x; }
FUSED_INLINE double flip_f64(double x, uint64_t sign) { return bits_f64(f64_bits(x) ^ sign); }
FUSED_INLINE double pick_f64(uint64_t mask, double a, double b) {
    return bits_f64((f64_bits(a) & mask) | (f64_bits(b) & ~mask));
}

/* The update of one element's values, computed in type C, in the scope of the loops below: the
 * local variables p, g, m, v and (amsgrad) mx hold the loaded values and are updated in place, p
 * to the (decayed) parameter before its step, m, v and mx to the new state. The weight decay and
 * amsgrad flags are compile-time constants in each call (ADAM_DISPATCH), so that every
 * combination is its own branch-free loop, which vectorises. */
#define ADAM_VALUES(C, FMA, FLIP, PICK, p, g, m, v, mx)                                                   \
    g = FLIP(g, sign);                                                                                    \
    if (wd_mode == WD_DECOUPLED) p = p * decay;                                                           \
    if (wd_mode == WD_L2) g = FMA(p, wd, g);                                                              \
    m = FMA(coef, g - m, PICK(lerp_base_is_m, m, g));                                                     \
    v = FMA(c2 * g, g, v * beta2);                                                                        \
    if (amsgrad) mx = (mx != mx || v != v) ? (C)NAN : mx > v ? mx : v;

/* The state update of element i: loads p, g, m, v (mx), stores m, v (mx), and leaves the (decayed)
 * p, the new m and the sqrt argument v (mx under amsgrad) in local variables p, m and v. */
#define ADAM_ELEMENT(C, FMA, FLIP, PICK, LOAD, STORE)                                                    \
    C p = LOAD(param[i]), g = LOAD(grad[i]), m = LOAD(exp_avg[i]), v = LOAD(exp_avg_sq[i]);              \
    C mx = amsgrad ? LOAD(max_exp_avg_sq[i]) : (C)0;                                                      \
    ADAM_VALUES(C, FMA, FLIP, PICK, p, g, m, v, mx)                                                       \
    exp_avg[i] = STORE(m);                                                                                \
    exp_avg_sq[i] = STORE(v);                                                                             \
    if (amsgrad) {                                                                                        \
        max_exp_avg_sq[i] = STORE(mx);                                                                    \
        v = mx;                                                                                           \
    }

/* The scalars of a step in the compute type C (U: its bits), as the loops take them. */
#define ADAM_CONSTANTS(C, U)                                                                              \
    const C w = (C)s->lerp_weight;                                                                        \
    const int small = fabs((double)w) < 0.5; /* ATen's lerp: |weight| < 0.5, weight in C */              \
    const C k[5] = {small ? w : w - (C)1, (C)s->c2, (C)s->beta2, (C)s->wd, (C)s->decay};                  \
    const U sign = h->maximize ? (U)1 << (8 * sizeof(U) - 1) : 0, lerp_base_is_m = small ? ~(U)0 : 0;     \
    const C bc2_sqrt = (C)s->bc2_sqrt, eps = (C)s->eps, neg_step_size = (C)s->neg_step_size;              \
    const int wd_mode = h->wd == 0.0 ? WD_NONE : h->decoupled ? WD_DECOUPLED : WD_L2

/* One step over n elements in one loop, computed in type C (U: its bits) with the correctly rounded
 * square root SQRT (the processor's), stored as T: the kernel of fp32 without torch_sqrt, of bf16,
 * and of fp16's fp32 blocks (see the top comment). */
#define DEFINE_DIRECT(NAME, T, C, U, FMA, FLIP, PICK, SQRT, LOAD, STORE, HEAD)                            \
    FUSED_INLINE void NAME##_loop(T *restrict param, const T *restrict grad, T *restrict exp_avg,         \
                                  T *restrict exp_avg_sq, T *restrict max_exp_avg_sq, int64_t n,          \
                                  const C *restrict k, const U sign, const U lerp_base_is_m,              \
                                  const C bc2_sqrt, const C eps, const C neg_step_size,                   \
                                  const int wd_mode, const int amsgrad) {                                 \
        const C coef = k[0], c2 = k[1], beta2 = k[2], wd = k[3], decay = k[4];                            \
        int64_t head = HEAD(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, n, k, sign, lerp_base_is_m, \
                            bc2_sqrt, eps, neg_step_size, wd_mode, amsgrad);                              \
        for (int64_t i = head; i < n; i++) {                                                              \
            ADAM_ELEMENT(C, FMA, FLIP, PICK, LOAD, STORE)                                                 \
            param[i] = STORE(p + neg_step_size * m / (SQRT(v) / bc2_sqrt + eps));                         \
        }                                                                                                 \
    }                                                                                                     \
    static void NAME(T *param, const T *grad, T *exp_avg, T *exp_avg_sq, T *max_exp_avg_sq, int64_t n,    \
                     const struct adam_hyper *h, const struct adam_scalars *s) {                          \
        ADAM_CONSTANTS(C, U);                                                                             \
        ADAM_DISPATCH(NAME##_loop, (param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, n, k, sign,         \
                                    lerp_base_is_m, bc2_sqrt, eps, neg_step_size), wd_mode, h->amsgrad);  \
    }

/* One step over n elements, computed in type C (U: its bits; SQRT_BLOCK: its block square root,
 * torch's), stored as T, in blocks: NAME##_state is the first loop of a block: it updates and stores
 * the state and leaves the (decayed) p, m and the sqrt argument in C scratch arrays; the square
 * roots of the block are taken in one call; a second loop updates p. */
#define DEFINE_UPDATE(NAME, T, C, U, FMA, FLIP, PICK, SQRT_BLOCK, LOAD, STORE)                            \
    FUSED_INLINE void NAME##_state(const T *restrict param, const T *restrict grad, T *restrict exp_avg,  \
                                   T *restrict exp_avg_sq, T *restrict max_exp_avg_sq, int64_t n,         \
                                   const C *restrict k, const U sign, const U lerp_base_is_m,             \
                                   C *restrict p_out, C *restrict m_out, C *restrict root_arg,            \
                                   const int wd_mode, const int amsgrad) {                                \
        const C coef = k[0], c2 = k[1], beta2 = k[2], wd = k[3], decay = k[4];                            \
        for (int64_t i = 0; i < n; i++) {                                                                 \
            ADAM_ELEMENT(C, FMA, FLIP, PICK, LOAD, STORE)                                                 \
            p_out[i] = p;                                                                                 \
            m_out[i] = m;                                                                                 \
            root_arg[i] = v;                                                                              \
        }                                                                                                 \
    }                                                                                                     \
    static void NAME(T *param, const T *grad, T *exp_avg, T *exp_avg_sq, T *max_exp_avg_sq, int64_t n,    \
                     const struct adam_hyper *h, const struct adam_scalars *s) {                          \
        ADAM_CONSTANTS(C, U);                                                                             \
        C p[BLOCK], m[BLOCK], arg[BLOCK], root[BLOCK];                                                    \
        for (int64_t at = 0; at < n; at += BLOCK) {                                                       \
            int64_t count = n - at < BLOCK ? n - at : BLOCK;                                              \
            prefetch_next_block(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, at, n, sizeof(T));      \
            ADAM_DISPATCH(NAME##_state,                                                                   \
                          (param + at, grad + at, exp_avg + at, exp_avg_sq + at,                          \
                           max_exp_avg_sq == 0 ? 0 : max_exp_avg_sq + at, count, k, sign, lerp_base_is_m, \
                           p, m, arg),                                                                    \
                          wd_mode, h->amsgrad);                                                           \
            SQRT_BLOCK(arg, root, count);                                                                 \
            T *out = param + at;                                                                          \
            for (int64_t i = 0; i < count; i++) out[i] = STORE(p[i] + neg_step_size * m[i] / (root[i] / bc2_sqrt + eps)); \
        }                                                                                                 \
    }

/* F(ARGS..., wd_mode, amsgrad) with each flag a literal constant. */
#define ADAM_CALL(F, ARGS, ...) F(ADAM_UNPACK ARGS, __VA_ARGS__)
#define ADAM_UNPACK(...) __VA_ARGS__
#define ADAM_AMS(F, ARGS, WD, amsgrad) \
    do { if (amsgrad) ADAM_CALL(F, ARGS, WD, 1); else ADAM_CALL(F, ARGS, WD, 0); } while (0)
#define ADAM_DISPATCH(F, ARGS, wd_mode, amsgrad)                                  \
    do {                                                                           \
        if (wd_mode == WD_L2) ADAM_AMS(F, ARGS, WD_L2, amsgrad);                   \
        else if (wd_mode == WD_DECOUPLED) ADAM_AMS(F, ARGS, WD_DECOUPLED, amsgrad); \
        else ADAM_AMS(F, ARGS, WD_NONE, amsgrad);                                  \
    } while (0)

/* Small segments share a block: the first loop of each segment stages its p, m and sqrt argument
 * in the thread's scratch arrays, one square root call covers the staged elements of several
 * segments, and the second loop of each staged segment then updates its p (thousands of 64-element
 * parameters would otherwise cost an MKL call each). */
#define DEFINE_STAGED(NAME, T, C, U, STATE, SQRT_BLOCK, STORE)                                             \
    struct NAME##_ctx {                                                                                   \
        int fill, segs;                                                                                   \
        C p[BLOCK], m[BLOCK], arg[BLOCK], root[BLOCK];                                                    \
        struct { T *out; int at, count; C neg_step_size, bc2_sqrt, eps; } seg[BLOCK];                     \
    };                                                                                                    \
    static void NAME##_flush(struct NAME##_ctx *c) {                                                      \
        if (c->fill == 0) return;                                                                         \
        SQRT_BLOCK(c->arg, c->root, c->fill);                                                             \
        for (int k = 0; k < c->segs; k++) {                                                               \
            T *restrict out = c->seg[k].out;                                                              \
            const C *restrict p = c->p + c->seg[k].at, *restrict m = c->m + c->seg[k].at;                 \
            const C *restrict root = c->root + c->seg[k].at;                                              \
            const C neg_step_size = c->seg[k].neg_step_size, bc2_sqrt = c->seg[k].bc2_sqrt,               \
                    eps = c->seg[k].eps;                                                                  \
            const int count = c->seg[k].count;                                                            \
            for (int i = 0; i < count; i++) out[i] = STORE(p[i] + neg_step_size * m[i] / (root[i] / bc2_sqrt + eps)); \
        }                                                                                                 \
        c->fill = 0;                                                                                      \
        c->segs = 0;                                                                                      \
    }                                                                                                     \
    static void NAME(struct NAME##_ctx *c, T *param, const T *grad, T *exp_avg, T *exp_avg_sq,            \
                     T *max_exp_avg_sq, int64_t n, const struct adam_hyper *h, const struct adam_scalars *s) { \
        ADAM_CONSTANTS(C, U);                                                                             \
        for (int64_t at = 0; at < n;) {                                                                   \
            int64_t room = BLOCK - c->fill, count = n - at < room ? n - at : room;                        \
            prefetch_next_block(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, at, n, sizeof(T));      \
            int f = c->fill;                                                                              \
            ADAM_DISPATCH(STATE,                                                                          \
                          (param + at, grad + at, exp_avg + at, exp_avg_sq + at,                          \
                           max_exp_avg_sq == 0 ? 0 : max_exp_avg_sq + at, count, k, sign, lerp_base_is_m, \
                           c->p + f, c->m + f, c->arg + f),                                               \
                          wd_mode, h->amsgrad);                                                           \
            int q = c->segs++;                                                                            \
            c->seg[q].out = param + at;                                                                   \
            c->seg[q].at = f;                                                                             \
            c->seg[q].count = (int)count;                                                                 \
            c->seg[q].neg_step_size = neg_step_size;                                                      \
            c->seg[q].bc2_sqrt = bc2_sqrt;                                                                \
            c->seg[q].eps = eps;                                                                          \
            c->fill = f + (int)count;                                                                     \
            at += count;                                                                                  \
            if (c->fill == BLOCK) NAME##_flush(c);                                                        \
        }                                                                                                 \
    }

FUSED_INLINE float same_f32(float x) { return x; }
FUSED_INLINE double same_f64(double x) { return x; }

DEFINE_UPDATE(update_f32, float, float, uint32_t, fmaf, flip_f32, pick_f32, fused_sqrt_block_f32, same_f32, same_f32)
DEFINE_UPDATE(update_f64, double, double, uint64_t, fma, flip_f64, pick_f64, fused_sqrt_block_f64, same_f64, same_f64)
DEFINE_STAGED(staged_f32, float, float, uint32_t, update_f32_state, fused_sqrt_block_f32, same_f32)
DEFINE_STAGED(staged_f64, double, double, uint64_t, update_f64_state, fused_sqrt_block_f64, same_f64)

/* The leading elements DEFINE_DIRECT's loop leaves to bf16's own loop, and how many: the pairs of
 * fused_half.h (all but an odd last element); fp32 takes FUSED_NO_PAIRS. */
FUSED_INLINE int64_t bf16_pairs(uint16_t *restrict param, const uint16_t *restrict grad, uint16_t *restrict exp_avg,
                                uint16_t *restrict exp_avg_sq, uint16_t *restrict max_exp_avg_sq, int64_t n,
                                const float *restrict k, const uint32_t sign, const uint32_t lerp_base_is_m,
                                const float bc2_sqrt, const float eps, const float neg_step_size, const int wd_mode,
                                const int amsgrad) {
    const float coef = k[0], c2 = k[1], beta2 = k[2], wd = k[3], decay = k[4];
    fused_bf16_pair *restrict pw = (fused_bf16_pair *)param, *restrict mw = (fused_bf16_pair *)exp_avg;
    fused_bf16_pair *restrict vw = (fused_bf16_pair *)exp_avg_sq, *restrict xw = (fused_bf16_pair *)max_exp_avg_sq;
    const fused_bf16_pair *restrict gw = (const fused_bf16_pair *)grad;
    for (int64_t i = 0; i < n / 2; i++) {
        uint32_t x = amsgrad ? xw[i] : 0;
        float p0 = fused_pair_low(pw[i]), g0 = fused_pair_low(gw[i]), m0 = fused_pair_low(mw[i]);
        float v0 = fused_pair_low(vw[i]), mx0 = fused_pair_low(x);
        float p1 = fused_pair_high(pw[i]), g1 = fused_pair_high(gw[i]), m1 = fused_pair_high(mw[i]);
        float v1 = fused_pair_high(vw[i]), mx1 = fused_pair_high(x);
        ADAM_VALUES(float, fmaf, flip_f32, pick_f32, p0, g0, m0, v0, mx0)
        ADAM_VALUES(float, fmaf, flip_f32, pick_f32, p1, g1, m1, v1, mx1)
        mw[i] = fused_pair_of(m0, m1);
        vw[i] = fused_pair_of(v0, v1);
        if (amsgrad) {
            xw[i] = fused_pair_of(mx0, mx1);
            v0 = mx0;
            v1 = mx1;
        }
        pw[i] = fused_pair_of(p0 + neg_step_size * m0 / (sqrtf(v0) / bc2_sqrt + eps),
                              p1 + neg_step_size * m1 / (sqrtf(v1) / bc2_sqrt + eps));
    }
    return n & ~(int64_t)1;
}

DEFINE_DIRECT(update_bf16, uint16_t, float, uint32_t, fmaf, flip_f32, pick_f32, sqrtf, fused_load_bf16,
              fused_store_bf16, bf16_pairs)
DEFINE_DIRECT(update_f32_ieee, float, float, uint32_t, fmaf, flip_f32, pick_f32, sqrtf, same_f32, same_f32,
              FUSED_NO_PAIRS)

/* fp16: blocks converted to fp32 arrays on the stack (F16C where targeted), updated, stored back. */
static void update_fp16(uint16_t *param, const uint16_t *grad, uint16_t *exp_avg, uint16_t *exp_avg_sq,
                        uint16_t *max_exp_avg_sq, int64_t n, const struct adam_hyper *h,
                        const struct adam_scalars *s) {
    float p[BLOCK], g[BLOCK], m[BLOCK], v[BLOCK], mx[BLOCK];
    int amsgrad = max_exp_avg_sq != 0;
    for (int64_t at = 0; at < n; at += BLOCK) {
        int64_t count = n - at < BLOCK ? n - at : BLOCK;
        prefetch_next_block(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, at, n, sizeof(uint16_t));
        fused_fp16_to_f32(param + at, p, count);
        fused_fp16_to_f32(grad + at, g, count);
        fused_fp16_to_f32(exp_avg + at, m, count);
        fused_fp16_to_f32(exp_avg_sq + at, v, count);
        if (amsgrad) fused_fp16_to_f32(max_exp_avg_sq + at, mx, count);
        update_f32_ieee(p, g, m, v, amsgrad ? mx : 0, count, h, s);
        fused_f32_to_fp16(p, param + at, count);
        fused_f32_to_fp16(m, exp_avg + at, count);
        fused_f32_to_fp16(v, exp_avg_sq + at, count);
        if (amsgrad) fused_f32_to_fp16(mx, max_exp_avg_sq + at, count);
    }
}

/* The one-loop kernels (DEFINE_DIRECT's, fp16's) take no square root call: nothing to stage across
 * segments. */
#define DEFINE_UNSTAGED(NAME, T, UPDATE)                                                                   \
    struct NAME##_ctx { int unused; };                                                                     \
    static void NAME##_flush(struct NAME##_ctx *c) { (void)c; }                                            \
    static void NAME(struct NAME##_ctx *c, T *param, const T *grad, T *exp_avg, T *exp_avg_sq,             \
                     T *max_exp_avg_sq, int64_t n, const struct adam_hyper *h, const struct adam_scalars *s) { \
        (void)c;                                                                                           \
        UPDATE(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, n, h, s);                                 \
    }
DEFINE_UNSTAGED(unstaged_bf16, uint16_t, update_bf16)
DEFINE_UNSTAGED(unstaged_fp16, uint16_t, update_fp16)

FUSED_INLINE int b_small(int64_t n) { return n < BLOCK; }

/* ------------------------------------------------------------------------------------------------
 * The driver: pieces of PIECE elements over the concatenation of the slots that have a gradient. */
/* The exported functions' parameters (torch_sqrt: 1 for torch's square root in fp32, see the top
 * comment; fp64 always takes torch's, fp16/bf16 always the correctly rounded one), and the call
 * that passes them on. */
#define ADAM_SEGMENT_PARAMS(T)                                                                              \
    T *param, T *exp_avg, T *exp_avg_sq, T *max_exp_avg_sq, void *steps, int steps_double, int count_steps, \
        const int64_t *grad_ptrs, const int8_t *has_grad, const int64_t *offsets, const int64_t *numels,     \
        uint8_t *initialized, int64_t slots, double lr, double beta1, double beta2, double eps,               \
        double weight_decay, int decoupled, int maximize, int lr_single, int torch_sqrt, int threads
#define ADAM_SEGMENT_ARGS                                                                                   \
    param, exp_avg, exp_avg_sq, max_exp_avg_sq, steps, steps_double, count_steps, grad_ptrs, has_grad,     \
        offsets, numels, initialized, slots, lr, beta1, beta2, eps, weight_decay, decoupled, maximize,      \
        lr_single, torch_sqrt, threads

/* Slot i's step count, from the float32 or float64 table. */
FUSED_INLINE double step_at(const void *steps, int steps_double, int64_t i) {
    return steps_double ? ((const double *)steps)[i] : (double)((const float *)steps)[i];
}

/* Counts this step into the table in its own dtype, as torch's state["step"] += 1 (from 0 where
 * the slot's state starts now): slots without a gradient keep their count. */
static void count_step(void *steps, int steps_double, const int8_t *has_grad, const uint8_t *initialized,
                       int64_t slots) {
    for (int64_t i = 0; i < slots; i++) {
        if (!has_grad[i]) continue;
        if (steps_double) ((double *)steps)[i] = initialized[i] ? ((double *)steps)[i] + 1.0 : 1.0;
        else ((float *)steps)[i] = initialized[i] ? ((float *)steps)[i] + 1.0f : 1.0f;
    }
}

#define DEFINE_SEGMENTS(NAME, T, UPDATE, STAGED)                                                                    \
    int64_t NAME(ADAM_SEGMENT_PARAMS(T)) {                                                                  \
        (void)torch_sqrt;                                                                                   \
        struct adam_hyper h = {lr, beta1, beta2, eps, weight_decay, decoupled, maximize, lr_single,          \
                               max_exp_avg_sq != 0};                                                         \
        fused_sqrt_resolve();                                                                              \
        if (count_steps) count_step(steps, steps_double, has_grad, initialized, slots);                    \
        int64_t *starts = fused_segment_starts(has_grad, numels, slots);                                   \
        if (starts == 0) return -1;                                                                        \
        int64_t total = starts[slots], pieces = (total + PIECE - 1) / PIECE;                               \
        _Pragma("omp parallel num_threads(threads) if(pieces > 1 && threads > 1)")                           \
        {                                                                                                  \
        int mkl_threads = fused_mkl_sequential();                                                          \
        struct STAGED##_ctx *ctx = calloc(1, sizeof(struct STAGED##_ctx));                                   \
        double scalars_step = NAN;                                                                         \
        struct adam_scalars s;                                                                             \
        _Pragma("omp for schedule(dynamic, 1)")                                                            \
        for (int64_t k = 0; k < pieces; k++) {                                                             \
            int64_t from = k * PIECE, to = from + PIECE < total ? from + PIECE : total;                    \
            for (int64_t i = fused_slot_at(starts, slots, from); i < slots && starts[i] < to; i++) {    \
                if (!has_grad[i] || numels[i] == 0) continue;                                              \
                /* Slots whose parameters and gradients both lie back to back, at the same step and   \
                   with the same initialisation, run as one segment. */                                \
                int64_t j = i;                                                                             \
                while (j + 1 < slots && starts[j + 1] < to &&                                              \
                       fused_back_to_back(has_grad, offsets, numels, grad_ptrs, j, (int64_t)sizeof(T)) &&  \
                       initialized[j + 1] == initialized[i] &&                                             \
                       step_at(steps, steps_double, j + 1) == step_at(steps, steps_double, i))             \
                    j++;                                                                                   \
                if (j + 4 < slots && has_grad[j + 4] && numels[j + 4] > 0 && starts[j + 4] < to &&       \
                    b_small(numels[i])) { /* small slots: ask for a later one's lines, scattered gradients */ \
                    int64_t o = offsets[j + 4], nb = (numels[j + 4] < 64 ? numels[j + 4] : 64) * (int64_t)sizeof(T); \
                    prefetch(param + o, (const T *)(intptr_t)grad_ptrs[j + 4], exp_avg + o, exp_avg_sq + o,  \
                             max_exp_avg_sq == 0 ? 0 : max_exp_avg_sq + o, nb);                             \
                }                                                                                          \
                int64_t a = from > starts[i] ? from - starts[i] : 0;                                       \
                int64_t b = (to < starts[j + 1] ? to : starts[j + 1]) - starts[i];                         \
                const T *grad = (const T *)(intptr_t)grad_ptrs[i];                                         \
                T *m = exp_avg + offsets[i] + a, *v = exp_avg_sq + offsets[i] + a;                         \
                T *mx = max_exp_avg_sq == 0 ? 0 : max_exp_avg_sq + offsets[i] + a;                         \
                if (!initialized[i]) { /* torch's zero state, read back from cache by the update */     \
                    memset(m, 0, (size_t)(b - a) * sizeof(T));                                             \
                    memset(v, 0, (size_t)(b - a) * sizeof(T));                                             \
                    if (mx != 0) memset(mx, 0, (size_t)(b - a) * sizeof(T));                               \
                }                                                                                          \
                const double t = step_at(steps, steps_double, i);                                          \
                if (!(t == scalars_step)) { s = adam_scalars(&h, t); scalars_step = t; }                   \
                if (ctx != 0) STAGED(ctx, param + offsets[i] + a, grad + a, m, v, mx, b - a, &h, &s);      \
                else UPDATE(param + offsets[i] + a, grad + a, m, v, mx, b - a, &h, &s);                    \
                i = j;                                                                                     \
            }                                                                                              \
        }                                                                                                  \
        if (ctx != 0) STAGED##_flush(ctx);                                                                 \
        free(ctx);                                                                                         \
        fused_mkl_threads_restore(mkl_threads);                                                            \
        }                                                                                                  \
        return fused_mark_started(has_grad, initialized, slots);                                           \
    }

DEFINE_UNSTAGED(unstaged_f32_ieee, float, update_f32_ieee)
DEFINE_SEGMENTS(adam_f32_torch_sqrt, float, update_f32, staged_f32)
DEFINE_SEGMENTS(adam_f32_ieee_sqrt, float, update_f32_ieee, unstaged_f32_ieee)
int64_t adam_segments_f32(ADAM_SEGMENT_PARAMS(float)) {
    return torch_sqrt ? adam_f32_torch_sqrt(ADAM_SEGMENT_ARGS) : adam_f32_ieee_sqrt(ADAM_SEGMENT_ARGS);
}
DEFINE_SEGMENTS(adam_segments_f64, double, update_f64, staged_f64)
DEFINE_SEGMENTS(adam_segments_bf16, uint16_t, update_bf16, unstaged_bf16)
DEFINE_SEGMENTS(adam_segments_fp16, uint16_t, update_fp16, unstaged_fp16)
