// The arithmetic of every `mine` kernel, once: per-element and per-row functions shared by the CUDA
// kernels (kernels.cu) and the CPU twin (twin.cpp). No torch, no CUDA runtime: plain C++ that nvcc
// compiles for the device and the host compiler compiles for the twin.
//
// Rounding model: values are stored in the compute dtype T (float, bf16, fp16); every op loads them
// as float, computes in float, and rounds to T exactly where transformers rounds (rnd<T>). Both
// builds forbid contracting a*b+c into an FMA (-ffp-contract=off, nvcc -fmad=false), so a product
// and a sum are two IEEE roundings on both sides, as in PyTorch's elementwise ops.
//
// Every reduction has one canonical order, the warp's: 32 lanes each accumulate their own elements
// in ascending order, then a butterfly (xor 16, 8, 4, 2, 1) combines the lanes. Each order is written
// here once (dot_first/dot_step, lane_exp_sum, reduce_lanes); the twin replays the same lanes and the
// same butterfly, so a GPU sum and a twin sum are the same bits.
#pragma once

#include <stdint.h>
#include <string.h>
#include <math.h>

#ifdef __CUDACC__
#define QD __host__ __device__ __forceinline__
#else
#define QD inline
#endif

namespace qmath {

constexpr int LANES = 32;
constexpr int CHUNK = 8;                     // elements a lane reads at once (16 bytes of bf16)
constexpr int STRIDE = LANES * CHUNK;        // elements one sweep of the warp covers

// ---- storage types and rounding -------------------------------------------------------------------

struct bf16 { uint16_t bits; };
struct f16 { uint16_t bits; };

enum Dtype { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };
enum Accum { ACC_FP32 = 0, ACC_COMPUTE = 1, ACC_SPLIT = 2 };   // see numerics.py
enum NormMode { NORM_HF = 0, NORM_FUSED = 1 };

QD float f32_from_bits(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f; memcpy(&f, &u, 4); return f;
#endif
}

QD uint32_t bits_from_f32(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u; memcpy(&u, &f, 4); return u;
#endif
}

QD float to_f(float x) { return x; }
QD float to_f(bf16 x) { return f32_from_bits((uint32_t)x.bits << 16); }
QD float to_f(f16 x) {
  uint32_t h = x.bits, sign = (h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0) {  // zero or subnormal: m * 2^-24 is exact in float
    float v = (float)m * 5.9604644775390625e-8f;
    return f32_from_bits(bits_from_f32(v) | sign);
  }
  if (e == 31) return f32_from_bits(sign | 0x7f800000u | (m << 13));
  return f32_from_bits(sign | ((e + 112) << 23) | (m << 13));
}

template <class T> QD T from_f(float x);
template <> QD float from_f<float>(float x) { return x; }
template <> QD bf16 from_f<bf16>(float x) {  // round to nearest even, NaN stays NaN
  uint32_t u = bits_from_f32(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{(uint16_t)((u >> 16) | 0x40u)};
  return bf16{(uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}
template <> QD f16 from_f<f16>(float x) {  // round to nearest even, overflow to inf, subnormals kept
  uint32_t u = bits_from_f32(x), sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return f16{(uint16_t)(sign | 0x7e00u)};
  if (a >= 0x477ff000u) return f16{(uint16_t)(sign | 0x7c00u)};  // >= 65520 rounds to inf
  if (a < 0x38800000u) {                                         // below 2^-14: a half subnormal
    uint32_t e = a >> 23;
    if (e < 102) return f16{(uint16_t)sign};
    uint32_t m = (a & 0x7fffffu) | 0x800000u, shift = 126 - e;
    uint32_t r = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1u))) r++;
    return f16{(uint16_t)(sign | r)};
  }
  return f16{(uint16_t)(sign | ((a - 0x38000000u + 0xfffu + ((a >> 13) & 1u)) >> 13))};
}

// Round a float to T and back: the one rounding step of every op.
template <class T> QD float rnd(float x) { return to_f(from_f<T>(x)); }

template <class T> QD void load8(const T* p, float* out) {
  for (int v = 0; v < CHUNK; ++v) out[v] = to_f(p[v]);
}
#ifdef __CUDA_ARCH__
template <> __device__ __forceinline__ void load8<bf16>(const bf16* p, float* out) {
  uint4 raw = *reinterpret_cast<const uint4*>(p);  // one 16-byte load; callers keep rows 16-byte aligned
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
  for (int i = 0; i < 4; ++i) { out[2 * i] = f32_from_bits(w[i] << 16); out[2 * i + 1] = f32_from_bits(w[i] & 0xffff0000u); }
}
#endif

// ---- reductions in the canonical lane order -------------------------------------------------------

// One multiply-add of a dot product. ACC_COMPUTE rounds the running sum to T after every add.
template <class T> QD float acc_add(float acc, float prod, int accum) {
  float s = acc + prod;
  return accum == ACC_COMPUTE ? rnd<T>(s) : s;
}

// Combining two lanes' partial sums (one butterfly stage). ACC_SPLIT rounds each lane's fp32 partial
// to T and sums the partials in T, as a split-K GEMM with T-typed partials does.
template <class T> QD float lane_combine(float a, float b, int accum) {
  float s = accum == ACC_FP32 ? a + b : rnd<T>(a) + rnd<T>(b);
  return accum == ACC_FP32 ? s : rnd<T>(s);
}

// The butterfly over 32 lane partials, replayed serially (the twin's side of a warp shuffle).
template <class T> QD float reduce_lanes(float* p, int accum) {
  float t[LANES];
  for (int off = LANES / 2; off > 0; off /= 2) {
    for (int j = 0; j < LANES; ++j) t[j] = lane_combine<T>(p[j], p[j ^ off], accum);
    for (int j = 0; j < LANES; ++j) p[j] = t[j];
  }
  return p[0];
}

// Softmax statistics of s[0..n): lane `lane` takes s[lane], s[lane + LANES], ... in ascending order.
// The lanes' maxima combine in any order (a max is exact); their sums of exp(s - max) by the butterfly,
// in fp32 (reduce_lanes or the warp's shuffles with ACC_FP32).
QD float lane_max(const float* s, int n, int lane) {
  float m = -INFINITY;
  for (int i = lane; i < n; i += LANES) m = fmaxf(m, s[i]);
  return m;
}

QD float lane_exp_sum(const float* s, int n, float max, int lane) {
  float acc = 0.f;
  for (int i = lane; i < n; i += LANES) acc += expf(s[i] - max);
  return acc;
}

// The order of a dot product over K (a multiple of CHUNK): chunks of CHUNK elements, each added in
// ascending k. Lane `lane` takes the chunks that start at dot_first and follow one another dot_step
// apart, below K: chunk `lane` of every sweep of STRIDE elements, which the butterfly then combines.
// ACC_COMPUTE instead keeps one running sum over every chunk in ascending order, in lane 0, as a
// plain loop accumulating in T does (the butterfly then adds the other lanes' exact zeros).
QD int dot_first(int lane, int K, int accum) { return accum == ACC_COMPUTE ? (lane == 0 ? 0 : K) : lane * CHUNK; }
QD int dot_step(int accum) { return accum == ACC_COMPUTE ? CHUNK : STRIDE; }

// ---- per-element arithmetic -----------------------------------------------------------------------

// 1 / sqrt(mean(x^2) + eps) from the row's sum of squares (fp32, correctly rounded sqrt and divide).
QD float rms_scale(float sumsq, int n, float eps) { return 1.0f / sqrtf(sumsq / (float)n + eps); }

// RMSNorm of one element. NORM_HF: normalise in fp32, round to T, then multiply by the weight in T
// (transformers). NORM_FUSED: multiply in fp32 and round once.
template <class T> QD float rms_apply(float x, float scale, float weight, int mode) {
  float normed = x * scale;
  return mode == NORM_HF ? rnd<T>(weight * rnd<T>(normed)) : rnd<T>(weight * normed);
}

// Rotate-half RoPE of element d of a head: x*cos + rotate_half(x)*sin, each op rounded in T.
// `partner` is element d +- D/2; rotate_half negates it for the first half.
template <class T> QD float rope_apply(float x, float partner, float c, float s, bool first_half) {
  float rot = first_half ? -partner : partner;
  return rnd<T>(rnd<T>(x * c) + rnd<T>(rot * s));
}

// The RoPE angle of frequency i at a position, in fp32 as transformers computes it:
// inv_freq = 1 / theta^(2i/D), angle = pos * inv_freq.
QD float rope_angle(int pos, int i, int head_dim, float theta) {
  float inv_freq = 1.0f / powf(theta, (float)(2 * i) / (float)head_dim);
  return (float)pos * inv_freq;
}

template <class T> QD float silu_mul(float gate, float up) {
  return rnd<T>(rnd<T>(gate / (1.0f + expf(-gate))) * up);
}

template <class T> QD float add(float a, float b) { return rnd<T>(a + b); }

// A scaled attention score: (q . k) rounded to the scores dtype, times D^-0.5, rounded again.
// round_scores false keeps both in fp32 (as fused attention kernels do).
template <class T> QD float scale_score(float dot, float scale, bool round_scores) {
  return round_scores ? rnd<T>(rnd<T>(dot) * scale) : dot * scale;
}

// Softmax of one element given the row's max and the sum of exp(x - max): fp32, times 1/sum.
QD float softmax_elem(float x, float max, float inv_sum) { return expf(x - max) * inv_sum; }

// MoE: expert outputs weighted in T and accumulated expert by expert in T.
template <class T> QD float moe_accumulate(float acc, float expert_out, float weight) {
  return rnd<T>(acc + rnd<T>(expert_out * weight));
}

// MoE routing of one token from its softmax probabilities over all experts (fp32, destroyed):
// the k largest by descending probability (lowest id on ties), renormalised in fp32 to sum to one
// iff `norm`, then rounded to T.
template <class T> QD void route_pick(float* probs, int experts, int k, int norm, int64_t* ids, T* weights) {
  float total = 0.f;
  for (int j = 0; j < k; ++j) {
    int best = -1;
    for (int e = 0; e < experts; ++e)
      if (probs[e] >= 0.f && (best < 0 || probs[e] > probs[best])) best = e;
    ids[j] = best;
    total += probs[best];
    probs[best] = -1.f - probs[best];     // marks it taken and keeps the value: -1 - p
  }
  for (int j = 0; j < k; ++j) {
    float p = -1.f - probs[ids[j]];
    weights[j] = from_f<T>(norm ? p / total : p);
  }
}

// The slot holding the smallest expert id above `last` among a token's k (distinct) experts: walking
// slots in ascending expert id is how transformers' eager MoE adds expert outputs.
QD int next_slot(const int64_t* ids, int k, int64_t last) {
  int slot = -1;
  for (int j = 0; j < k; ++j)
    if (ids[j] > last && (slot < 0 || ids[j] < ids[slot])) slot = j;
  return slot;
}

// One element of a token's MoE output: its k expert outputs y[slot * h], weighted and accumulated.
template <class T> QD float moe_mix(const T* y, size_t h, const int64_t* ids, const T* weights, int k) {
  float acc = 0.f;
  int64_t last = -1;
  for (int step = 0; step < k; ++step) {
    int slot = next_slot(ids, k, last);
    last = ids[slot];
    acc = moe_accumulate<T>(acc, to_f(y[slot * h]), to_f(weights[slot]));
  }
  return acc;
}

// ---- products -------------------------------------------------------------------------------------

// Where a product's input rows come from: stored rows of T (Rows), or, for a single-token step,
// values computed as they are read that are the very floats the separate op would have stored:
// RMSNorm of a row whose scale is known (NormRow) or SwiGLU's silu(gate) * up (SiluRow). load(r, base,
// out) gives the CHUNK floats of row r from column `base` on.
template <class T> struct Rows {
  const T* x;
  size_t stride;
  QD void load(int r, int base, float* out) const { load8(x + r * stride + base, out); }
};

template <class T> struct NormRow {
  const T *x, *weight;
  float scale;
  int mode;
  QD void load(int, int base, float* out) const {
    float w[CHUNK];
    load8(x + base, out);
    load8(weight + base, w);
    for (int v = 0; v < CHUNK; ++v) out[v] = rms_apply<T>(out[v], scale, w[v], mode);
  }
};

template <class T> struct SiluRow {
  const T *gate, *up;
  QD void load(int, int base, float* out) const {
    float u[CHUNK];
    load8(gate + base, out);
    load8(up + base, u);
    for (int v = 0; v < CHUNK; ++v) out[v] = silu_mul<T>(out[v], u[v]);
  }
};

// Lane `lane`'s partials of sum_k x_r[k] * w[k] for R rows x_r of `x` (rows >= `rows` are skipped), K a
// multiple of CHUNK, its chunks in the order of dot_first and dot_step. R > 1 lets a kernel read each
// chunk of w once for several tokens; every row's arithmetic is the same as with R = 1.
template <class T, int R, class X>
QD void lane_dot_rows(const X& x, int rows, const T* w, int K, int lane, int accum, float* acc) {
  float xv[CHUNK], wv[CHUNK];
  for (int r = 0; r < R; ++r) acc[r] = 0.f;
  const int first = dot_first(lane, K, accum), step = dot_step(accum);
#ifdef __CUDA_ARCH__
#pragma unroll 4
#endif
  for (int base = first; base < K; base += step) {
    load8(w + base, wv);
    for (int r = 0; r < R; ++r) {  // a constant trip count keeps acc[] in registers
      if (r >= rows) break;
      x.load(r, base, xv);
      for (int v = 0; v < CHUNK; ++v) acc[r] = acc_add<T>(acc[r], xv[v] * wv[v], accum);
    }
  }
}

template <class T> QD float lane_dot(const T* x, const T* w, int K, int lane, int accum) {
  float acc;
  lane_dot_rows<T, 1>(Rows<T>{x, 0}, 1, w, K, lane, accum, &acc);
  return acc;
}

}  // namespace qmath

// Run the statement(s) with T bound to the storage type of dtype code `dt`.
#define QMATH_DISPATCH(dt, ...)                                                        \
  do {                                                                                 \
    switch (dt) {                                                                      \
      case qmath::DT_F32: { using T = float; __VA_ARGS__; break; }                    \
      case qmath::DT_BF16: { using T = qmath::bf16; __VA_ARGS__; break; }             \
      case qmath::DT_F16: { using T = qmath::f16; __VA_ARGS__; break; }               \
    }                                                                                  \
  } while (0)
