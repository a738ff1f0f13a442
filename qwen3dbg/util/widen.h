/* Widening each stored element type to double exactly: shared by the differ's and the scan's kernels. */
#pragma once
#include <stdint.h>
#include <string.h>

static inline double from_f64(uint64_t u) { double d; memcpy(&d, &u, 8); return d; }
static inline double from_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline double from_bf16(uint16_t u) { return from_f32((uint32_t)u << 16); }
/* Exact and vectorizable (a _Float16 cast becomes a library call per element): the magnitude bits
   moved to a float's place and scaled by 2^112, which also normalizes subnormals; all-ones exponents
   are set to inf/NaN, then the sign. */
static inline double from_f16(uint16_t h) {
    uint32_t mag = (uint32_t)(h & 0x7fff) << 13, u;
    float f;
    memcpy(&f, &mag, 4);
    f *= 0x1p112f;
    memcpy(&u, &f, 4);
    u |= (h & 0x7c00) == 0x7c00 ? 0x7f800000u : 0u;
    u |= (uint32_t)(h & 0x8000) << 16;
    return from_f32(u);
}
