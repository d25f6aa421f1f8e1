/* fused_half.h's block converters, exported for tests/test_native.py: each converts n elements
 * from src to dst. Built by fused_core.native like any kernel source (fused_half.h's directory
 * is on the include path). */
#include <stdint.h>

#include "fused_half.h"

void bf16_to_f32(const uint16_t *src, float *dst, int64_t n) { fused_bf16_to_f32(src, dst, n); }

void f32_to_bf16(const float *src, uint16_t *dst, int64_t n) { fused_f32_to_bf16(src, dst, n); }

void fp16_to_f32(const uint16_t *src, float *dst, int64_t n) { fused_fp16_to_f32(src, dst, n); }

void f32_to_fp16(const float *src, uint16_t *dst, int64_t n) { fused_f32_to_fp16(src, dst, n); }

/* fused_half.h's bf16 pairs (how elementwise kernels read and write bf16) as block converters:
 * elements 2i and 2i + 1 through one 32-bit word, an odd last element alone. */
void bf16_pairs_to_f32(const uint16_t *src, float *dst, int64_t n) {
    const fused_bf16_pair *words = (const fused_bf16_pair *)src;
    for (int64_t i = 0; i < n / 2; i++) {
        dst[2 * i] = fused_pair_low(words[i]);
        dst[2 * i + 1] = fused_pair_high(words[i]);
    }
    if (n & 1) dst[n - 1] = fused_load_bf16(src[n - 1]);
}

void f32_to_bf16_pairs(const float *src, uint16_t *dst, int64_t n) {
    fused_bf16_pair *words = (fused_bf16_pair *)dst;
    for (int64_t i = 0; i < n / 2; i++) words[i] = fused_pair_of(src[2 * i], src[2 * i + 1]);
    if (n & 1) dst[n - 1] = fused_store_bf16(src[n - 1]);
}
