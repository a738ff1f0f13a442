// The C-style API of the `mine` kernels: raw pointers, sizes and dtype codes, no torch. Each op has
// a CPU twin (twin.cpp, `twin_*`) and a CUDA launcher (kernels.cu, `cuda_*`, last argument the
// stream); bindings.cpp picks one by the device of the tensors. Shapes: N rows (tokens, B*T),
// H hidden, D head_dim, nH/nKV heads, E experts, k experts per token. Row n is batch n / T.
#pragma once

#include <stdint.h>

#include "kv_cache.cuh"

constexpr int MAX_HEAD_DIM = 512;  // the CUDA attention kernel gives each dim of a head one thread

struct AttnDims {
  int tokens, heads;      // per sequence; batch, kv heads and head_dim are the cache's
  qmath::KVShape cache;
  int layer;
  int scores_ld;    // row length of the scores/probs workspaces [B, nH, T, scores_ld]
  int scores_fill;  // columns to write (-inf / 0 past a row's position); 0: only the live ones
  float scale;
  int round_scores, accum;
};

// What q/k norm + RoPE reads and writes in one step: q/k/v rows [N, (nH + 2 nKV) D], the norm weights
// [D] and RoPE tables [max_seq, D]; out: q_norm and q_rope [N, nH, D], k_norm and k_rope [N, nKV, D],
// and each token's roped key and raw value in the caches, in the slot of its position.
struct QKRope {
  const void *qkv, *q_weight, *k_weight, *cos, *sin;
  void *q_norm, *k_norm, *q_rope, *k_rope, *k_cache, *v_cache;
  float eps;
  int mode;
};

#define MINE_OPS(P, S)                                                                                          \
  void P##embed(const int64_t* ids, const void* table, void* out, int n, int h, int dt S);                      \
  void P##rmsnorm(const void* x, const void* w, void* out, int n, int dim, float eps, int mode, int dt S);      \
  void P##linear(const void* x, const void* w, void* y, int n, int k, int m, int accum, const void* resid_in,    \
                 void* resid_out, int dt S);                                                                    \
  void P##qk_norm_rope(const QKRope& io, const int* pos, AttnDims a, int dt S);                                \
  void P##attention(const void* q, const void* k_cache, const void* v_cache, const int* pos, float* scores,     \
                    void* probs, void* out, AttnDims a, int dt S);                                              \
  void P##silu_mul(const void* gate_up, void* out, int n, int inter, int dt S);                                 \
  void P##route(const void* logits, int64_t* ids, void* weights, int n, int experts, int k, int norm,           \
                int dt S);                                                                                      \
  void P##moe_linear(const void* x, const int64_t* ids, const void* w, void* y, int n, int topk, int in,        \
                     int out, int per_slot_input, int accum, int dt S);                                         \
  void P##moe_combine(const void* y, const int64_t* ids, const void* weights, void* out, int n, int topk,       \
                      int h, const void* resid_in, void* resid_out, int dt S);

#define MINE_NO_STREAM
#define MINE_STREAM , void* stream

MINE_OPS(twin_, MINE_NO_STREAM)
MINE_OPS(cuda_, MINE_STREAM)

// `linear` and `moe_combine` also write resid_out = resid_in + their output when resid_out is given:
// the residual add, in the same kernel.

// One-token products whose input rows are computed as they are read (NormRow, SiluRow in
// qwen3_math.cuh), saving a kernel each in decode; CUDA only: the bindings use them for one-row steps
// and otherwise run the separate ops, which give the same bits.
void cuda_norm_linear(const void* x, const void* norm_w, const void* w, void* y, int n, int k, int m, float eps,
                      int mode, int accum, int dt, void* stream);
// Decode (one token a sequence): q/k norm + RoPE inside the attention kernel, which then attends with
// io.q_rope as q; one kernel instead of two, the same bits.
void cuda_qk_attention(const QKRope& io, const int* pos, float* scores, void* probs, void* out, AttnDims a, int dt,
                       void* stream);
void cuda_silu_linear(const void* gate_up, const void* w, void* y, int n, int inter, int m, int accum,
                      const void* resid_in, void* resid_out, int dt, void* stream);

// Whether later launches may overlap the kernel before them (programmatic dependent launch, sm_90 and
// later): each kernel's blocks start, and ask for their weights, while the one before finishes. For the
// whole process; a CUDA graph keeps what was on when it was captured. nvcc build only.
void cuda_overlap_launches(bool on);
// Whether the kernels that run on the current device may overlap: only code compiled for sm_90 or
// later waits for its inputs (griddepcontrol); code JIT-compiled from older PTX would race.
bool cuda_can_overlap_launches();

// RoPE cos/sin tables [max_seq, D] in the compute dtype (halves repeated), computed on the host.
void twin_rope_table(void* cos, void* sin, int max_seq, int head_dim, float theta, int dt);
