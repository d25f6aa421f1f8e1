/* Lamb over the slots of a flat buffer, each slot's gradient read where it lies.
 *
 * Per element, with p, g, m, v the parameter, gradient, exp_avg and exp_avg_sq (fp16/bf16 loaded
 * to fp32 by fused_half.h; fp64 computed in double), the operations of fused_lamb.lamb_kernels'
 * torch-ops composite, each rounded where ATen's CPU kernel rounds it ("fma(a, x, y)" is a*x + y
 * rounded once: ATen's add(alpha=) and addcmul are fused multiply-adds; divisions are not):
 *
 *     g = g / clip                           clipping        grads / clip
 *     g = fma(p, wd, g)                      L2, wd != 0     g.add(p, alpha=wd)
 *     m = fma(g, beta3, m * beta1)                           m.mul_(beta1).add_(g, alpha=beta3)
 *     v = fma(c2 * g, g, v * beta2)          c2 = 1 - beta2  v.mul_(beta2).addcmul_(g, g, value=c2)
 *     u = (m / bc1) / (sqrt(v / bc2) + eps)  bias_correction
 *     u = m / (sqrt(v) + eps)                otherwise
 *     u = fma(p, wd, u)                      decoupled, wd != 0
 *     p = fma(-lr * u, r, p)                 trust ratio     p.addcmul_(u, r, value=-lr)
 *     p = p - u * lr                         otherwise       p.sub_(u.mul_(lr))
 *
 * with bc1 = 1 - beta1**t, bc2 = 1 - beta2**t computed in double for each slot's step count t
 * (steps[i], after this step's increment), every scalar then converted to the compute type. The
 * trust ratio of a slot is r = w / n where w = sqrt(sum p^2) (clamped to max_weight_norm with
 * `clamp`) and n = sqrt(sum u^2) are both > 0, else 1; the sums are accumulated in double and
 * rounded to the compute type (fp32 for fp16/bf16) before the square root, as
 * fused_core.reductions.segment_norms does.
 *
 * sqrt is the C library's, correctly rounded; where torch is built with MKL, its CPU sqrt is
 * MKL's (a result in a hundred or so is 1 ulp off), and the order of the norms' additions is this
 * kernel's own: results agree with the composite to a few ulps, not bit for bit (checked when the
 * library loads, fused_lamb.lamb_kernels.c_kernel_matches_composite).
 *
 * Two passes over memory. With the trust ratio, pass 1 reads p, g, m, v, computes u and adds p^2
 * and u^2 into per-slot sums without storing anything; pass 2 computes the same u again from the
 * same inputs, stores m and v (rounded once, for fp16/bf16) and steps p. Without it, pass 2 alone.
 *
 * Slot i occupies param[offsets[i] : offsets[i] + numels[i]] (and the same range of each state
 * buffer); its gradient is the dense array at grad_ptrs[i], with the parameter's memory order.
 * Slots with has_grad[i] == 0 are skipped. A slot whose state is not initialised
 * (initialized[i] == 0) starts from zero moments (not read), and is then marked initialized[i] = 2;
 * the return value counts them (-1: out of memory).
 *
 * The elements of all slots with a gradient are split into pieces of PIECE elements (fused_segments.h),
 * taken dynamically by `threads` OpenMP threads. Each piece keeps one partial sum per slot it
 * covers; a slot's partials are added in piece order, so the sums do not depend on the thread count.
 * Built with -ffp-contract=off (fused_core.native): no fusing but the explicit fma calls.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "fused_half.h"
#include "fused_segments.h"

#define PIECE 32768

enum lamb_flags { BIAS_CORRECTION = 1, DECOUPLED = 2, TRUST_RATIO = 4, CLIPPING = 8, CLAMP = 16 };

struct lamb_hyper {
    double lr, beta1, beta2, beta3, eps, wd, clip, max_weight_norm;
    int flags;
};

FUSED_INLINE float load_f32(float x) { return x; }
FUSED_INLINE float store_f32(float x) { return x; }
FUSED_INLINE double load_f64(double x) { return x; }
FUSED_INLINE double store_f64(double x) { return x; }

/* The scalars of a slot at step t, in the compute type C. */
#define DEFINE_SCALARS(NAME, C)                                                                           \
    struct NAME {                                                                                         \
        C clip, wd, beta1, beta2, beta3, c2, eps, bc1, bc2, neg_lr, lr;                                   \
        int bias_correction, decoupled, clipping, has_wd, trust;                                          \
    };                                                                                                    \
    static struct NAME NAME##_at(const struct lamb_hyper *h, double t) {                                  \
        struct NAME s;                                                                                    \
        s.clip = (C)h->clip, s.wd = (C)h->wd, s.beta1 = (C)h->beta1, s.beta2 = (C)h->beta2;               \
        s.beta3 = (C)h->beta3, s.c2 = (C)(1 - h->beta2), s.eps = (C)h->eps;                               \
        s.bc1 = (C)(1 - pow(h->beta1, t)), s.bc2 = (C)(1 - pow(h->beta2, t));                             \
        s.neg_lr = (C)(-h->lr), s.lr = (C)h->lr;                                                          \
        s.bias_correction = h->flags & BIAS_CORRECTION, s.decoupled = h->flags & DECOUPLED;               \
        s.clipping = h->flags & CLIPPING, s.has_wd = h->wd != 0, s.trust = h->flags & TRUST_RATIO;        \
        return s;                                                                                         \
    }

DEFINE_SCALARS(scalars_f32, float)
DEFINE_SCALARS(scalars_f64, double)

/* ELEMENT: the new moments and u of one element (the table above). */
#define DEFINE_ELEMENT(NAME, C, S, FMA, SQRT)                                                              \
    FUSED_INLINE C NAME(const struct S *s, C p, C g, C m0, C v0, C *m1, C *v1) {                            \
        if (s->clipping) g = g / s->clip;                                                                 \
        if (!s->decoupled && s->has_wd) g = FMA(p, s->wd, g);                                             \
        C m = FMA(g, s->beta3, m0 * s->beta1);                                                            \
        C v = FMA(s->c2 * g, g, v0 * s->beta2);                                                           \
        C u = s->bias_correction ? (m / s->bc1) / (SQRT(v / s->bc2) + s->eps) : m / (SQRT(v) + s->eps);   \
        if (s->decoupled && s->has_wd) u = FMA(p, s->wd, u);                                              \
        *m1 = m;                                                                                          \
        *v1 = v;                                                                                          \
        return u;                                                                                         \
    }

DEFINE_ELEMENT(element_f32, float, scalars_f32, fmaf, sqrtf)
DEFINE_ELEMENT(element_f64, double, scalars_f64, fma, sqrt)

/* SUMS (pass 1): add p^2 and u^2 of n elements of one slot into sums[0], sums[1], storing nothing.
 * STEP (pass 2): store m, v and p. Both computed in C, stored as T; `fresh`: zero moments, not read. */
#define DEFINE_RANGE(NAME, T, C, S, ELEMENT, FMA, LOAD, STORE)                                             \
    static void NAME##_sums(const T *restrict param, const T *restrict m, const T *restrict v,             \
                            const T *restrict grad, int64_t n, int fresh, const struct S *s, double *sums) {  \
        double sum_p = 0.0, sum_u = 0.0;                                                                  \
        _Pragma("omp simd reduction(+ : sum_p, sum_u)")                                                   \
        for (int64_t i = 0; i < n; i++) {                                                                 \
            C p = LOAD(param[i]), m1, v1;                                                                 \
            C u = ELEMENT(s, p, LOAD(grad[i]), fresh ? (C)0 : LOAD(m[i]), fresh ? (C)0 : LOAD(v[i]), &m1, &v1); \
            sum_p += (double)p * (double)p;                                                               \
            sum_u += (double)u * (double)u;                                                               \
        }                                                                                                 \
        sums[0] = sum_p;                                                                                  \
        sums[1] = sum_u;                                                                                  \
    }                                                                                                     \
    static void NAME##_step(T *restrict param, T *restrict m, T *restrict v, const T *restrict grad,      \
                            int64_t n, int fresh, const struct S *s, C ratio) {                           \
        for (int64_t i = 0; i < n; i++) {                                                                 \
            C p = LOAD(param[i]), m1, v1;                                                                 \
            C u = ELEMENT(s, p, LOAD(grad[i]), fresh ? (C)0 : LOAD(m[i]), fresh ? (C)0 : LOAD(v[i]), &m1, &v1); \
            m[i] = STORE(m1);                                                                             \
            v[i] = STORE(v1);                                                                             \
            param[i] = STORE(s->trust ? FMA(s->neg_lr * u, ratio, p) : p - u * s->lr);                    \
        }                                                                                                 \
    }

DEFINE_RANGE(range_f32, float, float, scalars_f32, element_f32, fmaf, load_f32, store_f32)
DEFINE_RANGE(range_f64, double, double, scalars_f64, element_f64, fma, load_f64, store_f64)
DEFINE_RANGE(range_bf16, uint16_t, float, scalars_f32, element_f32, fmaf, fused_load_bf16, fused_store_bf16)
DEFINE_RANGE(range_fp16, uint16_t, float, scalars_f32, element_f32, fmaf, fused_load_fp16, fused_store_fp16)

/* The trust ratio of a slot from its sums, in C (fp32, or fp64 for fp64 slots). */
#define DEFINE_RATIO(NAME, C, SQRT)                                                                       \
    static C NAME(const double *sums, const struct lamb_hyper *h) {                                      \
        C w = SQRT((C)sums[0]), n = SQRT((C)sums[1]);                                                     \
        if ((h->flags & CLAMP) && !(w <= (C)h->max_weight_norm)) w = w != w ? w : (C)h->max_weight_norm;  \
        return w > 0 && n > 0 ? w / n : (C)1;                                                             \
    }

DEFINE_RATIO(ratio_f32, float, sqrtf)
DEFINE_RATIO(ratio_f64, double, sqrt)

/* The driver: pieces of the concatenation of the slots with a gradient; pass 1 into per-(piece,
 * slot) partials (with the trust ratio), the per-slot ratios, then pass 2. */
#define DEFINE_SEGMENTS(NAME, T, C, S, RANGE, RATIO)                                                       \
    int64_t NAME(T *param, T *exp_avg, T *exp_avg_sq, const double *steps, const int64_t *grad_ptrs,      \
                 const int8_t *has_grad, const int64_t *offsets, const int64_t *numels, uint8_t *initialized, \
                 int64_t slots, double lr, double beta1, double beta2, double beta3, double eps, double wd,  \
                 double clip, double max_weight_norm, int flags, int threads) {                          \
        struct lamb_hyper h = {lr, beta1, beta2, beta3, eps, wd, clip, max_weight_norm, flags};          \
        int64_t *starts = fused_segment_starts(has_grad, numels, slots);                                  \
        if (starts == 0) return -1;                                                                       \
        const int64_t total = starts[slots], pieces = (total + PIECE - 1) / PIECE;                        \
        int64_t *first = malloc((size_t)(pieces + 1) * sizeof(int64_t));                                  \
        int64_t *part_at = malloc((size_t)(pieces + 1) * sizeof(int64_t));                                \
        C *ratios = malloc((size_t)(slots > 0 ? slots : 1) * sizeof(C));                                  \
        struct S *scalars = malloc((size_t)(slots > 0 ? slots : 1) * sizeof(struct S));                   \
        double *parts = 0, *sums = 0;                                                                     \
        if (first == 0 || part_at == 0 || ratios == 0 || scalars == 0) goto out_of_memory;                \
        for (int64_t i = 0; i < slots; i++) /* pow() once per run of equal steps */                       \
            scalars[i] = i > 0 && steps[i] == steps[i - 1] ? scalars[i - 1] : S##_at(&h, steps[i]);       \
        part_at[0] = 0;                                                                                   \
        for (int64_t k = 0; k < pieces; k++) {                                                            \
            int64_t end = (k + 1) * PIECE < total ? (k + 1) * PIECE : total;                              \
            first[k] = fused_slot_at(starts, slots, k * PIECE);                                           \
            part_at[k + 1] = part_at[k] + fused_slot_at(starts, slots, end - 1) - first[k] + 1;           \
        }                                                                                                 \
        for (int64_t i = 0; i < slots; i++) ratios[i] = (C)1;                                             \
        if (flags & TRUST_RATIO) {                                                                        \
            parts = calloc((size_t)(2 * part_at[pieces] + 2), sizeof(double));                            \
            sums = calloc((size_t)(2 * slots + 2), sizeof(double));                                       \
            if (parts == 0 || sums == 0) goto out_of_memory;                                              \
            RUN_PIECES(T, RANGE, 0, parts)                                                                \
            for (int64_t k = 0; k < pieces; k++)                                                          \
                for (int64_t j = part_at[k]; j < part_at[k + 1]; j++) {                                   \
                    int64_t i = first[k] + (j - part_at[k]);                                              \
                    sums[2 * i] += parts[2 * j];                                                          \
                    sums[2 * i + 1] += parts[2 * j + 1];                                                  \
                }                                                                                         \
            for (int64_t i = 0; i < slots; i++)                                                           \
                if (has_grad[i]) ratios[i] = RATIO(sums + 2 * i, &h);                                     \
        }                                                                                                 \
        RUN_PIECES(T, RANGE, 1, parts)                                                                    \
        free(starts); free(first); free(part_at); free(ratios); free(scalars); free(parts); free(sums);    \
        return fused_mark_started(has_grad, initialized, slots);                                          \
    out_of_memory:                                                                                        \
        free(starts); free(first); free(part_at); free(ratios); free(scalars); free(parts); free(sums);    \
        return -1;                                                                                        \
    }

/* One pass over every piece: each slot range of the piece through RANGE (pass 1 writes its sums
 * into parts[2 * (part_at[k] + i - first[k])], pass 2 stores). */
#define RUN_PIECES(T, RANGE, STORE, PARTS)                                                                \
    _Pragma("omp parallel for schedule(dynamic, 1) num_threads(threads) if(pieces > 1)")                  \
    for (int64_t k = 0; k < pieces; k++) {                                                                \
        const int64_t from = k * PIECE, end = from + PIECE < total ? from + PIECE : total;                \
        for (int64_t i = first[k]; i < slots && starts[i] < end; i++) {                                   \
            int64_t lo = starts[i] > from ? starts[i] : from, hi = starts[i + 1] < end ? starts[i + 1] : end; \
            if (hi <= lo || !has_grad[i]) continue;                                                       \
            int64_t at = offsets[i] + (lo - starts[i]);                                                   \
            const T *grad = (const T *)(intptr_t)grad_ptrs[i] + (lo - starts[i]);                         \
            if (STORE)                                                                                    \
                RANGE##_step(param + at, exp_avg + at, exp_avg_sq + at, grad, hi - lo, !initialized[i],   \
                             scalars + i, ratios[i]);                                                     \
            else                                                                                          \
                RANGE##_sums(param + at, exp_avg + at, exp_avg_sq + at, grad, hi - lo, !initialized[i],   \
                             scalars + i, PARTS + 2 * (part_at[k] + i - first[k]));                       \
        }                                                                                                 \
    }

DEFINE_SEGMENTS(lamb_segments_f32, float, float, scalars_f32, range_f32, ratio_f32)
DEFINE_SEGMENTS(lamb_segments_f64, double, double, scalars_f64, range_f64, ratio_f64)
DEFINE_SEGMENTS(lamb_segments_bf16, uint16_t, float, scalars_f32, range_bf16, ratio_f32)
DEFINE_SEGMENTS(lamb_segments_fp16, uint16_t, float, scalars_f32, range_fp16, ratio_f32)
