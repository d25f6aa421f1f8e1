/* fp16 and bf16 <-> fp32 conversions for fused-optim's C kernels.
 *
 * Loads are exact; stores round to nearest, ties to even, as torch's `.to(torch.float16)` and
 * `.to(torch.bfloat16)` do. Scalar conversions use integer bit operations only:
 *
 *   bf16 store: the top 16 bits of the fp32 pattern u, rounded: (u + 0x7fff + ((u >> 16) & 1)) >> 16;
 *               NaN becomes the quiet NaN 0x7fc0.
 *   fp16 load:  rebias the exponent by 127 - 15; subnormals are mantissa * 2^-24; inf/NaN kept.
 *   fp16 store: |f| >= 65520 -> inf; |f| >= 2^-14 -> rebias the exponent by 15 - 127 and round the
 *               mantissa to 10 bits; smaller -> subnormal, rounded by adding 0.5f in fp32 (whose
 *               ulp is 2^-24, the fp16 subnormal step); NaN -> 0x7e00. The sign is kept.
 *
 * The block converters (n elements between a 16-bit array and an fp32 array) are what kernels
 * call: plain loops a compiler vectorises, and x86's F16C instructions for fp16 where the
 * compiler targets them.
 */
#ifndef FUSED_HALF_H
#define FUSED_HALF_H

#include <stdint.h>
#include <string.h>
#if defined(__F16C__)
#include <immintrin.h>
#endif

#define FUSED_INLINE static inline __attribute__((always_inline))

FUSED_INLINE float fused_bits_to_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
FUSED_INLINE uint32_t fused_f32_to_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

/* cond ? a : b without a branch (a branch can stop a compiler from vectorising a loop). */
FUSED_INLINE uint32_t fused_select(int cond, uint32_t a, uint32_t b) {
    uint32_t mask = (uint32_t)0 - (uint32_t)(cond != 0);
    return (a & mask) | (b & ~mask);
}

FUSED_INLINE float fused_load_bf16(uint16_t x) { return fused_bits_to_f32((uint32_t)x << 16); }

/* The fp32 pattern whose top 16 bits are f rounded to bf16 (the low 16 bits are junk). */
FUSED_INLINE uint32_t fused_bf16_rounded(float f) {
    uint32_t u = fused_f32_to_bits(f);
    uint32_t rounded = u + 0x7fffu + ((u >> 16) & 1u);
    return f != f ? 0x7fc00000u : rounded; /* NaN; this select vectorises, and faster than fused_select */
}

FUSED_INLINE uint16_t fused_store_bf16(float f) { return (uint16_t)(fused_bf16_rounded(f) >> 16); }

/* bf16 pairs: elements 2i and 2i + 1 of a bf16 array read and written as one 32-bit word w
 * (little-endian: element 2i is its low half). A loop over words converts a pair with one shift
 * (low: w << 16) and one mask (high: w & 0xffff0000) and stores it with one shift and one or, where
 * a loop over elements needs zero-extensions, packs and lane permutes (about twice the work of the
 * arithmetic of an SGD step on AVX2). Elementwise kernels loop over the words of a range, the
 * update written once per element and called for the low and the high element, then take an odd
 * last element alone. The bits are fused_load_bf16's and fused_store_bf16's. */
typedef uint32_t fused_bf16_pair __attribute__((aligned(2), may_alias));

/* A kernel's HEAD for the types that have no pairs: it takes no leading elements. */
#define FUSED_NO_PAIRS(...) 0

FUSED_INLINE float fused_pair_low(uint32_t w) { return fused_bits_to_f32(w << 16); }
FUSED_INLINE float fused_pair_high(uint32_t w) { return fused_bits_to_f32(w & 0xffff0000u); }
FUSED_INLINE uint32_t fused_pair_of(float low, float high) {
    return (fused_bf16_rounded(low) >> 16) | (fused_bf16_rounded(high) & 0xffff0000u);
}

FUSED_INLINE float fused_load_fp16(uint16_t h) {
    uint32_t magnitude = h & 0x7fffu;
    uint32_t normal = (magnitude << 13) + ((uint32_t)(127 - 15) << 23);
    uint32_t inf_nan = (magnitude << 13) | 0x7f800000u;
    uint32_t subnormal = fused_f32_to_bits((float)(int32_t)magnitude * 5.9604644775390625e-08f); /* 2^-24 */
    uint32_t bits = fused_select(magnitude >= 0x7c00u, inf_nan, fused_select(magnitude >= 0x0400u, normal, subnormal));
    return fused_bits_to_f32(bits | (((uint32_t)h & 0x8000u) << 16));
}

FUSED_INLINE uint16_t fused_store_fp16(float f) {
    uint32_t u = fused_f32_to_bits(f);
    uint32_t a = u & 0x7fffffffu;
    uint32_t rebiased = a - ((uint32_t)(127 - 15) << 23);
    uint32_t normal = (rebiased + 0xfffu + ((rebiased >> 13) & 1u)) >> 13;
    uint32_t subnormal = fused_f32_to_bits(fused_bits_to_f32(a) + 0.5f) - 0x3f000000u; /* bits of 0.5f */
    uint32_t finite = fused_select(a >= 0x38800000u, normal, subnormal);
    uint32_t half = fused_select(a > 0x7f800000u, 0x7e00u, fused_select(a >= 0x477ff000u, 0x7c00u, finite));
    return (uint16_t)(half | ((u >> 16) & 0x8000u));
}

FUSED_INLINE void fused_bf16_to_f32(const uint16_t *restrict src, float *restrict dst, int64_t n) {
    for (int64_t i = 0; i < n; i++) dst[i] = fused_load_bf16(src[i]);
}

FUSED_INLINE void fused_f32_to_bf16(const float *restrict src, uint16_t *restrict dst, int64_t n) {
    for (int64_t i = 0; i < n; i++) dst[i] = fused_store_bf16(src[i]);
}

FUSED_INLINE void fused_fp16_to_f32(const uint16_t *restrict src, float *restrict dst, int64_t n) {
    int64_t i = 0;
#if defined(__F16C__)
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
#endif
    for (; i < n; i++) dst[i] = fused_load_fp16(src[i]);
}

FUSED_INLINE void fused_f32_to_fp16(const float *restrict src, uint16_t *restrict dst, int64_t n) {
    int64_t i = 0;
#if defined(__F16C__)
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
#endif
    for (; i < n; i++) dst[i] = fused_store_fp16(src[i]);
}

#endif
