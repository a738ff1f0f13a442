// A CPU stand-in for the little of CUDA that kernels.cu uses, so that the kernels themselves (their
// indexing, shared memory, barriers and warp shuffles) run and are tested, bit for bit against the
// twin, where there is no GPU. Every thread of a block is a fiber (ucontext); blocks run one after
// another on one OS thread; __syncthreads, __syncwarp and each shuffle are barriers among fibers.
// Between barriers the fibers of a block run one at a time, in a shuffled order (fixed seed), so a read
// of another thread's write that lacks a barrier sees stale data in some block. Slow by design (tiny
// models only). kernels.cu includes it when MINE_EMULATE_CUDA is defined.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static  // one block runs at a time, so a static is that block's shared variable

struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

inline int min(int a, int b) { return a < b ? a : b; }

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace emu {

constexpr int WARP = 32;
constexpr size_t STACK_BYTES = 64 << 10;

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  unsigned block_barriers = 0, warp_barriers = 0;  // barriers this thread has arrived at, by kind
  int waiting = 0;                                 // 0 running, 1 at __syncthreads, 2 at a warp barrier
  bool done = false;
  uint64_t shuffle = 0;                            // the value this lane offers to a shuffle
};

struct Block {
  dim3 idx, dim;
  std::vector<Fiber> fibers;
  std::vector<char> dynamic_shared;
  const std::function<void()>* body = nullptr;
  ucontext_t scheduler;
  int current = 0;
  uint64_t state = 0x9E3779B97F4A7C15ull;  // xorshift: the same shuffled orders on every run
  uint64_t random() { return state ^= state << 13, state ^= state >> 7, state ^= state << 17; }
};

inline Block& block() {
  static Block b;
  return b;
}

inline Fiber& self() { return block().fibers[block().current]; }

inline void die(const char* what) {
  fprintf(stderr, "cuda_emu: %s\n", what);
  abort();
}

inline void yield() { swapcontext(&self().ctx, &block().scheduler); }

inline void entry() {
  (*block().body)();
  self().done = true;
}  // returning resumes uc_link: the scheduler

// Whether fiber f may pass the barrier it waits at: every live thread of its group has arrived there.
inline bool released(const Block& b, int f) {
  const Fiber& me = b.fibers[f];
  const int n = (int)b.fibers.size();
  const int begin = me.waiting == 1 ? 0 : f / WARP * WARP, end = me.waiting == 1 ? n : std::min(n, begin + WARP);
  for (int g = begin; g < end; ++g) {
    const Fiber& o = b.fibers[g];
    if (o.done) continue;
    if (me.waiting == 1 ? o.block_barriers < me.block_barriers : o.warp_barriers < me.warp_barriers) return false;
  }
  return true;
}

inline void run_block(Block& b) {
  const int n = (int)b.fibers.size();
  for (int f = 0; f < n; ++f) {
    Fiber& fb = b.fibers[f];
    fb.block_barriers = fb.warp_barriers = 0, fb.waiting = 0, fb.done = false;
    fb.stack.resize(STACK_BYTES);  // kept from block to block
    getcontext(&fb.ctx);
    fb.ctx.uc_stack.ss_sp = fb.stack.data();
    fb.ctx.uc_stack.ss_size = fb.stack.size();
    fb.ctx.uc_link = &b.scheduler;
    makecontext(&fb.ctx, (void (*)())entry, 0);
  }
  std::vector<int> order(n);
  for (int f = 0; f < n; ++f) order[f] = f;
  for (;;) {
    bool any = false, all_done = true;
    for (int i = n - 1; i > 0; --i) std::swap(order[i], order[b.random() % (i + 1)]);
    for (int f : order) {
      Fiber& fb = b.fibers[f];
      if (fb.done) continue;
      all_done = false;
      if (fb.waiting && !released(b, f)) continue;
      fb.waiting = 0;
      b.current = f;
      swapcontext(&b.scheduler, &fb.ctx);
      any = true;
    }
    if (all_done) return;
    if (!any) die("deadlock: threads wait at a barrier that others of their block or warp never reach");
  }
}

// Run `body` as every thread of a 1-D grid of 1-D blocks.
inline void launch_grid(dim3 grid, dim3 dim, size_t shared_bytes, const std::function<void()>& body) {
  if (grid.y * grid.z != 1 || dim.y * dim.z != 1) die("only 1-D grids and blocks are emulated");
  if (dim.x > 1024) die("more than 1024 threads in a block");
  if (shared_bytes > 48 << 10) die("more than 48 KB of dynamic shared memory without opting in");
  Block& b = block();
  b.dim = dim, b.body = &body;
  b.fibers.resize(dim.x);
  b.dynamic_shared.resize(shared_bytes);
  for (unsigned x = 0; x < grid.x; ++x) {
    // Each block's shared memory starts as NaN in every float type, so a read before a write shows.
    std::fill(b.dynamic_shared.begin(), b.dynamic_shared.end(), (char)0xff);
    b.idx = dim3(x);
    run_block(b);
  }
}

inline void syncthreads() {
  self().block_barriers++, self().waiting = 1;
  yield();
}

inline void syncwarp() {
  self().warp_barriers++, self().waiting = 2;
  yield();
}

template <class V> V shfl_xor(V v, int lane_mask) {
  static_assert(sizeof(V) <= sizeof(uint64_t), "a shuffled value fits 8 bytes");
  Block& b = block();
  const int me = b.current, other = me ^ lane_mask;
  if (other / WARP != me / WARP || other >= (int)b.fibers.size()) die("a shuffle reads outside the warp");
  memcpy(&self().shuffle, &v, sizeof(V));
  syncwarp();
  if (b.fibers[other].done) die("a shuffle reads a lane that has exited");
  V out;
  memcpy(&out, &b.fibers[other].shuffle, sizeof(V));
  syncwarp();
  return out;
}

}  // namespace emu

#define threadIdx (dim3((unsigned)emu::block().current))
#define blockIdx (emu::block().idx)
#define blockDim (emu::block().dim)
#define __syncthreads() emu::syncthreads()
#define __syncwarp() emu::syncwarp()
#define __shfl_xor_sync(mask, v, lane_mask) emu::shfl_xor(v, lane_mask)
#define DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(emu::block().dynamic_shared.data())

// kernel<<<grid, block, shared_bytes, stream>>>(args...), run on the CPU.
template <class... P, class... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t shared_bytes, void*, A... args) {
  emu::launch_grid(grid, block, shared_bytes, [&] { kernel(args...); });
}
