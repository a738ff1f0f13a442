// One (token, head) task of q/k norm + RoPE: where its rows are read and written, and the RoPE of one
// element with its cache writes. The twin's loop and the CUDA kernel's warps both run it.
#pragma once

#include "api.h"

// One (token r, head hh) task of q/k norm + RoPE: hh < nH is query head hh, else kv head hh - nH, whose
// roped key and raw value also go to the cache slot of the token's position.
template <class T> struct HeadTask {
  bool is_q;
  int g, b, p, half;
  const T *src, *weight, *v;
  T *normed, *roped;

  QD HeadTask(const AttnDims& a, int r, int hh, const int* pos, const QKRope& io) {
    const int D = a.cache.head_dim, nKV = a.cache.kv_heads, ld = (a.heads + 2 * nKV) * D;
    const T* qkv = (const T*)io.qkv;
    is_q = hh < a.heads, g = hh - a.heads, b = r / a.tokens, p = pos[r], half = D / 2;
    src = qkv + (size_t)r * ld + (size_t)hh * D;
    v = qkv + (size_t)r * ld + (size_t)(a.heads + nKV + g) * D;
    weight = (const T*)(is_q ? io.q_weight : io.k_weight);
    normed = is_q ? (T*)io.q_norm + ((size_t)r * a.heads + hh) * D : (T*)io.k_norm + ((size_t)r * nKV + g) * D;
    roped = is_q ? (T*)io.q_rope + ((size_t)r * a.heads + hh) * D : (T*)io.k_rope + ((size_t)r * nKV + g) * D;
  }

  // RoPE of element d of the normalised head (all of `normed` written before), and its cache writes.
  QD void rope(const AttnDims& a, int d, const QKRope& io) const {
    const size_t at = (size_t)p * a.cache.head_dim + d;
    const T *cos = (const T*)io.cos, *sin = (const T*)io.sin;
    roped[d] = qmath::from_f<T>(qmath::rope_apply<T>(qmath::to_f(normed[d]), qmath::to_f(normed[d < half ? d + half : d - half]),
                                                     qmath::to_f(cos[at]), qmath::to_f(sin[at]), d < half));
    if (!is_q) {
      ((T*)io.k_cache)[qmath::kv_offset(a.cache, a.layer, b, g, p, d)] = roped[d];
      ((T*)io.v_cache)[qmath::kv_offset(a.cache, a.layer, b, g, p, d)] = v[d];
    }
  }
};
