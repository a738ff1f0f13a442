// Torch bindings of `mine`: check the tensors, then call the CPU twin or the CUDA launcher of the same
// op by the device of the tensors (in the emulated build, always the CUDA launcher, on CPU tensors).
// The only file that sees torch.
#include <torch/extension.h>

#include <optional>

#include "api.h"

// FUSED(on): whether the CUDA-only one-token kernels (cuda_norm_linear, cuda_silu_linear) serve tensors
// like `on`; STREAM: the stream they and the other CUDA launchers run on.
#ifdef MINE_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#define STREAM ((void*)c10::cuda::getCurrentCUDAStream().stream())
#define FUSED(on) ((on).is_cuda())
#define LAUNCHED() C10_CUDA_KERNEL_LAUNCH_CHECK()  // a launch that failed (resources, config) raises here
#define RUN(op, on, ...)                  \
  do {                                    \
    if ((on).is_cuda()) {                 \
      cuda_##op(__VA_ARGS__, STREAM);     \
      LAUNCHED();                         \
    } else {                              \
      twin_##op(__VA_ARGS__);             \
    }                                     \
  } while (0)
#elif defined(MINE_EMULATE_CUDA)
#define STREAM nullptr
#define FUSED(on) true
#define LAUNCHED() (void)0
#define RUN(op, on, ...) cuda_##op(__VA_ARGS__, nullptr)  // the CUDA kernels, on CPU tensors (cuda_emu.h)
#else
#define RUN(op, on, ...)                                                                            \
  do {                                                                                              \
    TORCH_CHECK(!(on).is_cuda(), "mine was built without CUDA: this torch has no CUDA support");   \
    twin_##op(__VA_ARGS__);                                                                         \
  } while (0)
#endif

namespace {

int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return qmath::DT_F32;
    case at::kBFloat16: return qmath::DT_BF16;
    case at::kHalf: return qmath::DT_F16;
    default: TORCH_CHECK(false, "mine computes in float32, bfloat16 or float16, not ", t.scalar_type());
  }
}

// Contiguous, on `like`'s device, and of `like`'s dtype or, for index and score buffers, `dtype`:
// the kernels take raw pointers, so a wrong dtype here would be read as garbage, not refused.
const at::Tensor& check(const at::Tensor& t, const at::Tensor& like, std::optional<at::ScalarType> dtype = std::nullopt) {
  TORCH_CHECK(t.is_contiguous(), "mine kernels take contiguous tensors");
  TORCH_CHECK(t.device() == like.device(), "mine: tensors on different devices");
  const at::ScalarType want = dtype.value_or(like.scalar_type());
  TORCH_CHECK(t.scalar_type() == want, "mine: a ", t.scalar_type(), " tensor where ", want, " is expected");
  return t;
}

template <class P = void> P* ptr(const at::Tensor& t) { return t.numel() ? (P*)t.data_ptr() : nullptr; }

void check_rows(int64_t k) { TORCH_CHECK(k % qmath::CHUNK == 0, "mine: row length ", k, " is not a multiple of 8"); }

// `t` holds `rows` rows of `len` elements (the kernels index it so, past its end otherwise).
void check_numel(const at::Tensor& t, int64_t rows, int64_t len) {
  TORCH_CHECK(t.numel() == rows * len, "mine: a tensor of ", t.numel(), " elements where ", rows, " x ", len, " are indexed");
}

// q [B*T, nH, D] against the cache [L, B, nKV, S_max, D]; only this layer's slice is addressed.
AttnDims attn_dims(const at::Tensor& q, const at::Tensor& k_cache, int64_t batch, int64_t layer) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 5, "mine: q is [N, heads, head_dim] and the cache [L, B, kv heads, slots, head_dim]");
  TORCH_CHECK(k_cache.size(1) == batch && q.size(0) % batch == 0, "mine: ", q.size(0), " rows do not make ", batch,
              " sequences of the cache's batch ", k_cache.size(1));
  TORCH_CHECK(q.size(2) == k_cache.size(4) && q.size(1) % k_cache.size(2) == 0, "mine: ", q.size(1), " heads of ",
              q.size(2), " do not share ", k_cache.size(2), " kv heads of ", k_cache.size(4));
  TORCH_CHECK(0 <= layer && layer < k_cache.size(0), "mine: layer ", layer, " outside the cache's ", k_cache.size(0));
  AttnDims a{};
  a.tokens = (int)(q.size(0) / batch);
  a.heads = (int)q.size(1);
  a.cache = qmath::KVShape{(int)k_cache.size(1), (int)k_cache.size(2), (int)k_cache.size(3), (int)k_cache.size(4)};
  a.layer = (int)layer;
  return a;
}

void embed(const at::Tensor& ids, const at::Tensor& table, const at::Tensor& out) {
  check(ids, table, at::kLong), check(out, table), check_numel(out, ids.numel(), table.size(1));
  RUN(embed, table, ptr<int64_t>(ids), ptr(table), ptr(out), (int)ids.numel(), (int)table.size(1), dtype_code(table));
}

void rmsnorm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& out, double eps, int64_t mode) {
  check(x, w), check(out, w), check_rows(w.numel());
  const int64_t n = x.numel() / w.numel();
  check_numel(x, n, w.numel()), check_numel(out, n, w.numel());
  RUN(rmsnorm, w, ptr(x), ptr(w), ptr(out), (int)n, (int)w.numel(), (float)eps, (int)mode, dtype_code(w));
}

void silu_mul(const at::Tensor& gate_up, const at::Tensor& out) {
  check(out, gate_up), check_numel(gate_up, out.numel() / out.size(-1), 2 * out.size(-1));
  RUN(silu_mul, gate_up, ptr(gate_up), ptr(out), (int)(out.numel() / out.size(-1)), (int)out.size(-1),
      dtype_code(gate_up));
}

// An optional residual add after a product: both empty, or both shaped like its output y.
void check_residual(const at::Tensor& resid_in, const at::Tensor& resid_out, const at::Tensor& y) {
  check(resid_in, y), check(resid_out, y);
  TORCH_CHECK(resid_in.numel() == resid_out.numel() && (!resid_out.numel() || resid_out.numel() == y.numel()),
              "mine: a residual add needs resid_in and resid_out shaped like the product's output");
}

void linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& y, int64_t accum, const at::Tensor& resid_in,
            const at::Tensor& resid_out) {
  check(x, w), check(y, w), check_rows(w.size(1)), check_residual(resid_in, resid_out, y);
  const int64_t n = x.numel() / w.size(1);
  check_numel(x, n, w.size(1)), check_numel(y, n, w.size(0));
  RUN(linear, w, ptr(x), ptr(w), ptr(y), (int)n, (int)w.size(1), (int)w.size(0), (int)accum, ptr(resid_in),
      ptr(resid_out), dtype_code(w));
}

// y = RMSNorm(x) w^T, the normalised rows also written to `normed` unless it is empty. One token with
// `normed` empty runs one fused kernel on a GPU; otherwise rmsnorm, then linear: the same bits.
void norm_linear(const at::Tensor& x, const at::Tensor& norm_w, const at::Tensor& w, const at::Tensor& y,
                 const at::Tensor& normed, double eps, int64_t mode, int64_t accum) {
  check(x, w), check(norm_w, w), check(normed, w), check(y, w), check_rows(w.size(1));
  TORCH_CHECK(norm_w.numel() == w.size(1), "mine: the norm weight has ", norm_w.numel(), " elements, rows have ", w.size(1));
  const int64_t n = x.numel() / w.size(1);
  check_numel(x, n, w.size(1)), check_numel(y, n, w.size(0));
#if defined(MINE_WITH_CUDA) || defined(MINE_EMULATE_CUDA)
  if (n == 1 && !normed.numel() && FUSED(w)) {
    cuda_norm_linear(ptr(x), ptr(norm_w), ptr(w), ptr(y), 1, (int)w.size(1), (int)w.size(0), (float)eps, (int)mode,
                     (int)accum, dtype_code(w), STREAM);
    LAUNCHED();
    return;
  }
#endif
  const at::Tensor h = normed.numel() ? normed : at::empty_like(x), none = x.new_empty({0});
  rmsnorm(x, norm_w, h, eps, mode);
  linear(h, w, y, accum, none, none);
}

// y = (silu(gate) * up) w^T from gate_up [N, 2I], the activations also written to `act` unless it is
// empty, then the residual add if asked. One token with `act` empty is one fused kernel on a GPU.
void silu_linear(const at::Tensor& gate_up, const at::Tensor& w, const at::Tensor& y, const at::Tensor& act,
                 int64_t accum, const at::Tensor& resid_in, const at::Tensor& resid_out) {
  check(gate_up, w), check(act, w), check(y, w), check_rows(w.size(1)), check_residual(resid_in, resid_out, y);
  const int64_t inter = w.size(1), n = gate_up.numel() / (2 * inter);
  check_numel(gate_up, n, 2 * inter), check_numel(y, n, w.size(0));
#if defined(MINE_WITH_CUDA) || defined(MINE_EMULATE_CUDA)
  if (n == 1 && !act.numel() && FUSED(w)) {
    cuda_silu_linear(ptr(gate_up), ptr(w), ptr(y), 1, (int)inter, (int)w.size(0), (int)accum, ptr(resid_in),
                     ptr(resid_out), dtype_code(w), STREAM);
    LAUNCHED();
    return;
  }
#endif
  const at::Tensor a = act.numel() ? act : gate_up.new_empty({n, inter});
  silu_mul(gate_up, a);
  linear(a, w, y, accum, resid_in, resid_out);
}

// q/k norm + RoPE of the step's rows (their keys and values into the cache slots of their positions),
// then attention over the cache. q_norm/q_rope [N, nH, D], k_norm/k_rope [N, nKV, D], caches
// [L, B, nKV, S_max, D], scores/probs [B, nH, T, ld]. One token a sequence runs both in one kernel on a
// GPU; otherwise the two ops run one after the other: the same bits.
void attention(const at::Tensor& qkv, const at::Tensor& qw, const at::Tensor& kw, const at::Tensor& cos,
               const at::Tensor& sin, const at::Tensor& pos, const at::Tensor& q_norm, const at::Tensor& k_norm,
               const at::Tensor& q_rope, const at::Tensor& k_rope, const at::Tensor& k_cache, const at::Tensor& v_cache,
               const at::Tensor& scores, const at::Tensor& probs, const at::Tensor& out, int64_t batch, int64_t layer,
               int64_t fill, double scale, bool round_scores, int64_t accum, double eps, int64_t mode) {
  for (auto* t : {&qkv, &kw, &cos, &sin, &q_norm, &k_norm, &q_rope, &k_rope, &k_cache, &v_cache, &probs, &out}) check(*t, qw);
  check(pos, qw, at::kInt), check(scores, qw, at::kFloat);
  const int64_t D = qw.numel(), n = q_rope.size(0), nH = q_rope.size(1), nKV = k_cache.size(2), ld = scores.size(-1);
  TORCH_CHECK(D <= MAX_HEAD_DIM, "mine: head_dim ", D, " is above the ", MAX_HEAD_DIM, " it supports");
  check_rows(D);  // also: V rows are copied in 16-byte pieces
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "mine: the K and V caches differ in shape");
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.size(1) == D && cos.size(0) >= k_cache.size(3),
              "mine: the RoPE tables do not cover the cache's slots");
  AttnDims a = attn_dims(q_rope, k_cache, batch, layer);
  check_numel(qkv, n, (nH + 2 * nKV) * D), check_numel(q_norm, n, nH * D), check_numel(k_norm, n, nKV * D);
  check_numel(k_rope, n, nKV * D), check_numel(out, n, nH * D), check_numel(scores, n * nH, ld), check_numel(probs, n * nH, ld);
  a.scores_ld = (int)ld;
  a.scores_fill = (int)fill;
  a.scale = (float)scale;
  a.round_scores = round_scores;
  a.accum = (int)accum;
  const QKRope io{ptr(qkv), ptr(qw), ptr(kw), ptr(cos), ptr(sin), ptr(q_norm), ptr(k_norm), ptr(q_rope), ptr(k_rope),
                  ptr(k_cache), ptr(v_cache), (float)eps, (int)mode};
#if defined(MINE_WITH_CUDA) || defined(MINE_EMULATE_CUDA)
  if (a.tokens == 1 && FUSED(qw)) {
    cuda_qk_attention(io, ptr<const int>(pos), ptr<float>(scores), ptr(probs), ptr(out), a, dtype_code(qw), STREAM);
    LAUNCHED();
    return;
  }
#endif
  RUN(qk_norm_rope, qw, io, ptr<const int>(pos), a, dtype_code(qw));
  RUN(attention, qw, ptr(q_rope), ptr(k_cache), ptr(v_cache), ptr<const int>(pos), ptr<float>(scores), ptr(probs),
      ptr(out), a, dtype_code(qw));
}

void route(const at::Tensor& logits, const at::Tensor& ids, const at::Tensor& weights, bool norm) {
  check(ids, logits, at::kLong), check(weights, logits);
  RUN(route, logits, ptr(logits), ptr<int64_t>(ids), ptr(weights), (int)(logits.numel() / logits.size(-1)),
      (int)logits.size(-1), (int)ids.size(-1), norm, dtype_code(logits));
}

void moe_linear(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& w, const at::Tensor& y, bool per_slot_input,
                int64_t accum) {
  check(x, w), check(ids, w, at::kLong), check(y, w), check_rows(w.size(2));
  RUN(moe_linear, w, ptr(x), ptr<int64_t>(ids), ptr(w), ptr(y), (int)(ids.numel() / ids.size(-1)), (int)ids.size(-1),
      (int)w.size(2), (int)w.size(1), per_slot_input, (int)accum, dtype_code(w));
}

void moe_combine(const at::Tensor& y, const at::Tensor& ids, const at::Tensor& weights, const at::Tensor& out,
                 const at::Tensor& resid_in, const at::Tensor& resid_out) {
  check(ids, y, at::kLong), check(weights, y), check(out, y), check_residual(resid_in, resid_out, out);
  RUN(moe_combine, y, ptr(y), ptr<int64_t>(ids), ptr(weights), ptr(out), (int)(ids.numel() / ids.size(-1)),
      (int)ids.size(-1), (int)out.size(-1), ptr(resid_in), ptr(resid_out), dtype_code(y));
}

void rope_table(const at::Tensor& cos, const at::Tensor& sin, double theta) {
  TORCH_CHECK(!cos.is_cuda(), "mine: RoPE tables are built on the host");
  check(sin, cos);
  twin_rope_table(ptr(cos), ptr(sin), (int)cos.size(0), (int)cos.size(1), (float)theta, dtype_code(cos));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#ifdef MINE_WITH_CUDA
  m.attr("with_cuda") = true;
  m.def("overlap_launches", &cuda_overlap_launches);
  m.def("can_overlap_launches", &cuda_can_overlap_launches);
#else
  m.attr("with_cuda") = false;
#endif
  m.def("embed", &embed);
  m.def("rmsnorm", &rmsnorm);  // alone only in tests/test_mine_ops.py: the engine norms inside norm_linear
  m.def("linear", &linear);
  m.def("norm_linear", &norm_linear);
  m.def("silu_linear", &silu_linear);
  m.def("attention", &attention);
  m.def("silu_mul", &silu_mul);
  m.def("route", &route);
  m.def("moe_linear", &moe_linear);
  m.def("moe_combine", &moe_combine);
  m.def("rope_table", &rope_table);
}
