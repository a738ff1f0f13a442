// The CPU twin: plain C++ loops over the arithmetic of qwen3_math.cuh, replaying each warp's lanes
// and butterfly serially so that every value is the one the CUDA kernel computes. OpenMP splits rows.
#include <math.h>

#include <vector>

#ifdef __AVX2__
#include <immintrin.h>
#endif

#include "api.h"
#include "qk_head.cuh"

using namespace qmath;

namespace {

// sum_k x[k] w[k] over K in the canonical lane order: what one warp of the GPU computes.
template <class T> float dot(const T* x, const T* w, int K, int accum) {
  float p[LANES];
  for (int lane = 0; lane < LANES; ++lane) p[lane] = lane_dot(x, w, K, lane, accum);
  return reduce_lanes<T>(p, accum);
}

// Softmax statistics of s[0..n): the max and 1 / sum(exp(s - max)), what one warp computes.
void softmax_stats(const float* s, int n, float* max_out, float* inv_sum) {
  float m = -INFINITY, p[LANES];
  for (int lane = 0; lane < LANES; ++lane) m = fmaxf(m, lane_max(s, n, lane));
  for (int lane = 0; lane < LANES; ++lane) p[lane] = lane_exp_sum(s, n, m, lane);
  *max_out = m;
  *inv_sum = 1.0f / reduce_lanes<float>(p, ACC_FP32);
}

template <class T> void rms_row(const T* src, const T* w, T* out, int dim, float eps, int mode) {
  float scale = rms_scale(dot(src, src, dim, ACC_FP32), dim, eps);
  for (int i = 0; i < dim; ++i) out[i] = from_f<T>(rms_apply<T>(to_f(src[i]), scale, to_f(w[i]), mode));
}

template <class T> void embed_t(const int64_t* ids, const T* table, T* out, int n, int h) {
  for (int r = 0; r < n; ++r)
    for (int i = 0; i < h; ++i) out[(size_t)r * h + i] = table[(size_t)ids[r] * h + i];
}

template <class T> void rmsnorm_t(const T* x, const T* w, T* out, int n, int dim, float eps, int mode) {
#pragma omp parallel for
  for (int r = 0; r < n; ++r) rms_row(x + (size_t)r * dim, w, out + (size_t)r * dim, dim, eps, mode);
}

// A row laid out lane-major: out[s][v][lane] = element v of lane `lane`'s chunk s (dot_first, dot_step)
// as float, zero past k, so that the 32 lane sums of `dot` run side by side over contiguous floats (the
// compiler vectorises them). Adding the zero padding changes no sum: a running sum that starts at +0
// stays put under +0. Only data moves here: the AVX2 transpose below writes the same floats.
template <class T> void lane_major_tail(const T* row, int k, int s, float* out) {
  for (; s * STRIDE < k; ++s)
    for (int v = 0; v < CHUNK; ++v)
      for (int lane = 0; lane < LANES; ++lane) {
        int base = dot_first(lane, k, ACC_FP32) + s * dot_step(ACC_FP32);
        out[(s * CHUNK + v) * LANES + lane] = base < k ? to_f(row[base + v]) : 0.f;
      }
}

#ifdef __AVX2__
inline __m256 load8_ps(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8_ps(const bf16* p) {  // bf16 bits are the top half of the float's
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
template <class T> __m256 load8_ps(const T* p) {
  float f[CHUNK];
  load8(p, f);
  return _mm256_loadu_ps(f);
}

// r[i] = row i of an 8x8 block of floats -> r[v] = column v.
inline void transpose8(__m256* r) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]), t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44), u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44), u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int v = 0; v < 4; ++v)
    r[v] = _mm256_permute2f128_ps(u[v], u[v + 4], 0x20), r[v + 4] = _mm256_permute2f128_ps(u[v], u[v + 4], 0x31);
}

template <class T> void lane_major(const T* row, int k, float* out) {
  int s = 0;
  for (; (s + 1) * STRIDE <= k; ++s)  // whole sweeps: 8 lanes x 8 elements per transpose
    for (int g = 0; g < LANES; g += 8) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i) r[i] = load8_ps(row + s * STRIDE + (g + i) * CHUNK);
      transpose8(r);
      for (int v = 0; v < CHUNK; ++v) _mm256_storeu_ps(out + (s * CHUNK + v) * LANES + g, r[v]);
    }
  lane_major_tail(row, k, s, out);
}
#else
template <class T> void lane_major(const T* row, int k, float* out) { lane_major_tail(row, k, 0, out); }
#endif

// `dot` over two lane-major rows of k elements: the same lanes, order and butterfly.
template <class T, int A> float dot_lane_major(const float* x, const float* w, int k) {
  float p[LANES] = {};
  const int sweeps = (k + STRIDE - 1) / STRIDE;
  if (A == ACC_COMPUTE) {  // lane 0's chunks, found where lane_major put them
    for (int base = dot_first(0, k, A); base < k; base += dot_step(A))
      for (int v = 0; v < CHUNK; ++v) {
        const int i = (base / STRIDE * CHUNK + v) * LANES + base % STRIDE / CHUNK;
        p[0] = acc_add<T>(p[0], x[i] * w[i], A);
      }
  } else {  // every lane's chunk s in step s, lanes side by side
    for (int i = 0; i < sweeps * CHUNK; ++i)
      for (int lane = 0; lane < LANES; ++lane)
        p[lane] = acc_add<T>(p[lane], x[i * LANES + lane] * w[i * LANES + lane], A);
  }
  return reduce_lanes<T>(p, A);
}

template <class T, int A> void linear_lane_major(const T* x, const T* w, T* y, int n, int k, int m) {
  const int sweeps = (k + STRIDE - 1) / STRIDE;
  const size_t len = (size_t)sweeps * STRIDE;
  std::vector<float> xs(n * len);
  for (int r = 0; r < n; ++r) lane_major(x + (size_t)r * k, k, xs.data() + r * len);
#pragma omp parallel
  {
    std::vector<float> ws(len);
#pragma omp for
    for (int j = 0; j < m; ++j) {
      lane_major(w + (size_t)j * k, k, ws.data());
      for (int r = 0; r < n; ++r) y[(size_t)r * m + j] = from_f<T>(dot_lane_major<T, A>(xs.data() + r * len, ws.data(), k));
    }
  }
}

// resid_out = resid_in + y, element by element (the epilogue of `linear` and `moe_combine`).
template <class T> void residual_add(const T* resid_in, const T* y, T* resid_out, size_t count) {
  if (resid_out)
    for (size_t i = 0; i < count; ++i) resid_out[i] = from_f<T>(add<T>(to_f(resid_in[i]), to_f(y[i])));
}

template <class T> void linear_t(const T* x, const T* w, T* y, int n, int k, int m, int accum, const T* resid_in,
                                 T* resid_out) {
  switch (accum) {  // the mode as a constant, so the fp32 sums vectorise
    case ACC_FP32: linear_lane_major<T, ACC_FP32>(x, w, y, n, k, m); break;
    case ACC_COMPUTE: linear_lane_major<T, ACC_COMPUTE>(x, w, y, n, k, m); break;
    case ACC_SPLIT: linear_lane_major<T, ACC_SPLIT>(x, w, y, n, k, m); break;
  }
  residual_add(resid_in, y, resid_out, (size_t)n * m);
}

template <class T> void qk_norm_rope_t(const QKRope& io, const int* pos, AttnDims a) {
#pragma omp parallel for collapse(2)
  for (int r = 0; r < a.cache.batch * a.tokens; ++r)
    for (int hh = 0; hh < a.heads + a.cache.kv_heads; ++hh) {
      const HeadTask<T> h(a, r, hh, pos, io);
      rms_row(h.src, h.weight, h.normed, a.cache.head_dim, io.eps, io.mode);
      for (int d = 0; d < a.cache.head_dim; ++d) h.rope(a, d, io);
    }
}

template <class T> void attention_t(const T* q, const T* k_cache, const T* v_cache, const int* pos, float* scores,
                                    T* probs, T* out, AttnDims a) {
  const int D = a.cache.head_dim, rep = a.heads / a.cache.kv_heads;
#pragma omp parallel for collapse(3)
  for (int b = 0; b < a.cache.batch; ++b)
    for (int h = 0; h < a.heads; ++h)
      for (int t = 0; t < a.tokens; ++t) {
        const int r = b * a.tokens + t, p = pos[r], g = h / rep;
        const size_t row = ((size_t)(b * a.heads + h) * a.tokens + t) * a.scores_ld;
        const T* qr = q + ((size_t)r * a.heads + h) * D;
        float* sc = scores + row;
        T* pr = probs + row;
        for (int s = 0; s <= p; ++s)
          sc[s] = scale_score<T>(dot(qr, k_cache + kv_offset(a.cache, a.layer, b, g, s, 0), D, a.accum), a.scale,
                                 a.round_scores);
        float m, inv;
        softmax_stats(sc, p + 1, &m, &inv);
        for (int s = 0; s <= p; ++s) pr[s] = from_f<T>(softmax_elem(sc[s], m, inv));
        for (int s = p + 1; s < a.scores_fill; ++s) { sc[s] = -INFINITY; pr[s] = from_f<T>(0.f); }
        T* o = out + ((size_t)r * a.heads + h) * D;
        for (int d = 0; d < D; ++d) {
          float acc = 0.f;
          for (int s = 0; s <= p; ++s)
            acc = acc_add<T>(acc, to_f(pr[s]) * to_f(v_cache[kv_offset(a.cache, a.layer, b, g, s, d)]), a.accum);
          o[d] = from_f<T>(acc);
        }
      }
}

template <class T> void silu_mul_t(const T* gate_up, T* out, int n, int inter) {
  for (int r = 0; r < n; ++r) {
    const T* gu = gate_up + (size_t)r * 2 * inter;
    for (int i = 0; i < inter; ++i) out[(size_t)r * inter + i] = from_f<T>(silu_mul<T>(to_f(gu[i]), to_f(gu[inter + i])));
  }
}

template <class T> void route_t(const T* logits, int64_t* ids, T* weights, int n, int experts, int k, int norm) {
  std::vector<float> probs(experts);
  for (int r = 0; r < n; ++r) {
    for (int e = 0; e < experts; ++e) probs[e] = to_f(logits[(size_t)r * experts + e]);
    float m, inv;
    softmax_stats(probs.data(), experts, &m, &inv);
    for (int e = 0; e < experts; ++e) probs[e] = softmax_elem(probs[e], m, inv);
    route_pick(probs.data(), experts, k, norm, ids + (size_t)r * k, weights + (size_t)r * k);
  }
}

template <class T> void moe_linear_t(const T* x, const int64_t* ids, const T* w, T* y, int n, int topk, int in,
                                     int out, int per_slot_input, int accum) {
#pragma omp parallel for collapse(2)
  for (int r = 0; r < n * topk; ++r)
    for (int j = 0; j < out; ++j) {
      const T* xr = x + (size_t)(per_slot_input ? r : r / topk) * in;
      y[(size_t)r * out + j] = from_f<T>(dot(xr, w + ((size_t)ids[r] * out + j) * in, in, accum));
    }
}

template <class T> void moe_combine_t(const T* y, const int64_t* ids, const T* weights, T* out, int n, int topk, int h,
                                      const T* resid_in, T* resid_out) {
  for (int r = 0; r < n; ++r)
    for (int i = 0; i < h; ++i)
      out[(size_t)r * h + i] = from_f<T>(moe_mix(y + (size_t)r * topk * h + i, h, ids + (size_t)r * topk,
                                                 weights + (size_t)r * topk, topk));
  residual_add(resid_in, out, resid_out, (size_t)n * h);
}

template <class T> void rope_table_t(T* cos, T* sin, int max_seq, int head_dim, float theta) {
  const int half = head_dim / 2;
  for (int p = 0; p < max_seq; ++p)
    for (int i = 0; i < half; ++i) {
      float angle = rope_angle(p, i, head_dim, theta);
      cos[(size_t)p * head_dim + i] = cos[(size_t)p * head_dim + i + half] = from_f<T>(cosf(angle));
      sin[(size_t)p * head_dim + i] = sin[(size_t)p * head_dim + i + half] = from_f<T>(sinf(angle));
    }
}

}  // namespace

void twin_embed(const int64_t* ids, const void* table, void* out, int n, int h, int dt) {
  QMATH_DISPATCH(dt, embed_t<T>(ids, (const T*)table, (T*)out, n, h));
}

void twin_rmsnorm(const void* x, const void* w, void* out, int n, int dim, float eps, int mode, int dt) {
  QMATH_DISPATCH(dt, rmsnorm_t<T>((const T*)x, (const T*)w, (T*)out, n, dim, eps, mode));
}

void twin_linear(const void* x, const void* w, void* y, int n, int k, int m, int accum, const void* resid_in,
                 void* resid_out, int dt) {
  QMATH_DISPATCH(dt, linear_t<T>((const T*)x, (const T*)w, (T*)y, n, k, m, accum, (const T*)resid_in, (T*)resid_out));
}

void twin_qk_norm_rope(const QKRope& io, const int* pos, AttnDims a, int dt) {
  QMATH_DISPATCH(dt, qk_norm_rope_t<T>(io, pos, a));
}

void twin_attention(const void* q, const void* k_cache, const void* v_cache, const int* pos, float* scores,
                    void* probs, void* out, AttnDims a, int dt) {
  QMATH_DISPATCH(dt, attention_t<T>((const T*)q, (const T*)k_cache, (const T*)v_cache, pos, scores, (T*)probs,
                                    (T*)out, a));
}

void twin_silu_mul(const void* gate_up, void* out, int n, int inter, int dt) {
  QMATH_DISPATCH(dt, silu_mul_t<T>((const T*)gate_up, (T*)out, n, inter));
}

void twin_route(const void* logits, int64_t* ids, void* weights, int n, int experts, int k, int norm, int dt) {
  QMATH_DISPATCH(dt, route_t<T>((const T*)logits, ids, (T*)weights, n, experts, k, norm));
}

void twin_moe_linear(const void* x, const int64_t* ids, const void* w, void* y, int n, int topk, int in, int out,
                     int per_slot_input, int accum, int dt) {
  QMATH_DISPATCH(dt, moe_linear_t<T>((const T*)x, ids, (const T*)w, (T*)y, n, topk, in, out, per_slot_input, accum));
}

void twin_moe_combine(const void* y, const int64_t* ids, const void* weights, void* out, int n, int topk, int h,
                      const void* resid_in, void* resid_out, int dt) {
  QMATH_DISPATCH(dt, moe_combine_t<T>((const T*)y, ids, (const T*)weights, (T*)out, n, topk, h, (const T*)resid_in,
                                      (T*)resid_out));
}

void twin_rope_table(void* cos, void* sin, int max_seq, int head_dim, float theta, int dt) {
  QMATH_DISPATCH(dt, rope_table_t<T>((T*)cos, (T*)sin, max_seq, head_dim, theta));
}
