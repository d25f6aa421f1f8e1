/* RMSprop, RMSpropTF and Adadelta over the slots of a flat buffer, each slot's gradient read where it lies.
 *
 * Per element, with p, g the parameter and gradient, v = square_avg, a = grad_avg, b = momentum_buffer,
 * u = acc_delta (fp16/bf16 loaded to fp32 by fused_half.h; fp64 computed in double), the operations of
 * torch 2.13's per-tensor steps, each rounded where ATen's CPU kernel rounds it. "fma(x, y, z)" is
 * x*y + z rounded once: ATen's add(alpha=), sub, lerp and addcmul are fused multiply-adds (their
 * vectorised loops and scalar tails alike), mul, div and addcdiv are not (as fused-adam's adam.c).
 *
 * RMSprop, torch.optim.RMSprop(foreach=False):
 *
 *     g = -g                               maximize            grad = -grad
 *     g = fma(p, wd, g)                    wd != 0             grad.add(param, alpha=wd)
 *     v = fma(c * g, g, v * alpha)         c = 1 - alpha       square_avg.mul_(alpha).addcmul_(grad, grad, value=c)
 *     a = fma(c, g - a, a)  if |c| < 0.5   centered            grad_avg.lerp_(grad, c)
 *         fma(c - 1, g - a, g)  otherwise
 *     r = SQRT(centered ? fma(-a, a, v) : v) + eps             square_avg.addcmul(a, a, value=-1).sqrt_() / .sqrt(); .add_(eps)
 *     b = b * mu + g / r;  p = fma(b, -lr, p)     mu > 0       buf.mul_(mu).addcdiv_(grad, avg); param.add_(buf, alpha=-lr)
 *     p = p + (-lr * g) / r                       mu == 0      param.addcdiv_(grad, avg, value=-lr)
 *
 * RMSpropTF, fused_rmsprop.reference.rmsprop_tf_update (torch_npu's NpuFusedRMSpropTF):
 *
 *     g = -g                               maximize
 *     p = fma(p, -wd, p)                   wd != 0, decoupled  param.add_(param, alpha=-wd)
 *     g = fma(p, wd, g)                    wd != 0, otherwise  grad.add(param, alpha=wd)
 *     v = fma(g * g - v, c, v)                                 square_avg.add_(grad.pow(2).sub_(square_avg), alpha=c)
 *     a = fma(g - a, c, a)                 centered            grad_avg.add_(grad.sub(grad_avg), alpha=c)
 *     r = SQRT((centered ? fma(-a, a, v) : v) + eps)           (...).add_(eps).sqrt_()
 *     b = b * mu + (lr * g) / r;  p = p - b       mu > 0, lr_in_momentum   buf.mul_(mu).addcdiv_(grad, avg, value=lr); param.sub_(buf)
 *     b = b * mu + g / r;  p = fma(b, -lr, p)     mu > 0, otherwise
 *     p = p + (-lr * g) / r                       mu == 0
 *
 * Adadelta, torch.optim.Adadelta(foreach=False), with c = 1 - rho:
 *
 *     g = -g;  g = fma(p, wd, g)           as RMSprop
 *     v = fma(c * g, g, v * rho)                               square_avg.mul_(rho).addcmul_(grad, grad, value=c)
 *     d = SQRT(u + eps) / SQRT(v + eps) * g                    std = square_avg.add(eps).sqrt_(); acc_delta.add(eps).sqrt_().div_(std).mul_(grad)
 *     u = fma(c * d, d, u * rho)                               acc_delta.mul_(rho).addcmul_(delta, delta, value=c)
 *     p = fma(d, -lr, p)                                       param.add_(delta, alpha=-lr)
 *
 * Every scalar is converted to the compute type as ATen converts a Scalar argument: (float)(1 - alpha),
 * (float)eps, (float)-lr... in fp32. lr arrives as a double (a tensor lr: its value, as torch's item()).
 *
 * SQRT is torch's CPU sqrt: where torch is built with MKL, ATen computes it with MKL's vmsSqrt/vmdSqrt
 * (VML_HA | VML_FTZDAZ_OFF | VML_ERRMODE_IGNORE), which is not correctly rounded; the kernel calls the very
 * functions, found in the loaded libtorch_cpu, on blocks of BLOCK values, with MKL sequential on its
 * threads; without them, sqrt(), which is what ATen's Vectorized<T>::sqrt computes (fused-core's
 * fused_sqrt.h, shared with fused-adam's adam.c). NaN payloads are not reproduced.
 *
 * Slots whose state is not initialised (initialized[i] == 0) start from the optimizers' initial state:
 * zeros, RMSpropTF's square_avg ones (written piece by piece just before the update reads them back
 * from cache, never read before); they are then marked initialized[i] = 2 and counted in the return
 * value (-1: out of memory). fp16/bf16 use the fp32 arithmetic above, with the correctly rounded
 * sqrtf() for SQRT (fused_rmsprop.kernels.low_precision_sqrt), and round p and the state once per step.
 * The step counts are the caller's (none of these updates reads them).
 *
 * Slot i occupies param[offsets[i] : offsets[i] + numels[i]] (and the same range of each state buffer);
 * its gradient is the dense array at grad_ptrs[i]; slots with has_grad[i] == 0 are skipped. The elements
 * of the slots with a gradient are split into pieces of PIECE elements, taken dynamically by `threads`
 * OpenMP threads (fused_segments.h). Memory is crossed once: within a block of BLOCK elements a first
 * loop updates the state it can and stages p, g and the square root arguments in small scratch arrays
 * (L1), one square root call covers the block, a second loop finishes the update. Segments shorter than
 * a block share one (thousands of small parameters would otherwise cost an MKL call each). Built with
 * -ffp-contract=off (no fusing but the explicit fma calls); every flag set gives the same bits.
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

/* 1 where the kernels take MKL's square roots (torch built with MKL), 0 where sqrt()'s. */
int rmsprop_sqrt_is_mkl(void) { return fused_sqrt_is_mkl(); }

/* r[i] = sqrtf(x[i]), correctly rounded (the processor's instruction), and the positive quiet NaN for a
 * negative x[i] (where x86's instruction gives a negative one, MKL a positive one): the square root of
 * fp16/bf16's fp32 arithmetic (fused_rmsprop.kernels.low_precision_sqrt); a loop of its own
 * vectorises (-fno-math-errno). */
static void sqrt_block_ieee_f32(const float *restrict x, float *restrict r, int64_t n) {
    for (int64_t i = 0; i < n; i++) r[i] = x[i] < 0.0f ? NAN : sqrtf(x[i]);
}

FUSED_INLINE float same_f32(float x) { return x; }
FUSED_INLINE double same_f64(double x) { return x; }

/* ------------------------------------------------------------------------------------------------
 * The hyperparameters of a call, and the flags each loop is specialised on. */

enum wd_mode { WD_NONE, WD_L2, WD_DECOUPLED };
enum momentum_mode { MOM_NONE, MOM_TORCH, MOM_LR_IN_BUFFER };

struct hyper {
    double lr, alpha, eps, wd, momentum; /* Adadelta: alpha is rho */
    int maximize, tf, centered, wd_mode, momentum_mode;
};

/* F(ARGS..., flags) with each flag a literal constant, so that every combination is its own
 * branch-free loop. */
#define UNPACK(...) __VA_ARGS__
#define WITH_WD(F, ARGS, wd_mode, ...)                                                              \
    do {                                                                                            \
        if ((wd_mode) == WD_L2) F(UNPACK ARGS, WD_L2, __VA_ARGS__);                                 \
        else if ((wd_mode) == WD_DECOUPLED) F(UNPACK ARGS, WD_DECOUPLED, __VA_ARGS__);              \
        else F(UNPACK ARGS, WD_NONE, __VA_ARGS__);                                                  \
    } while (0)
#define WITH_WD_TF_CENTERED(F, ARGS, wd_mode, tf, centered)                                         \
    do {                                                                                            \
        if (tf && centered) WITH_WD(F, ARGS, wd_mode, 1, 1);                                        \
        else if (tf) WITH_WD(F, ARGS, wd_mode, 1, 0);                                               \
        else if (centered) WITH_WD(F, ARGS, wd_mode, 0, 1);                                         \
        else WITH_WD(F, ARGS, wd_mode, 0, 0);                                                       \
    } while (0)
#define WITH_MOMENTUM_TF(F, ARGS, momentum_mode, tf)                                                \
    do {                                                                                            \
        if ((momentum_mode) == MOM_LR_IN_BUFFER) F(UNPACK ARGS, MOM_LR_IN_BUFFER, 1);               \
        else if ((momentum_mode) == MOM_TORCH) { if (tf) F(UNPACK ARGS, MOM_TORCH, 1); else F(UNPACK ARGS, MOM_TORCH, 0); } \
        else if (tf) F(UNPACK ARGS, MOM_NONE, 1);                                                   \
        else F(UNPACK ARGS, MOM_NONE, 0);                                                           \
    } while (0)

/* One staged segment of a thread's block: where its second loop writes, and its scratch range. */
struct staged {
    void *param, *buf; /* buf: RMSprop's momentum_buffer, Adadelta's acc_delta */
    int at, count;
};

/* ------------------------------------------------------------------------------------------------
 * The updates, for storage type T computed in C. NAME##_rms_first / _rms_second are the two loops of
 * RMSprop and RMSpropTF; NAME##_ada_first / _ada_second Adadelta's. A block holds the first loops of
 * consecutive segments (ctx), then one square root call, then their second loops (NAME##_flush). */
#define DEFINE_UPDATES(NAME, T, C, FMA, LOAD, STORE, SQRT_BLOCK)                                               \
    struct NAME##_ctx {                                                                                       \
        int fill, segs;                                                                                       \
        C p[BLOCK], g[BLOCK], arg[BLOCK], root[BLOCK], arg2[BLOCK], root2[BLOCK];                             \
        struct staged seg[BLOCK];                                                                             \
    };                                                                                                        \
    FUSED_INLINE void NAME##_rms_first(const T *restrict param, const T *restrict grad, T *restrict v,        \
                                       T *restrict a, int n, const C *restrict k, C *restrict p_out,          \
                                       C *restrict g_out, C *restrict arg_out, const int wd_mode,             \
                                       const int tf, const int centered) {                                    \
        const C sign = k[0], wd = k[1], alpha = k[2], c = k[3], lerp_coef = k[4], eps = k[5];                 \
        const int lerp_small = k[6] != 0;                                                                     \
        for (int i = 0; i < n; i++) {                                                                         \
            C p = LOAD(param[i]), g = LOAD(grad[i]) * sign, vv = LOAD(v[i]);                                  \
            if (wd_mode == WD_DECOUPLED) p = FMA(p, -wd, p);                                                  \
            if (wd_mode == WD_L2) g = FMA(p, wd, g);                                                          \
            vv = tf ? FMA(g * g - vv, c, vv) : FMA(c * g, g, vv * alpha);                                     \
            v[i] = STORE(vv);                                                                                 \
            if (centered) {                                                                                   \
                C aa = LOAD(a[i]);                                                                            \
                aa = tf ? FMA(g - aa, c, aa) : FMA(lerp_coef, g - aa, lerp_small ? aa : g);                   \
                a[i] = STORE(aa);                                                                             \
                vv = FMA(-aa, aa, vv);                                                                        \
            }                                                                                                 \
            p_out[i] = p;                                                                                     \
            g_out[i] = g;                                                                                     \
            arg_out[i] = tf ? vv + eps : vv;                                                                  \
        }                                                                                                     \
    }                                                                                                         \
    FUSED_INLINE void NAME##_rms_second(T *restrict param, T *restrict buf, int n, const C *restrict p_in,     \
                                        const C *restrict g_in, const C *restrict root, const C *restrict k, \
                                        const int momentum_mode, const int tf) {                              \
        const C eps = k[5], mu = k[7], lr = k[8], neg_lr = k[9];                                              \
        for (int i = 0; i < n; i++) {                                                                         \
            C r = tf ? root[i] : root[i] + eps, p = p_in[i], g = g_in[i];                                     \
            if (momentum_mode == MOM_NONE) p = p + (neg_lr * g) / r;                                          \
            else {                                                                                            \
                C b = momentum_mode == MOM_LR_IN_BUFFER ? LOAD(buf[i]) * mu + (lr * g) / r                   \
                                                        : LOAD(buf[i]) * mu + g / r;                          \
                buf[i] = STORE(b);                                                                            \
                p = momentum_mode == MOM_LR_IN_BUFFER ? p - b : FMA(b, neg_lr, p);                            \
            }                                                                                                 \
            param[i] = STORE(p);                                                                              \
        }                                                                                                     \
    }                                                                                                         \
    FUSED_INLINE void NAME##_ada_first(const T *restrict param, const T *restrict grad, T *restrict v,        \
                                       const T *restrict u, int n, const C *restrict k, C *restrict g_out,    \
                                       C *restrict arg_v, C *restrict arg_u, const int wd_mode,               \
                                       const int unused_tf, const int unused_centered) {                      \
        (void)unused_tf;                                                                                      \
        (void)unused_centered;                                                                                \
        const C sign = k[0], wd = k[1], rho = k[2], c = k[3], eps = k[5];                                     \
        for (int i = 0; i < n; i++) {                                                                         \
            C g = LOAD(grad[i]) * sign;                                                                       \
            if (wd_mode == WD_L2) g = FMA(LOAD(param[i]), wd, g);                                             \
            C vv = FMA(c * g, g, LOAD(v[i]) * rho);                                                           \
            v[i] = STORE(vv);                                                                                 \
            g_out[i] = g;                                                                                     \
            arg_v[i] = vv + eps;                                                                              \
            arg_u[i] = LOAD(u[i]) + eps;                                                                      \
        }                                                                                                     \
    }                                                                                                         \
    FUSED_INLINE void NAME##_ada_second(T *restrict param, T *restrict u, int n, const C *restrict g_in,       \
                                        const C *restrict std, const C *restrict root_u,                     \
                                        const C *restrict k) {                                                \
        const C rho = k[2], c = k[3], neg_lr = k[9];                                                          \
        for (int i = 0; i < n; i++) {                                                                         \
            C d = root_u[i] / std[i] * g_in[i];                                                               \
            u[i] = STORE(FMA(c * d, d, LOAD(u[i]) * rho));                                                    \
            param[i] = STORE(FMA(d, neg_lr, LOAD(param[i])));                                                 \
        }                                                                                                     \
    }                                                                                                         \
    /* The scalars of a call, converted to C: sign, wd, alpha (rho), 1 - alpha, lerp coefficient, eps,    \
     * whether lerp's weight is small, momentum, lr, -lr. */                                               \
    static void NAME##_scalars(const struct hyper *h, C *k) {                                                 \
        const C c = (C)(1.0 - h->alpha);                                                                      \
        const int small = fabs((double)c) < 0.5; /* ATen's lerp: |weight| < 0.5, weight in C */             \
        k[0] = h->maximize ? (C)-1 : (C)1;                                                                    \
        k[1] = (C)h->wd;                                                                                      \
        k[2] = (C)h->alpha;                                                                                   \
        k[3] = c;                                                                                             \
        k[4] = small ? c : c - (C)1;                                                                          \
        k[5] = (C)h->eps;                                                                                     \
        k[6] = (C)small;                                                                                      \
        k[7] = (C)h->momentum;                                                                                \
        k[8] = (C)h->lr;                                                                                      \
        k[9] = (C)-h->lr;                                                                                     \
    }                                                                                                         \
    static void NAME##_flush(struct NAME##_ctx *x, const struct hyper *h, const C *k, int adadelta) {        \
        if (x->fill == 0) return;                                                                             \
        SQRT_BLOCK(x->arg, x->root, x->fill);                                                                 \
        if (adadelta) SQRT_BLOCK(x->arg2, x->root2, x->fill);                                                 \
        for (int s = 0; s < x->segs; s++) {                                                                   \
            const struct staged *q = &x->seg[s];                                                              \
            if (adadelta)                                                                                     \
                NAME##_ada_second((T *)q->param, (T *)q->buf, q->count, x->g + q->at, x->root + q->at,        \
                                  x->root2 + q->at, k);                                                       \
            else                                                                                              \
                WITH_MOMENTUM_TF(NAME##_rms_second,                                                           \
                                 ((T *)q->param, (T *)q->buf, q->count, x->p + q->at, x->g + q->at,           \
                                  x->root + q->at, k),                                                        \
                                 h->momentum_mode, h->tf);                                                    \
        }                                                                                                     \
        x->fill = 0;                                                                                          \
        x->segs = 0;                                                                                          \
    }                                                                                                         \
    /* One segment of n elements into the thread's blocks (flushed as they fill). */                         \
    static void NAME##_stage(struct NAME##_ctx *x, const struct hyper *h, const C *k, int adadelta, T *param, \
                             const T *grad, T *v, T *a, T *buf, int64_t n) {                                  \
        for (int64_t at = 0; at < n;) {                                                                       \
            int f = x->fill, count = (int)(n - at < BLOCK - f ? n - at : BLOCK - f);                          \
            if (adadelta)                                                                                     \
                WITH_WD(NAME##_ada_first,                                                                     \
                        (param + at, grad + at, v + at, buf + at, count, k, x->g + f, x->arg + f, x->arg2 + f), \
                        h->wd_mode, 0, 0);                                                                    \
            else                                                                                              \
                WITH_WD_TF_CENTERED(NAME##_rms_first,                                                         \
                                    (param + at, grad + at, v + at, a == 0 ? 0 : a + at, count, k, x->p + f,  \
                                     x->g + f, x->arg + f),                                                   \
                                    h->wd_mode, h->tf, h->centered);                                          \
            x->seg[x->segs++] = (struct staged){param + at, buf == 0 ? 0 : buf + at, f, count};               \
            x->fill = f + count;                                                                              \
            at += count;                                                                                      \
            if (x->fill == BLOCK) NAME##_flush(x, h, k, adadelta);                                            \
        }                                                                                                     \
    }                                                                                                         \
    /* Where a slot's state starts: zeros, RMSpropTF's square_avg ones. */                                   \
    static void NAME##_start(T *v, T *a, T *buf, int64_t n, int v_ones) {                                     \
        if (v_ones) for (int64_t i = 0; i < n; i++) v[i] = STORE((C)1);                                      \
        else memset(v, 0, (size_t)n * sizeof(T));                                                             \
        if (a != 0) memset(a, 0, (size_t)n * sizeof(T));                                                      \
        if (buf != 0) memset(buf, 0, (size_t)n * sizeof(T));                                                  \
    }                                                                                                         \
    /* The driver: pieces of PIECE elements over the concatenation of the slots that have a gradient;    \
     * slots back to back (parameters and gradients) with the same initialisation run as one segment. */  \
    static int64_t NAME##_segments(const struct hyper *h, int adadelta, T *param, T *v, T *a, T *buf,        \
                                   const int64_t *grad_ptrs, const int8_t *has_grad, const int64_t *offsets,  \
                                   const int64_t *numels, uint8_t *initialized, int64_t slots, int threads) { \
        fused_sqrt_resolve();                                                                                  \
        int64_t *starts = fused_segment_starts(has_grad, numels, slots);                                       \
        if (starts == 0) return -1;                                                                           \
        int64_t total = starts[slots], pieces = (total + PIECE - 1) / PIECE;                                  \
        C k[10];                                                                                              \
        NAME##_scalars(h, k);                                                                                 \
        _Pragma("omp parallel num_threads(threads) if(pieces > 1 && threads > 1)")                            \
        {                                                                                                     \
            int mkl_threads = fused_mkl_sequential();                                                         \
            struct NAME##_ctx *x = malloc(sizeof(struct NAME##_ctx));                                         \
            if (x != 0) x->fill = x->segs = 0;                                                                \
            _Pragma("omp for schedule(dynamic, 1)")                                                           \
            for (int64_t piece = 0; piece < pieces; piece++) {                                                \
                if (x == 0) continue;                                                                         \
                int64_t from = piece * PIECE, to = from + PIECE < total ? from + PIECE : total;               \
                for (int64_t i = fused_slot_at(starts, slots, from); i < slots && starts[i] < to; i++) {      \
                    if (!has_grad[i] || numels[i] == 0) continue;                                             \
                    int64_t j = i;                                                                            \
                    while (j + 1 < slots && starts[j + 1] < to && initialized[j + 1] == initialized[i] &&     \
                           fused_back_to_back(has_grad, offsets, numels, grad_ptrs, j, (int64_t)sizeof(T)))   \
                        j++;                                                                                  \
                    int64_t lo = from > starts[i] ? from - starts[i] : 0;                                     \
                    int64_t hi = (to < starts[j + 1] ? to : starts[j + 1]) - starts[i];                       \
                    int64_t o = offsets[i] + lo;                                                              \
                    T *sv = v + o, *sa = a == 0 ? 0 : a + o, *sb = buf == 0 ? 0 : buf + o;                    \
                    if (!initialized[i]) NAME##_start(sv, sa, sb, hi - lo, h->tf);                            \
                    NAME##_stage(x, h, k, adadelta, param + o, (const T *)(intptr_t)grad_ptrs[i] + lo, sv, sa, \
                                 sb, hi - lo);                                                                \
                    i = j;                                                                                    \
                }                                                                                             \
            }                                                                                                 \
            if (x != 0) NAME##_flush(x, h, k, adadelta);                                                      \
            free(x);                                                                                          \
            fused_mkl_threads_restore(mkl_threads);                                                           \
        }                                                                                                     \
        return fused_mark_started(has_grad, initialized, slots);                                              \
    }                                                                                                         \
    int64_t rmsprop_segments_##NAME(T *param, T *square_avg, T *grad_avg, T *momentum_buffer,                 \
                                    const int64_t *grad_ptrs, const int8_t *has_grad, const int64_t *offsets, \
                                    const int64_t *numels, uint8_t *initialized, int64_t slots, double lr,    \
                                    double alpha, double eps, double weight_decay, double momentum, int tf,   \
                                    int decoupled, int lr_in_momentum, int maximize, int threads) {           \
        struct hyper h = {lr, alpha, eps, weight_decay, momentum, maximize, tf, grad_avg != 0,                \
                          weight_decay == 0.0 ? WD_NONE : (tf && decoupled) ? WD_DECOUPLED : WD_L2,           \
                          momentum_buffer == 0 ? MOM_NONE : (tf && lr_in_momentum) ? MOM_LR_IN_BUFFER : MOM_TORCH}; \
        return NAME##_segments(&h, 0, param, square_avg, grad_avg, momentum_buffer, grad_ptrs, has_grad,     \
                               offsets, numels, initialized, slots, threads);                                 \
    }                                                                                                         \
    int64_t adadelta_segments_##NAME(T *param, T *square_avg, T *acc_delta, const int64_t *grad_ptrs,         \
                                     const int8_t *has_grad, const int64_t *offsets, const int64_t *numels,   \
                                     uint8_t *initialized, int64_t slots, double lr, double rho, double eps,  \
                                     double weight_decay, int maximize, int threads) {                        \
        struct hyper h = {lr, rho, eps, weight_decay, 0.0, maximize, 0, 0,                                    \
                          weight_decay == 0.0 ? WD_NONE : WD_L2, MOM_NONE};                                   \
        return NAME##_segments(&h, 1, param, square_avg, 0, acc_delta, grad_ptrs, has_grad, offsets, numels,  \
                               initialized, slots, threads);                                                  \
    }

DEFINE_UPDATES(f32, float, float, fmaf, same_f32, same_f32, fused_sqrt_block_f32)
DEFINE_UPDATES(f64, double, double, fma, same_f64, same_f64, fused_sqrt_block_f64)
DEFINE_UPDATES(bf16, uint16_t, float, fmaf, fused_load_bf16, fused_store_bf16, sqrt_block_ieee_f32)
DEFINE_UPDATES(fp16, uint16_t, float, fmaf, fused_load_fp16, fused_store_fp16, sqrt_block_ieee_f32)
