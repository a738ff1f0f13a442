// The CUDA kernels of `mine`: thin loops around qwen3_math.cuh. A warp does what one iteration of
// the twin's loops does, with the same lanes and the same butterfly, so its results are the twin's
// bits (transcendental functions aside: CUDA's expf/powf/cosf may differ from glibc's in the last place).
// No torch here: plain `nvcc -arch=sm_80` compiles this file (check_nvcc.sh), and with
// MINE_EMULATE_CUDA the host compiler does, for cuda_emu.h to run the kernels on the CPU.
#ifdef MINE_EMULATE_CUDA
#include "cuda_emu.h"
#else
#include <cuda_runtime.h>
#define DYNAMIC_SHARED(T, name) extern __shared__ __align__(16) T name[]
namespace {
bool overlap_launches = false;  // cuda_overlap_launches
}
// kernel<<<grid, block, shared_bytes, stream>>>(args...), spelled so that cuda_emu.h can stand in; with
// overlap on, as a programmatic dependent of the kernel before it (see wait_for_inputs).
template <class... P, class... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t shared_bytes, void* stream, A... args) {
  cudaLaunchAttribute overlap{};
  overlap.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  overlap.val.programmaticStreamSerializationAllowed = 1;
  const cudaLaunchConfig_t config{grid, block, shared_bytes, (cudaStream_t)stream, &overlap, overlap_launches ? 1u : 0u};
  cudaLaunchKernelEx(&config, kernel, args...);  // an error is the runtime's last error: the bindings check it
}
void cuda_overlap_launches(bool on) { overlap_launches = on; }
#endif

#include "api.h"
#include "qk_head.cuh"

using namespace qmath;

namespace {

constexpr int WARPS = 8;              // warps per block of the warp-per-row kernels
constexpr int THREADS = WARPS * LANES;
constexpr int TOKEN_BLOCK = 8;        // tokens sharing one read of a weight row in `linear`
constexpr int ATTN_WARPS = 16;        // warps of one attention block, sharing its scores
static_assert(ATTN_WARPS * LANES >= MAX_HEAD_DIM, "an attention thread owns one dim of the context");
constexpr int SCORE_BATCH = 4;        // slots a warp scores at once
constexpr int ATTN_TILE_BYTES = 32 << 10;  // shared memory for one tile of V (>= 16 slots of D <= 512)
#ifdef MINE_EMULATE_CUDA
constexpr int ATTN_TILE_SLOTS = 4;         // tiny tiles, so that the tiny test models' few slots span several
#else
constexpr int ATTN_TILE_SLOTS = 1 << 30;
#endif

// 64-bit: a prefill's lm_head has more than 2^32 threads past ~7,000 tokens.
__device__ __forceinline__ long long warp_id() { return ((long long)blockIdx.x * blockDim.x + threadIdx.x) / LANES; }
__device__ __forceinline__ int lane_id() { return threadIdx.x % LANES; }

// Programmatic dependent launch (sm_90 and later; elsewhere, and in the emulator, nothing happens): a
// kernel launched with overlap may start while the kernel before it still runs. Until it calls
// wait_for_inputs it reads nothing but weights (no kernel writes them) and writes nothing; after the
// call every earlier kernel is done and its writes are visible. It then lets the next kernel start, so
// at most two kernels overlap: one running, the next one's blocks waiting with their weights on the way.
__device__ __forceinline__ void wait_for_inputs() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;");
#endif
}

// Ask L2 for a warp's weight row of k elements (whole, in one bulk request), before wait_for_inputs:
// the row streams in while the kernel before finishes. Rows are 16-byte multiples at 16-byte
// boundaries, as the bulk copy unit needs (bindings.cpp: row lengths are multiples of 8 elements).
template <class T> __device__ __forceinline__ void prefetch_row(const T* row, int k) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (lane_id() == 0)
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(__cvta_generic_to_global(row)),
                 "r"(k * (unsigned)sizeof(T)) : "memory");
#endif
}

// The butterfly of reduce_lanes, as shuffles: every lane ends with lane 0's value of the twin.
template <class T> __device__ __forceinline__ float warp_reduce(float v, int accum) {
  for (int off = LANES / 2; off > 0; off /= 2) v = lane_combine<T>(v, __shfl_xor_sync(0xffffffffu, v, off), accum);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int off = LANES / 2; off > 0; off /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

template <class T> __device__ float warp_dot(const T* x, const T* w, int K, int accum) {
  return warp_reduce<T>(lane_dot(x, w, K, lane_id(), accum), accum);
}

// Softmax statistics of s[0..n): max and 1 / sum(exp(s - max)), in the lane order of lane_exp_sum.
__device__ void warp_softmax_stats(const float* s, int n, float* max_out, float* inv_sum) {
  const float m = warp_max(lane_max(s, n, lane_id()));
  *max_out = m;
  *inv_sum = 1.0f / warp_reduce<float>(lane_exp_sum(s, n, m, lane_id()), ACC_FP32);
}

template <class T> __device__ void warp_rms_row(const T* src, const T* w, T* out, int dim, float eps, int mode) {
  float scale = rms_scale(warp_dot(src, src, dim, ACC_FP32), dim, eps);
  for (int i = lane_id(); i < dim; i += LANES) out[i] = from_f<T>(rms_apply<T>(to_f(src[i]), scale, to_f(w[i]), mode));
}

unsigned blocks_for(long long items, int per_block) { return (unsigned)((items + per_block - 1) / per_block); }

template <class T> __global__ void embed_k(const int64_t* ids, const T* table, T* out, int n, int h) {
  wait_for_inputs();
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < (long long)n * h) out[i] = table[(size_t)ids[i / h] * h + i % h];
}

// One block per row: warp 0 finds the scale, all threads apply it.
template <class T> __global__ void rmsnorm_k(const T* x, const T* w, T* out, int dim, float eps, int mode) {
  __shared__ float scale;
  wait_for_inputs();
  const T* src = x + (size_t)blockIdx.x * dim;
  if (threadIdx.x < LANES) {
    float v = rms_scale(warp_dot(src, src, dim, ACC_FP32), dim, eps);
    if (threadIdx.x == 0) scale = v;
  }
  __syncthreads();
  T* dst = out + (size_t)blockIdx.x * dim;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) dst[i] = from_f<T>(rms_apply<T>(to_f(src[i]), scale, to_f(w[i]), mode));
}

// Lane 0's end of a product: y[at] = v rounded, and resid_out[at] = resid_in[at] + y[at] if asked.
template <class T> __device__ void store_product(T* y, size_t at, float v, const T* resid_in, T* resid_out) {
  y[at] = from_f<T>(v);
  if (resid_out) resid_out[at] = from_f<T>(add<T>(to_f(resid_in[at]), to_f(y[at])));
}

// One warp per (output row j, block of R tokens): each chunk of w is read once per block. Decode uses
// R = 1, which keeps fewer registers per warp and so more warps in flight.
template <class T, int R> __global__ void linear_k(const T* x, const T* w, T* y, int n, int k, int m, int accum,
                                                   const T* resid_in, T* resid_out) {
  const long long task = warp_id();
  const int j = (int)(task % m), r0 = (int)(task / m) * R;
  if (r0 >= n) return;
  prefetch_row(w + (size_t)j * k, k);
  wait_for_inputs();
  float acc[R];
  lane_dot_rows<T, R>(Rows<T>{x + (size_t)r0 * k, (size_t)k}, n - r0, w + (size_t)j * k, k, lane_id(), accum, acc);
  for (int r = 0; r < R && r0 + r < n; ++r) {
    float v = warp_reduce<T>(acc[r], accum);
    if (lane_id() == 0) store_product(y, (size_t)(r0 + r) * m + j, v, resid_in, resid_out);
  }
}

// One token's product of its input row (any loader of qwen3_math.cuh) with weight row j, by one warp,
// stored with its epilogue at y[at].
template <class T, class X> __device__ void row_product(const X& row, const T* w, int k, int accum, T* y, size_t at,
                                                        const T* resid_in, T* resid_out) {
  float acc;
  lane_dot_rows<T, 1>(row, 1, w, k, lane_id(), accum, &acc);
  float v = warp_reduce<T>(acc, accum);
  if (lane_id() == 0) store_product(y, at, v, resid_in, resid_out);
}

// One warp per (token r, output row j), its input RMSNorm(x_r): the warp first finds the row's scale
// with the same canonical sum as rmsnorm_k, so it multiplies the floats that kernel would store.
template <class T> __global__ void norm_linear_k(const T* x, const T* norm_w, const T* w, T* y, int n, int k, int m,
                                                 float eps, int mode, int accum) {
  const long long task = warp_id();
  const int j = (int)(task % m), r = (int)(task / m);
  if (r >= n) return;
  prefetch_row(w + (size_t)j * k, k);
  wait_for_inputs();
  const T* xr = x + (size_t)r * k;
  const NormRow<T> row{xr, norm_w, rms_scale(warp_dot(xr, xr, k, ACC_FP32), k, eps), mode};
  row_product<T>(row, w + (size_t)j * k, k, accum, y, (size_t)r * m + j, nullptr, nullptr);
}

// One warp per (token r, output row j), its input silu(gate_r) * up_r as silu_mul_k would store it.
template <class T> __global__ void silu_linear_k(const T* gate_up, const T* w, T* y, int n, int inter, int m,
                                                 int accum, const T* resid_in, T* resid_out) {
  const long long task = warp_id();
  const int j = (int)(task % m), r = (int)(task / m);
  if (r >= n) return;
  prefetch_row(w + (size_t)j * inter, inter);
  wait_for_inputs();
  const T* gu = gate_up + (size_t)r * 2 * inter;
  row_product(SiluRow<T>{gu, gu + inter}, w + (size_t)j * inter, inter, accum, y, (size_t)r * m + j, resid_in,
              resid_out);
}

// q/k norm + RoPE of one (token r, head hh) by one warp: normalise the head, then rope it (and, for a
// kv head, write the cache slot).
template <class T> __device__ void warp_qk_head(const AttnDims& a, int r, int hh, const int* pos, const QKRope& io) {
  const HeadTask<T> h(a, r, hh, pos, io);
  warp_rms_row(h.src, h.weight, h.normed, a.cache.head_dim, io.eps, io.mode);
  __syncwarp();
  for (int d = lane_id(); d < a.cache.head_dim; d += LANES) h.rope(a, d, io);
}

template <class T> __global__ void qk_norm_rope_k(QKRope io, const int* pos, AttnDims a) {
  wait_for_inputs();
  const int heads = a.heads + a.cache.kv_heads;
  const long long task = warp_id();
  const int r = (int)(task / heads);
  if (r >= a.cache.batch * a.tokens) return;
  warp_qk_head<T>(a, r, (int)(task % heads), pos, io);
}

// One block per (batch, head, query token): its warps share the scores of the slots up to the query's
// position (with_qk: after q/k norm + RoPE of this step's single token), warp 0 does the softmax,
// then each thread owns one dim of the context and adds the slots in ascending order, V and the
// probabilities staged in shared memory a tile of slots at a time (every thread loads; `tile` slots
// of V fill ATTN_TILE_BYTES). The arithmetic is the twin's: only where values wait differs.
template <class T>
__global__ void __launch_bounds__(ATTN_WARPS * LANES)
    attention_k(const T* q, const T* k_cache, const T* v_cache, const int* pos, float* scores, T* probs, T* out,
                AttnDims a, int tile, QKRope io, bool with_qk) {
  DYNAMIC_SHARED(float, attn_smem);  // [tile] probabilities, then [tile][D] of V
  wait_for_inputs();
  const int D = a.cache.head_dim, rep = a.heads / a.cache.kv_heads, task = blockIdx.x, warp = threadIdx.x / LANES;
  const int t = task % a.tokens, h = (task / a.tokens) % a.heads, b = task / (a.tokens * a.heads);
  const int r = b * a.tokens + t, p = pos[r], g = h / rep;
  const size_t row = ((size_t)(b * a.heads + h) * a.tokens + t) * a.scores_ld;
  const T* qr = q + ((size_t)r * a.heads + h) * D;
  float* sc = scores + row;
  T* pr = probs + row;
  if (with_qk) {  // decode: norm + RoPE of this block's query head and its kv head first (the blocks of the
                  // kv head's other query heads write the same bits to the same places)
    if (warp == 0) warp_qk_head<T>(a, r, h, pos, io);
    if (warp == 1) warp_qk_head<T>(a, r, a.heads + g, pos, io);
    __syncthreads();
  }
  // A warp takes slots warp, warp + ATTN_WARPS, ..., SCORE_BATCH at a time so that their loads are in
  // flight together; each slot's score is still one canonical warp dot.
  for (int s0 = warp; s0 <= p; s0 += SCORE_BATCH * ATTN_WARPS) {
    float part[SCORE_BATCH];
    for (int j = 0; j < SCORE_BATCH; ++j) {
      const int s = s0 + j * ATTN_WARPS;
      part[j] = s <= p ? lane_dot(qr, k_cache + kv_offset(a.cache, a.layer, b, g, s, 0), D, lane_id(), a.accum) : 0.f;
    }
    for (int j = 0; j < SCORE_BATCH && s0 + j * ATTN_WARPS <= p; ++j) {  // warp-uniform bound
      const float v = scale_score<T>(warp_reduce<T>(part[j], a.accum), a.scale, a.round_scores);
      if (lane_id() == 0) sc[s0 + j * ATTN_WARPS] = v;
    }
  }
  __syncthreads();
  if (warp == 0) {
    float m, inv;
    warp_softmax_stats(sc, p + 1, &m, &inv);
    for (int s = lane_id(); s <= p; s += LANES) pr[s] = from_f<T>(softmax_elem(sc[s], m, inv));
    for (int s = p + 1 + lane_id(); s < a.scores_fill; s += LANES) { sc[s] = -INFINITY; pr[s] = from_f<T>(0.f); }
  }
  float* pt = attn_smem;
  T* vt = reinterpret_cast<T*>(attn_smem + tile);
  const int d = threadIdx.x;  // D <= the block's threads (bindings.cpp)
  float acc = 0.f;
  for (int s0 = 0; s0 <= p; s0 += tile) {
    const int n = min(tile, p + 1 - s0);
    __syncthreads();  // the probabilities are written, the previous tile consumed
    // a tile of V is n whole cache rows, contiguous: copied in 16-byte pieces
    const uint4* src = reinterpret_cast<const uint4*>(v_cache + kv_offset(a.cache, a.layer, b, g, s0, 0));
    for (int i = threadIdx.x; i < n * D * (int)sizeof(T) / 16; i += blockDim.x) reinterpret_cast<uint4*>(vt)[i] = src[i];
    for (int i = threadIdx.x; i < n; i += blockDim.x) pt[i] = to_f(pr[s0 + i]);
    __syncthreads();
    if (d < D)
      for (int i = 0; i < n; ++i) acc = acc_add<T>(acc, pt[i] * to_f(vt[i * D + d]), a.accum);
  }
  if (d < D) out[((size_t)r * a.heads + h) * D + d] = from_f<T>(acc);
}

template <class T> __global__ void silu_mul_k(const T* gate_up, T* out, int n, int inter) {
  wait_for_inputs();
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= (long long)n * inter) return;
  const T* gu = gate_up + (size_t)(i / inter) * 2 * inter;
  out[i] = from_f<T>(silu_mul<T>(to_f(gu[i % inter]), to_f(gu[inter + i % inter])));
}

// One warp per token; the probabilities live in shared memory, lane 0 picks the top k.
template <class T> __global__ void route_k(const T* logits, int64_t* ids, T* weights, int experts, int k, int norm) {
  DYNAMIC_SHARED(float, probs);
  wait_for_inputs();
  const int r = blockIdx.x;
  for (int e = lane_id(); e < experts; e += LANES) probs[e] = to_f(logits[(size_t)r * experts + e]);
  __syncwarp();
  float m, inv;
  warp_softmax_stats(probs, experts, &m, &inv);
  __syncwarp();
  for (int e = lane_id(); e < experts; e += LANES) probs[e] = softmax_elem(probs[e], m, inv);
  __syncwarp();
  if (lane_id() == 0) route_pick(probs, experts, k, norm, ids + (size_t)r * k, weights + (size_t)r * k);
}

template <class T> __global__ void moe_linear_k(const T* x, const int64_t* ids, const T* w, T* y, int n, int topk,
                                                int in, int out, int per_slot_input, int accum) {
  wait_for_inputs();  // which expert's weights to read is an input
  const long long task = warp_id();
  const int r = (int)(task / out), j = (int)(task % out);
  if (r >= n * topk) return;
  const T* xr = x + (size_t)(per_slot_input ? r : r / topk) * in;
  float v = warp_dot(xr, w + ((size_t)ids[r] * out + j) * in, in, accum);
  if (lane_id() == 0) y[(size_t)r * out + j] = from_f<T>(v);
}

template <class T> __global__ void moe_combine_k(const T* y, const int64_t* ids, const T* weights, T* out, int n,
                                                 int topk, int h, const T* resid_in, T* resid_out) {
  wait_for_inputs();
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= (long long)n * h) return;
  const size_t r = i / h;
  store_product(out, i, moe_mix(y + r * topk * h + i % h, h, ids + r * topk, weights + r * topk, topk), resid_in,
                resid_out);
}

}  // namespace

void cuda_embed(const int64_t* ids, const void* table, void* out, int n, int h, int dt, void* stream) {
  QMATH_DISPATCH(dt, launch(embed_k<T>, blocks_for((long long)n * h, 256), 256, 0, stream, ids, (const T*)table, (T*)out,
                            n, h));
}

void cuda_rmsnorm(const void* x, const void* w, void* out, int n, int dim, float eps, int mode, int dt, void* stream) {
  QMATH_DISPATCH(dt, launch(rmsnorm_k<T>, n, THREADS, 0, stream, (const T*)x, (const T*)w, (T*)out, dim, eps, mode));
}

void cuda_linear(const void* x, const void* w, void* y, int n, int k, int m, int accum, const void* resid_in,
                 void* resid_out, int dt, void* stream) {
  if (n == 1) {
    QMATH_DISPATCH(dt, launch(linear_k<T, 1>, blocks_for(m, WARPS), THREADS, 0, stream, (const T*)x, (const T*)w, (T*)y,
                              n, k, m, accum, (const T*)resid_in, (T*)resid_out));
    return;
  }
  long long tasks = (long long)m * ((n + TOKEN_BLOCK - 1) / TOKEN_BLOCK);
  QMATH_DISPATCH(dt, launch(linear_k<T, TOKEN_BLOCK>, blocks_for(tasks, WARPS), THREADS, 0, stream, (const T*)x,
                            (const T*)w, (T*)y, n, k, m, accum, (const T*)resid_in, (T*)resid_out));
}

void cuda_norm_linear(const void* x, const void* norm_w, const void* w, void* y, int n, int k, int m, float eps,
                      int mode, int accum, int dt, void* stream) {
  QMATH_DISPATCH(dt, launch(norm_linear_k<T>, blocks_for((long long)n * m, WARPS), THREADS, 0, stream, (const T*)x,
                            (const T*)norm_w, (const T*)w, (T*)y, n, k, m, eps, mode, accum));
}

void cuda_silu_linear(const void* gate_up, const void* w, void* y, int n, int inter, int m, int accum,
                      const void* resid_in, void* resid_out, int dt, void* stream) {
  QMATH_DISPATCH(dt, launch(silu_linear_k<T>, blocks_for((long long)n * m, WARPS), THREADS, 0, stream,
                            (const T*)gate_up, (const T*)w, (T*)y, n, inter, m, accum, (const T*)resid_in,
                            (T*)resid_out));
}

void cuda_qk_norm_rope(const QKRope& io, const int* pos, AttnDims a, int dt, void* stream) {
  long long tasks = (long long)a.cache.batch * a.tokens * (a.heads + a.cache.kv_heads);
  QMATH_DISPATCH(dt, launch(qk_norm_rope_k<T>, blocks_for(tasks, WARPS), THREADS, 0, stream, io, pos, a));
}

namespace {
void launch_attention(const void* q, const void* k_cache, const void* v_cache, const int* pos, float* scores,
                      void* probs, void* out, AttnDims a, const QKRope& io, bool with_qk, int dt, void* stream) {
  const unsigned tasks = (unsigned)(a.cache.batch * a.heads * a.tokens);
  QMATH_DISPATCH(dt, {
    const int tile = min(ATTN_TILE_SLOTS, ATTN_TILE_BYTES / (a.cache.head_dim * (int)sizeof(T))) / 4 * 4;  // V 16-B aligned
    launch(attention_k<T>, tasks, ATTN_WARPS * LANES, tile * (sizeof(float) + a.cache.head_dim * sizeof(T)), stream,
           (const T*)q, (const T*)k_cache, (const T*)v_cache, pos, scores, (T*)probs, (T*)out, a, tile, io, with_qk);
  });
}
}  // namespace

void cuda_attention(const void* q, const void* k_cache, const void* v_cache, const int* pos, float* scores,
                    void* probs, void* out, AttnDims a, int dt, void* stream) {
  launch_attention(q, k_cache, v_cache, pos, scores, probs, out, a, QKRope{}, false, dt, stream);
}

void cuda_qk_attention(const QKRope& io, const int* pos, float* scores, void* probs, void* out, AttnDims a, int dt,
                       void* stream) {
  launch_attention(io.q_rope, io.k_cache, io.v_cache, pos, scores, probs, out, a, io, true, dt, stream);
}

void cuda_silu_mul(const void* gate_up, void* out, int n, int inter, int dt, void* stream) {
  QMATH_DISPATCH(dt, launch(silu_mul_k<T>, blocks_for((long long)n * inter, 256), 256, 0, stream, (const T*)gate_up,
                            (T*)out, n, inter));
}

void cuda_route(const void* logits, int64_t* ids, void* weights, int n, int experts, int k, int norm, int dt,
                void* stream) {
  QMATH_DISPATCH(dt, launch(route_k<T>, n, LANES, experts * sizeof(float), stream, (const T*)logits, ids, (T*)weights,
                            experts, k, norm));
}

void cuda_moe_linear(const void* x, const int64_t* ids, const void* w, void* y, int n, int topk, int in, int out,
                     int per_slot_input, int accum, int dt, void* stream) {
  long long tasks = (long long)n * topk * out;
  QMATH_DISPATCH(dt, launch(moe_linear_k<T>, blocks_for(tasks, WARPS), THREADS, 0, stream, (const T*)x, ids,
                            (const T*)w, (T*)y, n, topk, in, out, per_slot_input, accum));
}

void cuda_moe_combine(const void* y, const int64_t* ids, const void* weights, void* out, int n, int topk, int h,
                      const void* resid_in, void* resid_out, int dt, void* stream) {
  QMATH_DISPATCH(dt, launch(moe_combine_k<T>, blocks_for((long long)n * h, 256), 256, 0, stream, (const T*)y, ids,
                            (const T*)weights, (T*)out, n, topk, h, (const T*)resid_in, (T*)resid_out));
}

#ifndef MINE_EMULATE_CUDA
bool cuda_can_overlap_launches() {
  cudaFuncAttributes f{};
  const bool known = cudaFuncGetAttributes(&f, embed_k<float>) == cudaSuccess;
  (void)cudaGetLastError();  // a failed query is an answer (no), not an error for the next launch check
  return known && f.ptxVersion >= 90;
}
#endif
