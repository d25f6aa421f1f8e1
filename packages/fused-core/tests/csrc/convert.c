/* fused_half.h's block converters, exported for tests/test_native.py: each converts n elements
 * from src to dst. Built by fused_core.native like any kernel source (fused_half.h's directory
 * is on the include path). */
#include <stdint.h>

#include "fused_half.h"

void bf16_to_f32(const uint16_t *src, float *dst, int64_t n) { fused_bf16_to_f32(src, dst, n); }

void f32_to_bf16(const float *src, uint16_t *dst, int64_t n) { fused_f32_to_bf16(src, dst, n); }

void fp16_to_f32(const uint16_t *src, float *dst, int64_t n) { fused_fp16_to_f32(src, dst, n); }

void f32_to_fp16(const float *src, uint16_t *dst, int64_t n) { fused_f32_to_fp16(src, dst, n); }
