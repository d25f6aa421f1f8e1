/* Lamb over the slots of a flat buffer, each slot's gradient read where it lies.
 *
 * Per element, with p, g, m, v the parameter, gradient, exp_avg and exp_avg_sq (fp16/bf16 loaded
 * to fp32 by fused_half.h; fp64 computed in double), the operations of fused_lamb.lamb_kernels'
 * torch-ops composite, each rounded where ATen's CPU kernel rounds it ("fma(a, x, y)" is a*x + y
 * rounded once: ATen's add(alpha=) and addcmul are fused multiply-adds; divisions are not):
 *
 *     g = g * (1 / clip)                     clipping        grads / clip
 *     g = fma(p, wd, g)                      L2, wd != 0     g.add(p, alpha=wd)
 *     m = fma(g, beta3, m * beta1)                           m.mul_(beta1).add_(g, alpha=beta3)
 *     v = fma(c2 * g, g, v * beta2)          c2 = 1 - beta2  v.mul_(beta2).addcmul_(g, g, value=c2)
 *     u = (m * r1) / (sqrt(v * r2) + eps)    bias_correction, r1 = 1 / bc1, r2 = 1 / bc2
 *     u = m / (sqrt(v) + eps)                otherwise
 *     u = fma(p, wd, u)                      decoupled, wd != 0
 *     p = fma(-lr * u, r, p)                 trust ratio     p.addcmul_(u, r, value=-lr)
 *     p = p - u * lr                         otherwise       p.sub_(u.mul_(lr))
 *
 * with bc1 = 1 - beta1**t, bc2 = 1 - beta2**t and their reciprocals computed in double for each
 * slot's step count t
 * (steps[i], after this step's increment), every scalar then converted to the compute type. The
 * trust ratio of a slot is r = w / n where w = sqrt(sum p^2) (clamped to max_weight_norm with
 * `clamp`) and n = sqrt(sum u^2) are both > 0, else 1; the sums are accumulated in double and
 * rounded to the compute type (fp32 for fp16/bf16) before the square root, as
 * fused_core.reductions.segment_norms does.
 *
 * sqrt is the C library's, correctly rounded and vectorised. Where torch is built with MKL, its CPU
 * sqrt is MKL's (a result in a hundred or so is 1 ulp off); calling it here (fused-core's
 * fused_sqrt.h, as the Adam kernel must for torch's bits) made the ResNet-50 step 20 % slower, and
 * Lamb has no torch implementation to equal. With this kernel's own order of the norms' additions,
 * results agree with the composite to a few ulps, not bit for bit (checked when the library loads,
 * fused_lamb.lamb_kernels.c_kernel_matches_composite).
 *
 * Passes over memory, with the trust ratio (the element transfers per element in brackets):
 *   fp32/fp64: pass 1 reads p, g, m, v, stores the new m and v and adds p^2 and u^2 into per-slot
 *              sums [6]; pass 2 reads p, m, v, computes the same u from them (stored exactly) and
 *              steps p [4]: 10 in all;
 *   fp16/bf16: pass 1 reads p, g, m, v and adds the sums, storing nothing [4]; pass 2 computes u
 *              again from the same inputs, stores m, v (rounded once) and steps p [7]: the moments
 *              are rounded only once, after u is computed from the unrounded ones.
 * Without the trust ratio, one pass that reads p, g, m, v and stores m, v, p [7].
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
#define BLOCK 256

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
        C inv_clip, wd, beta1, beta2, beta3, c2, eps, r1, r2, neg_lr, lr;                                 \
        int bias_correction, decoupled, clipping, has_wd, trust;                                          \
    };                                                                                                    \
    static struct NAME NAME##_at(const struct lamb_hyper *h, double t) {                                  \
        struct NAME s;                                                                                    \
        s.inv_clip = (C)(1 / h->clip), s.wd = (C)h->wd, s.beta1 = (C)h->beta1, s.beta2 = (C)h->beta2;     \
        s.beta3 = (C)h->beta3, s.c2 = (C)(1 - h->beta2), s.eps = (C)h->eps;                               \
        s.r1 = (C)(1 / (1 - pow(h->beta1, t))), s.r2 = (C)(1 / (1 - pow(h->beta2, t)));                   \
        s.neg_lr = (C)(-h->lr), s.lr = (C)h->lr;                                                          \
        s.bias_correction = h->flags & BIAS_CORRECTION, s.decoupled = h->flags & DECOUPLED;               \
        s.clipping = h->flags & CLIPPING, s.has_wd = h->wd != 0, s.trust = h->flags & TRUST_RATIO;        \
        return s;                                                                                         \
    }

DEFINE_SCALARS(scalars_f32, float)
DEFINE_SCALARS(scalars_f64, double)

/* MOMENTS: the new moments of one element and the argument of its square root.
 * DIRECTION: u from m, the square root and p. (The table above.) */
#define DEFINE_ELEMENT(NAME, C, S, FMA)                                                                    \
    FUSED_INLINE C NAME##_moments(const struct S *s, C p, C g, C m0, C v0, C *m1, C *v1) {                  \
        if (s->clipping) g = g * s->inv_clip;                                                             \
        if (!s->decoupled && s->has_wd) g = FMA(p, s->wd, g);                                             \
        *m1 = FMA(g, s->beta3, m0 * s->beta1);                                                            \
        *v1 = FMA(s->c2 * g, g, v0 * s->beta2);                                                           \
        return s->bias_correction ? *v1 * s->r2 : *v1;                                                    \
    }                                                                                                     \
    FUSED_INLINE C NAME##_direction(const struct S *s, C p, C m, C root) {                                 \
        C u = (s->bias_correction ? m * s->r1 : m) / (root + s->eps);                                      \
        return s->decoupled && s->has_wd ? FMA(p, s->wd, u) : u;                                          \
    }

DEFINE_ELEMENT(element_f32, float, scalars_f32, fmaf)
DEFINE_ELEMENT(element_f64, double, scalars_f64, fma)

/* r[i] = sqrt(x[i]) over a block: a loop of its own vectorises (-fno-math-errno). */
static void sqrt_block_f32(const float *restrict x, float *restrict r, int64_t n) {
    for (int64_t i = 0; i < n; i++) r[i] = sqrtf(x[i]);
}
static void sqrt_block_f64(const double *restrict x, double *restrict r, int64_t n) {
    for (int64_t i = 0; i < n; i++) r[i] = sqrt(x[i]);
}

/* Per block of at most BLOCK elements of one slot (p, g, m, v at the block's start; `fresh`: zero
 * moments, not read), computed in C and stored as T, the square roots of a block in a loop of their
 * own. Each takes a copy of the slot's scalars, which the stores then cannot alias:
 *   SUMS:  the new moments (stored when `store`), u, and p^2, u^2 added into sums[0], sums[1];
 *   APPLY: u from the stored moments, p stepped by the trust ratio;
 *   STEP:  the new moments and p, stored (half types' pass 2, and every type without the ratio). */
#define DEFINE_RANGE(NAME, T, C, S, ELEMENT, FMA, SQRT_BLOCK, LOAD, STORE)                                 \
    /* One block's p, new m and square roots into p[], mm[], root[]; the moments stored when `store`. */ \
    FUSED_INLINE void NAME##_block(const T *restrict param, T *restrict m, T *restrict v, const T *restrict grad, \
                                   int64_t count, int fresh, const struct S *s, int store, C *p, C *mm, C *root) { \
        C arg[BLOCK];                                                                                     \
        for (int64_t i = 0; i < count; i++) {                                                             \
            C v1;                                                                                         \
            p[i] = LOAD(param[i]);                                                                        \
            arg[i] = ELEMENT##_moments(s, p[i], LOAD(grad[i]), fresh ? (C)0 : LOAD(m[i]), fresh ? (C)0 : LOAD(v[i]), \
                                       mm + i, &v1);                                                      \
            if (store) {                                                                                  \
                m[i] = STORE(mm[i]);                                                                      \
                v[i] = STORE(v1);                                                                         \
            }                                                                                             \
        }                                                                                                 \
        SQRT_BLOCK(arg, root, count);                                                                     \
    }                                                                                                     \
    static void NAME##_sums(const T *restrict param, T *restrict m, T *restrict v, const T *restrict grad,  \
                            int64_t n, int fresh, const struct S *scalars, double *sums, int store) {     \
        const struct S local = *scalars, *s = &local;                                                     \
        C p[BLOCK], mm[BLOCK], root[BLOCK];                                                               \
        double sum_p = 0.0, sum_u = 0.0;                                                                  \
        for (int64_t at = 0; at < n; at += BLOCK) {                                                       \
            int64_t count = n - at < BLOCK ? n - at : BLOCK;                                              \
            NAME##_block(param + at, m + at, v + at, grad + at, count, fresh, s, store, p, mm, root);      \
            _Pragma("omp simd reduction(+ : sum_p, sum_u)")                                               \
            for (int64_t i = 0; i < count; i++) {                                                         \
                C u = ELEMENT##_direction(s, p[i], mm[i], root[i]);                                       \
                sum_p += (double)p[i] * (double)p[i];                                                     \
                sum_u += (double)u * (double)u;                                                           \
            }                                                                                             \
        }                                                                                                 \
        sums[0] = sum_p;                                                                                  \
        sums[1] = sum_u;                                                                                  \
    }                                                                                                     \
    static void NAME##_apply(T *restrict param, const T *restrict m, const T *restrict v, int64_t n,      \
                             const struct S *scalars, C ratio) {                                          \
        const struct S local = *scalars, *s = &local;                                                     \
        C arg[BLOCK], root[BLOCK];                                                                        \
        for (int64_t at = 0; at < n; at += BLOCK) {                                                       \
            int64_t count = n - at < BLOCK ? n - at : BLOCK;                                              \
            for (int64_t i = 0; i < count; i++) {                                                         \
                C vi = LOAD(v[at + i]);                                                                   \
                arg[i] = s->bias_correction ? vi * s->r2 : vi;                                            \
            }                                                                                             \
            SQRT_BLOCK(arg, root, count);                                                                 \
            for (int64_t i = 0; i < count; i++) {                                                         \
                C p = LOAD(param[at + i]);                                                                \
                C u = ELEMENT##_direction(s, p, LOAD(m[at + i]), root[i]);                                \
                param[at + i] = STORE(FMA(s->neg_lr * u, ratio, p));                                      \
            }                                                                                             \
        }                                                                                                 \
    }                                                                                                     \
    static void NAME##_step(T *restrict param, T *restrict m, T *restrict v, const T *restrict grad,      \
                            int64_t n, int fresh, const struct S *scalars, C ratio) {                     \
        const struct S local = *scalars, *s = &local;                                                     \
        C p[BLOCK], mm[BLOCK], root[BLOCK];                                                               \
        for (int64_t at = 0; at < n; at += BLOCK) {                                                       \
            int64_t count = n - at < BLOCK ? n - at : BLOCK;                                              \
            NAME##_block(param + at, m + at, v + at, grad + at, count, fresh, s, 1, p, mm, root);          \
            for (int64_t i = 0; i < count; i++) {                                                         \
                C u = ELEMENT##_direction(s, p[i], mm[i], root[i]);                                       \
                param[at + i] = STORE(s->trust ? FMA(s->neg_lr * u, ratio, p[i]) : p[i] - u * s->lr);     \
            }                                                                                             \
        }                                                                                                 \
    }

DEFINE_RANGE(range_f32, float, float, scalars_f32, element_f32, fmaf, sqrt_block_f32, load_f32, store_f32)
DEFINE_RANGE(range_f64, double, double, scalars_f64, element_f64, fma, sqrt_block_f64, load_f64, store_f64)
DEFINE_RANGE(range_bf16, uint16_t, float, scalars_f32, element_f32, fmaf, sqrt_block_f32, fused_load_bf16,
             fused_store_bf16)
DEFINE_RANGE(range_fp16, uint16_t, float, scalars_f32, element_f32, fmaf, sqrt_block_f32, fused_load_fp16,
             fused_store_fp16)

/* The trust ratio of a slot from its two norms (w: the parameter's, n: u's), in C. */
#define DEFINE_RATIO(NAME, C)                                                                             \
    static C NAME(C w, C n, const struct lamb_hyper *h) {                                                 \
        if ((h->flags & CLAMP) && !(w <= (C)h->max_weight_norm)) w = w != w ? w : (C)h->max_weight_norm;  \
        return w > 0 && n > 0 ? w / n : (C)1;                                                             \
    }

DEFINE_RATIO(ratio_f32, float)
DEFINE_RATIO(ratio_f64, double)

/* The driver: pieces of the concatenation of the slots with a gradient; pass 1 into per-(piece,
 * slot) partials (with the trust ratio), the per-slot ratios, then pass 2. EXACT: the compute type
 * is the storage type, so pass 1 stores the moments and pass 2 reads them back. */
#define DEFINE_SEGMENTS(NAME, T, C, S, RANGE, RATIO, SQRT, EXACT)                                                \
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
        const int trust = (flags & TRUST_RATIO) != 0;                                                     \
        if (trust) {                                                                                      \
            parts = calloc((size_t)(2 * part_at[pieces] + 2), sizeof(double));                            \
            sums = calloc((size_t)(2 * slots + 2), sizeof(double));                                       \
            if (parts == 0 || sums == 0) goto out_of_memory;                                              \
            RUN_PIECES(T, RANGE, PASS_SUMS, EXACT)                                                        \
            for (int64_t k = 0; k < pieces; k++)                                                          \
                for (int64_t j = part_at[k]; j < part_at[k + 1]; j++) {                                   \
                    int64_t i = first[k] + (j - part_at[k]);                                              \
                    sums[2 * i] += parts[2 * j];                                                          \
                    sums[2 * i + 1] += parts[2 * j + 1];                                                  \
                }                                                                                         \
            C *norms = malloc((size_t)(2 * slots + 2) * sizeof(C)), *squares = (C *)sums;                 \
            if (norms == 0) goto out_of_memory;                                                           \
            for (int64_t i = 0; i < 2 * slots; i++) squares[i] = (C)sums[i]; /* in place: C <= double */ \
            for (int64_t i = 0; i < 2 * slots; i++) norms[i] = SQRT(squares[i]);                          \
            for (int64_t i = 0; i < slots; i++)                                                           \
                if (has_grad[i]) ratios[i] = RATIO(norms[2 * i], norms[2 * i + 1], &h);                   \
            free(norms);                                                                                  \
        }                                                                                                 \
        if (trust && EXACT) {                                                                             \
            RUN_PIECES(T, RANGE, PASS_APPLY, EXACT)                                                       \
        } else {                                                                                          \
            RUN_PIECES(T, RANGE, PASS_STEP, EXACT)                                                        \
        }                                                                                                 \
        free(first); free(part_at); free(ratios); free(scalars); free(parts); free(sums);                  \
        return fused_mark_started(has_grad, initialized, slots);                                          \
    out_of_memory:                                                                                        \
        free(first); free(part_at); free(ratios); free(scalars); free(parts); free(sums);                  \
        return -1;                                                                                        \
    }

enum lamb_pass { PASS_SUMS, PASS_APPLY, PASS_STEP };

/* One pass over every piece, each slot range of the piece through RANGE: PASS_SUMS writes its sums
 * into parts[2 * (part_at[k] + i - first[k])] (and stores the moments when EXACT), PASS_APPLY and
 * PASS_STEP store. */
#define RUN_PIECES(T, RANGE, PASS, EXACT)                                                                 \
    _Pragma("omp parallel num_threads(threads) if(pieces > 1 && threads > 1)")                            \
    {                                                                                                     \
        _Pragma("omp for schedule(dynamic, 1)")                                                           \
        for (int64_t k = 0; k < pieces; k++) {                                                            \
            const int64_t from = k * PIECE, end = from + PIECE < total ? from + PIECE : total;            \
            for (int64_t i = first[k]; i < slots && starts[i] < end; i++) {                               \
                int64_t lo = starts[i] > from ? starts[i] : from, hi = starts[i + 1] < end ? starts[i + 1] : end; \
                if (hi <= lo || !has_grad[i]) continue;                                                   \
                int64_t at = offsets[i] + (lo - starts[i]);                                               \
                const T *grad = (const T *)(intptr_t)grad_ptrs[i] + (lo - starts[i]);                     \
                if (PASS == PASS_SUMS)                                                                    \
                    RANGE##_sums(param + at, exp_avg + at, exp_avg_sq + at, grad, hi - lo, !initialized[i], \
                                 scalars + i, parts + 2 * (part_at[k] + i - first[k]), EXACT);            \
                else if (PASS == PASS_APPLY)                                                              \
                    RANGE##_apply(param + at, exp_avg + at, exp_avg_sq + at, hi - lo, scalars + i, ratios[i]); \
                else                                                                                      \
                    RANGE##_step(param + at, exp_avg + at, exp_avg_sq + at, grad, hi - lo, !initialized[i], \
                                 scalars + i, ratios[i]);                                                 \
            }                                                                                             \
        }                                                                                                 \
    }

DEFINE_SEGMENTS(lamb_segments_f32, float, float, scalars_f32, range_f32, ratio_f32, sqrtf, 1)
DEFINE_SEGMENTS(lamb_segments_f64, double, double, scalars_f64, range_f64, ratio_f64, sqrt, 1)
DEFINE_SEGMENTS(lamb_segments_bf16, uint16_t, float, scalars_f32, range_bf16, ratio_f32, sqrtf, 0)
DEFINE_SEGMENTS(lamb_segments_fp16, uint16_t, float, scalars_f32, range_fp16, ratio_f32, sqrtf, 0)
