// cuda_shim.h: run the CUDA kernels in kernels/*.cu on the CPU.
//
// Host C++20 only (g++ >= 12 or clang >= 16); never seen by nvcc. build.rs
// (feature `cpu-kernels`) compiles every kernels/*.cu with
//     c++ -x c++ -std=c++20 -pthread -fno-strict-aliasing
//         -include kernels/shim/cuda_shim.h -Ikernels -Ikernels/shim/include ...
// into a static library. kernels/shim/include/ holds stand-ins for
// <cuda_fp16.h>, <cuda_bf16.h>, <mma.h>, ... that just include this header.
//
// Execution model (DESIGN.md §4):
// * One OS thread per CUDA thread of a block. A launch creates blockDim
//   threads once (1 MiB stacks, TL_SHIM_STACK_KB overrides) and runs the
//   grid's blocks one after the other with them; a block-end barrier separates
//   blocks, and the dynamic shared memory is re-poisoned with 0xFF bytes (NaN
//   as f32/f16/bf16) before each block so reads of unwritten smem show up.
// * `__shared__` is `static`: one instance per variable, which is right
//   because only one block runs at a time. Launches are therefore serialized
//   by a process-wide mutex (Rust tests run in parallel).
// * __syncthreads() is a barrier over the block's *live* threads: a thread
//   that returned from the kernel no longer counts (as on sm_70+ hardware).
// * Warp operations (shuffles, votes, __syncwarp, WMMA load/store) are a
//   rendezvous of exactly the lanes named in the mask (intersected with the
//   lanes that exist in a partial last warp). Every named lane must take part:
//   a lane that has exited, or mismatched masks / operations, abort with a
//   message; so does any wait longer than TL_SHIM_TIMEOUT_S seconds (default
//   120), i.e. a deadlock. Disjoint masks (divergent half-warps) complete
//   independently. Waiting threads sleep on a futex (Linux) and carry their
//   ordering in acquire/release atomics, so a block-wide wake-up does not
//   convoy on a mutex and ThreadSanitizer sees every happens-before edge.
// * Blocks may not use `extern __shared__`: use TL_DYNAMIC_SMEM (common.cuh).
// * Atomics are std::atomic_ref (sequentially consistent); __threadfence is a
//   seq_cst fence. The shim cannot show races the x86 memory model hides.
// * Built with -fno-strict-aliasing: CUDA code type-puns freely (uint4/float4
//   vector loads through reinterpret_cast), which is UB for host C++ otherwise.
// * __activemask() cannot see convergence: it returns the lanes this lane last
//   met in a warp-synchronous operation (all existing lanes before the first).
// * WMMA (m16n16k16, m32n8k16, m8n32k16; half/bf16 inputs, float/half
//   accumulators): fragments hold the whole tile in every lane (num_elements =
//   rows * cols, x[] in logical row-major order, so elementwise loops work);
//   load_matrix_sync is a warp rendezvous then a read; mma_sync is an f32 FMA
//   loop in k order; store_matrix_sync is written once by the lowest lane
//   between two warp rendezvous, so ThreadSanitizer sees no race.
//
// Kernel entry points come from TL_KERNEL in kernels/common.cuh, which calls
// tl_shim::launch(); its return codes are the TL_SHIM_* constants below.
#pragma once

#if defined(__CUDACC__)
#error "cuda_shim.h is the CPU shim: it must not be compiled by nvcc"
#endif

#ifndef TL_SHIM
#define TL_SHIM 1
#endif

#include <math.h>
#include <pthread.h>
#include <time.h>
#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <atomic>
#include <bit>
#include <cfloat>
#include <chrono>
#include <climits>
#include <cmath>
#include <condition_variable>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>
#include <new>
#include <type_traits>
#include <vector>

// ---------------------------------------------------------------------------
// Launch status codes (the Rust side maps them to Error::Backend).
#define TL_SHIM_OK 0
#define TL_SHIM_ERR_INVALID_GRID 1    // a grid dimension is 0 or above the CUDA limits
#define TL_SHIM_ERR_INVALID_BLOCK 2   // 0 threads, > 1024, x/y > 1024, z > 64, or > __launch_bounds__
#define TL_SHIM_ERR_SHARED_MEMORY 3   // dynamic shared memory above 227 KiB
#define TL_SHIM_ERR_THREAD_CREATE 4   // the OS refused to create a thread
#define TL_SHIM_ERR_NULL_PARAMS 5     // params pointer is null
#define TL_SHIM_MAX_DYNAMIC_SMEM (227u * 1024u)

// ---------------------------------------------------------------------------
// CUDA keywords.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __grid_constant__
#define __align__(n) __attribute__((aligned(n)))
// Blocks run one at a time, so one static instance per __shared__ variable is
// the block's shared memory.
#define __shared__ static
#define __constant__ static
// __restrict__ is a GNU keyword already.

// ---------------------------------------------------------------------------
// Vector types.
struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};
struct alignas(8) float2 { float x, y; };
struct float3 { float x, y, z; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) double2 { double x, y; };
struct alignas(8) int2 { int x, y; };
struct int3 { int x, y, z; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(8) uint2 { unsigned int x, y; };
struct alignas(16) uint4 { unsigned int x, y, z, w; };
struct alignas(4) ushort2 { unsigned short x, y; };
struct alignas(8) ushort4 { unsigned short x, y, z, w; };
struct alignas(4) char4 { signed char x, y, z, w; };
struct alignas(4) uchar4 { unsigned char x, y, z, w; };
struct alignas(16) longlong2 { long long x, y; };
struct alignas(16) ulonglong2 { unsigned long long x, y; };
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float3 make_float3(float x, float y, float z) { return {x, y, z}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline int2 make_int2(int x, int y) { return {x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint3 make_uint3(unsigned x, unsigned y, unsigned z) { return {x, y, z}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline double2 make_double2(double x, double y) { return {x, y}; }

// ---------------------------------------------------------------------------
// Built-in variables: per OS thread, so per CUDA thread.
inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;
constexpr int warpSize = 32;

namespace tl_shim {

// ---------------------------------------------------------------------------
// Launch state.
struct Launch;
struct Warp;

struct ThreadCtx {
  Launch* launch = nullptr;
  Warp* warp = nullptr;
  unsigned linear = 0;  // threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)
  unsigned lane = 0;
  unsigned last_mask = 0;  // effective mask of the last warp collective this lane completed
};
inline thread_local ThreadCtx t_ctx;

inline const char* current_kernel();

[[noreturn]] inline void fatal(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
[[noreturn]] inline void fatal(const char* fmt, ...) {
  char msg[1024];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  if (t_ctx.launch != nullptr) {
    std::fprintf(stderr,
                 "tl_shim: kernel %s, block (%u,%u,%u), thread (%u,%u,%u): %s\n",
                 current_kernel(), blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x, threadIdx.y,
                 threadIdx.z, msg);
  } else {
    std::fprintf(stderr, "tl_shim: %s\n", msg);
  }
  std::fflush(stderr);
  std::abort();
}

inline unsigned env_unsigned(const char* name, unsigned dflt) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return dflt;
  char* end = nullptr;
  unsigned long x = std::strtoul(v, &end, 10);
  if (end == v || x == 0 || x > 1000000ul) return dflt;
  return static_cast<unsigned>(x);
}

inline std::chrono::steady_clock::time_point deadline() {
  static const unsigned secs = env_unsigned("TL_SHIM_TIMEOUT_S", 120);
  return std::chrono::steady_clock::now() + std::chrono::seconds(secs);
}

// Sleeping on a 32-bit word: futex on Linux (woken threads need no lock, so a
// block-wide wake-up does not convoy on a mutex), a short sleep elsewhere.
// Memory ordering comes from the atomics themselves (acquire/release), which
// is also what ThreadSanitizer sees.
inline void futex_wait(std::atomic<unsigned>& word, unsigned expected, std::chrono::nanoseconds max) {
#if defined(__linux__)
  static_assert(sizeof(std::atomic<unsigned>) == sizeof(unsigned));
  timespec ts;
  ts.tv_sec = static_cast<time_t>(max.count() / 1000000000);
  ts.tv_nsec = static_cast<long>(max.count() % 1000000000);
  syscall(SYS_futex, reinterpret_cast<unsigned*>(&word), FUTEX_WAIT_PRIVATE, expected, &ts, nullptr, 0);
#else
  (void)max;
  if (word.load(std::memory_order_relaxed) == expected) std::this_thread::sleep_for(std::chrono::microseconds(20));
#endif
}

inline void futex_wake_all(std::atomic<unsigned>& word) {
#if defined(__linux__)
  syscall(SYS_futex, reinterpret_cast<unsigned*>(&word), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr, nullptr, 0);
#else
  (void)word;
#endif
}

// Waits until `done()` (which must acquire-load something that changes
// together with `word`); false if the deadline passed first.
template <class Done>
inline bool wait_on(std::atomic<unsigned>& word, Done&& done) {
  const auto dl = deadline();
  for (;;) {
    const unsigned w = word.load(std::memory_order_acquire);
    if (done()) return true;
    const auto now = std::chrono::steady_clock::now();
    if (now >= dl) return done();
    futex_wait(word, w, std::min<std::chrono::nanoseconds>(dl - now, std::chrono::seconds(1)));
  }
}

// A barrier over a changing set of live threads: `exit()` removes a thread
// for good (it returned from the kernel), and completes the barrier if every
// remaining live thread is already waiting.
struct Barrier {
  std::mutex m;  // guards the arrival bookkeeping below
  unsigned live = 0;
  unsigned arrived = 0;
  unsigned count = 0;       // predicate count of the barrier being filled
  unsigned last_count = 0;  // predicate count of the barrier that last completed
  std::atomic<unsigned> gen{0};

  void reset(unsigned n) {
    live = n;
    arrived = 0;
    count = 0;
  }

  // Called with `m` held; the caller wakes the sleepers after unlocking.
  void complete_locked() {
    arrived = 0;
    last_count = count;
    count = 0;
    gen.fetch_add(1, std::memory_order_release);
  }

  // Returns how many live threads passed a non-zero `pred`.
  template <class OnComplete>
  unsigned sync(int pred, const char* what, OnComplete&& on_complete) {
    std::unique_lock<std::mutex> lk(m);
    if (pred) ++count;
    const unsigned my_gen = gen.load(std::memory_order_relaxed);
    if (++arrived == live) {
      on_complete();
      complete_locked();
      const unsigned r = last_count;
      lk.unlock();
      futex_wake_all(gen);
      return r;
    }
    lk.unlock();
    if (!wait_on(gen, [&] { return gen.load(std::memory_order_acquire) != my_gen; })) {
      lk.lock();
      fatal("deadlock: %s waited past TL_SHIM_TIMEOUT_S; %u of %u live threads arrived", what,
            arrived, live);
    }
    // Safe without the lock: the next completion needs this thread's arrival.
    return last_count;
  }

  unsigned sync(int pred, const char* what) {
    return sync(pred, what, [] {});
  }

  void exit() {
    std::unique_lock<std::mutex> lk(m);
    --live;
    if (arrived > 0 && arrived == live) {
      complete_locked();
      lk.unlock();
      futex_wake_all(gen);
    }
  }
};

enum WarpOp : int {
  kOpShfl = 1,
  kOpVote = 2,
  kOpSyncwarp = 3,
  kOpWmmaLoad = 4,
  kOpWmmaStoreBegin = 5,
  kOpWmmaStoreEnd = 6,
  kOpMatch = 7,
  kOpLdmatrix = 8,
};

inline const char* op_name(int op) {
  switch (op) {
    case kOpShfl: return "__shfl*_sync";
    case kOpVote: return "__ballot/__any/__all_sync";
    case kOpSyncwarp: return "__syncwarp";
    case kOpWmmaLoad: return "wmma::load_matrix_sync";
    case kOpWmmaStoreBegin:
    case kOpWmmaStoreEnd: return "wmma::store_matrix_sync";
    case kOpMatch: return "__match_any_sync";
    case kOpLdmatrix: return "ldmatrix (tl::ldsm_x4)";
    default: return "?";
  }
}

// Per-warp rendezvous. A lane deposits a 64-bit value and waits until every
// lane named in its mask has deposited; the last to arrive copies all values
// into each participant's private result array. Disjoint masks (divergent
// half-warps) complete independently.
struct Warp {
  std::mutex mu;                      // guards everything but the atomics
  std::atomic<unsigned> wake{0};       // bumped by every completion (futex word)
  unsigned existing = 0;  // lanes that exist (a partial last warp has fewer)
  unsigned exited = 0;    // lanes that returned from the kernel (this block)
  unsigned arrived = 0;   // lanes waiting in a collective
  unsigned mask[32] = {};
  int op[32] = {};
  unsigned long long val[32] = {};
  unsigned long long* out[32] = {};
  std::atomic<unsigned> seq[32] = {};  // per lane: completed collectives

  void reset() {
    exited = 0;
    arrived = 0;
  }

  // Two waiting lanes that name each other in different masks (or in
  // different operations) can never both complete: that is a deadlock (UB on
  // the GPU). A waiting lane whose mask does not name `lane` is fine: it
  // finishes its own group first and comes here later.
  void check_locked(unsigned lane, unsigned m, int o) {
    for (unsigned others = arrived & ~(1u << lane); others != 0; others &= others - 1) {
      const unsigned j = static_cast<unsigned>(std::countr_zero(others));
      const bool mutual = ((m >> j) & 1u) && ((mask[j] >> lane) & 1u);
      if (mutual && (mask[j] != m || op[j] != o)) {
        fatal("warp %u: lane %u is in %s with mask 0x%08x while lane %u waits in %s with mask "
              "0x%08x (mismatched warp-synchronous operations)",
              t_ctx.linear / 32, lane, op_name(o), m, j, op_name(op[j]), mask[j]);
      }
    }
    if (m & exited) {
      fatal("warp %u: lane %u calls %s with mask 0x%08x, but lanes 0x%08x have already returned "
            "from the kernel",
            t_ctx.linear / 32, lane, op_name(o), m, m & exited);
    }
  }

  // Every lane of `m` waits in this very operation with this very mask.
  bool complete_locked(unsigned m, int o) const {
    if ((arrived & m) != m) return false;
    for (unsigned rest = m; rest != 0; rest &= rest - 1) {
      const unsigned j = static_cast<unsigned>(std::countr_zero(rest));
      if (mask[j] != m || op[j] != o) return false;
    }
    return true;
  }

  // Returns the effective mask; `result[j]` holds lane j's value for j in it.
  unsigned exchange(unsigned m, int o, unsigned long long v, unsigned long long* result) {
    const unsigned lane = t_ctx.lane;
    const unsigned bit = 1u << lane;
    m &= existing;
    if ((m & bit) == 0) {
      fatal("lane %u calls %s with mask 0x%08x, which does not name it", lane, op_name(o), m);
    }
    std::unique_lock<std::mutex> lk(mu);
    check_locked(lane, m, o);
    mask[lane] = m;
    op[lane] = o;
    val[lane] = v;
    out[lane] = result;
    arrived |= bit;
    if (complete_locked(m, o)) {
      for (unsigned rest = m; rest != 0; rest &= rest - 1) {
        const unsigned j = static_cast<unsigned>(std::countr_zero(rest));
        std::memcpy(out[j], val, sizeof val);
        seq[j].fetch_add(1, std::memory_order_release);
      }
      arrived &= ~m;
      wake.fetch_add(1, std::memory_order_release);
      lk.unlock();
      futex_wake_all(wake);
      t_ctx.last_mask = m;
      return m;
    }
    const unsigned my_seq = seq[lane].load(std::memory_order_relaxed);
    lk.unlock();
    if (!wait_on(wake, [&] { return seq[lane].load(std::memory_order_acquire) != my_seq; })) {
      lk.lock();
      fatal("deadlock: lane %u waited past TL_SHIM_TIMEOUT_S in %s with mask 0x%08x; lanes "
            "arrived 0x%08x, exited 0x%08x",
            lane, op_name(o), m, arrived, exited);
    }
    t_ctx.last_mask = m;
    return m;
  }

  void exit_lane(unsigned lane) {
    std::lock_guard<std::mutex> lk(mu);
    exited |= 1u << lane;
    for (unsigned others = arrived; others != 0; others &= others - 1) {
      const unsigned j = static_cast<unsigned>(std::countr_zero(others));
      if ((mask[j] >> lane) & 1u) {
        fatal("warp %u: lane %u returned from the kernel while lane %u waits for it in %s with "
              "mask 0x%08x",
              t_ctx.linear / 32, lane, j, op_name(op[j]), mask[j]);
      }
    }
  }
};

struct Launch {
  const char* kernel = "?";
  dim3 grid, block;
  unsigned nthreads = 0;
  unsigned long long nblocks = 0;
  void (*run)(const void*) = nullptr;
  const void* params = nullptr;
  unsigned char* dyn_smem = nullptr;
  unsigned dyn_smem_bytes = 0;
  Barrier block_barrier;  // __syncthreads
  Barrier block_end;      // between blocks (no thread ever leaves it)
  std::vector<Warp> warps;
  // Thread start gate: workers wait until every thread exists (or the
  // launch was cancelled because creating one failed).
  std::mutex gate_m;
  std::condition_variable gate_cv;
  int gate = 0;  // 0 wait, 1 go, -1 cancelled

  explicit Launch(unsigned nwarps) : warps(nwarps) {}

  void start_block() {
    block_barrier.reset(nthreads);
    for (Warp& w : warps) w.reset();
    if (dyn_smem_bytes) std::memset(dyn_smem, 0xFF, dyn_smem_bytes);
  }
};

inline const char* current_kernel() {
  return t_ctx.launch ? t_ctx.launch->kernel : "?";
}

// Serializes launches: `__shared__` variables are process-wide statics.
inline std::mutex g_launch_mutex;

struct WorkerArg {
  Launch* launch;
  unsigned linear;
};

inline void* worker_main(void* arg) {
  const WorkerArg wa = *static_cast<WorkerArg*>(arg);
  Launch& L = *wa.launch;
  {
    std::unique_lock<std::mutex> lk(L.gate_m);
    L.gate_cv.wait(lk, [&] { return L.gate != 0; });
    if (L.gate < 0) return nullptr;
  }
  const unsigned t = wa.linear;
  t_ctx.launch = &L;
  t_ctx.linear = t;
  t_ctx.lane = t % 32;
  t_ctx.warp = &L.warps[t / 32];
  blockDim = L.block;
  gridDim = L.grid;
  threadIdx = uint3{t % L.block.x, (t / L.block.x) % L.block.y, t / (L.block.x * L.block.y)};
  const unsigned long long gxy = static_cast<unsigned long long>(L.grid.x) * L.grid.y;
  for (unsigned long long b = 0; b < L.nblocks; ++b) {
    blockIdx = uint3{static_cast<unsigned>(b % L.grid.x), static_cast<unsigned>((b / L.grid.x) % L.grid.y),
                     static_cast<unsigned>(b / gxy)};
    t_ctx.last_mask = t_ctx.warp->existing;
    L.run(L.params);
    // This thread has returned from the kernel for this block.
    t_ctx.warp->exit_lane(t_ctx.lane);
    L.block_barrier.exit();
    L.block_end.sync(0, "block end", [&] {
      if (b + 1 < L.nblocks) L.start_block();
    });
  }
  t_ctx = ThreadCtx{};
  return nullptr;
}

// Runs a whole grid; returns a TL_SHIM_* code. `run` copies the params from
// its argument and calls the kernel body.
inline int launch(const char* kernel, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                  unsigned bz, unsigned smem_bytes, const void* params, std::size_t params_size,
                  std::size_t params_align, unsigned max_threads, void (*run)(const void*)) {
  if (gx == 0 || gy == 0 || gz == 0 || gx > 0x7fffffffu || gy > 65535u || gz > 65535u)
    return TL_SHIM_ERR_INVALID_GRID;
  if (bx == 0 || by == 0 || bz == 0 || bx > 1024u || by > 1024u || bz > 64u)
    return TL_SHIM_ERR_INVALID_BLOCK;
  const unsigned long long nthreads = static_cast<unsigned long long>(bx) * by * bz;
  if (nthreads > 1024u || (max_threads != 0 && nthreads > max_threads)) return TL_SHIM_ERR_INVALID_BLOCK;
  if (smem_bytes > TL_SHIM_MAX_DYNAMIC_SMEM) return TL_SHIM_ERR_SHARED_MEMORY;
  if (params == nullptr) return TL_SHIM_ERR_NULL_PARAMS;
  if (t_ctx.launch != nullptr) fatal("kernel launch from inside a kernel is not supported");

  std::lock_guard<std::mutex> serialize(g_launch_mutex);

  const unsigned n = static_cast<unsigned>(nthreads);
  Launch L((n + 31) / 32);
  L.kernel = kernel;
  L.grid = dim3(gx, gy, gz);
  L.block = dim3(bx, by, bz);
  L.nthreads = n;
  L.nblocks = static_cast<unsigned long long>(gx) * gy * gz;
  L.run = run;
  // One private copy of the parameters for the whole launch; each thread's
  // kernel body then copies it again into its own `p`, as on the GPU.
  void* pcopy = ::operator new(params_size, std::align_val_t(std::max<std::size_t>(params_align, 16)));
  std::memcpy(pcopy, params, params_size);
  L.params = pcopy;
  // Exactly smem_bytes, so AddressSanitizer catches overruns of the dynamic
  // shared memory.
  L.dyn_smem_bytes = smem_bytes;
  L.dyn_smem = static_cast<unsigned char*>(
      ::operator new(smem_bytes ? smem_bytes : 1, std::align_val_t(128)));
  for (unsigned w = 0; w < L.warps.size(); ++w) {
    const unsigned lanes = std::min(32u, n - 32 * w);
    L.warps[w].existing = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1);
  }
  L.block_end.reset(n);
  L.start_block();

  static const std::size_t stack_bytes = static_cast<std::size_t>(env_unsigned("TL_SHIM_STACK_KB", 1024)) * 1024;
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setstacksize(&attr, std::max<std::size_t>(stack_bytes, PTHREAD_STACK_MIN));
  std::vector<pthread_t> threads(n);
  std::vector<WorkerArg> args(n);
  unsigned created = 0;
  int rc = TL_SHIM_OK;
  for (; created < n; ++created) {
    args[created] = WorkerArg{&L, created};
    if (pthread_create(&threads[created], &attr, worker_main, &args[created]) != 0) {
      rc = TL_SHIM_ERR_THREAD_CREATE;
      break;
    }
  }
  pthread_attr_destroy(&attr);
  {
    std::lock_guard<std::mutex> lk(L.gate_m);
    L.gate = rc == TL_SHIM_OK ? 1 : -1;
  }
  L.gate_cv.notify_all();
  for (unsigned i = 0; i < created; ++i) pthread_join(threads[i], nullptr);
  ::operator delete(L.dyn_smem, std::align_val_t(128));
  ::operator delete(pcopy, std::align_val_t(std::max<std::size_t>(params_align, 16)));
  return rc;
}

inline unsigned char* dynamic_smem() {
  return t_ctx.launch->dyn_smem;
}

inline Warp& warp() {
  if (t_ctx.warp == nullptr) fatal("warp operation outside a kernel launch");
  return *t_ctx.warp;
}

template <class T>
inline unsigned long long to_bits64(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "warp shuffles move at most 8 bytes");
  unsigned long long u = 0;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}

template <class T>
inline T from_bits64(unsigned long long u) {
  T v;
  std::memcpy(&v, &u, sizeof(T));
  return v;
}

// Shuffle: `src(lane)` gives the source lane or -1 for "keep own value".
template <class T, class Src>
inline T shuffle(unsigned mask, T v, Src src) {
  unsigned long long all[32];
  const unsigned m = warp().exchange(mask, kOpShfl, to_bits64(v), all);
  const int s = src(static_cast<int>(t_ctx.lane));
  if (s < 0 || s > 31 || ((m >> s) & 1u) == 0) return v;
  return from_bits64<T>(all[s]);
}

inline unsigned vote(unsigned mask, int pred) {
  unsigned long long all[32];
  const unsigned m = warp().exchange(mask, kOpVote, pred != 0 ? 1ull : 0ull, all);
  unsigned ballot = 0;
  for (unsigned rest = m; rest != 0; rest &= rest - 1) {
    const unsigned j = static_cast<unsigned>(std::countr_zero(rest));
    if (all[j]) ballot |= 1u << j;
  }
  return ballot;
}

inline int clamp_width(int width) {
  if (width < 1 || width > 32 || (width & (width - 1)) != 0)
    fatal("shuffle width %d is not a power of two in 1..32", width);
  return width;
}

// ---------------------------------------------------------------------------
// f16 / bf16 conversions, bit-exact with CUDA (round to nearest even; NaN
// becomes the canonical 0x7FFF like cvt.rn.f16.f32 / cvt.rn.bf16.f32).
inline unsigned short f32_to_f16_bits(float f) {
  const unsigned x = std::bit_cast<unsigned>(f);
  const unsigned sign = (x >> 16) & 0x8000u;
  unsigned u = x & 0x7fffffffu;
  if (u > 0x7f800000u) return 0x7fffu;                  // NaN
  if (u >= 0x477ff000u) return static_cast<unsigned short>(sign | 0x7c00u);  // >= 65520: inf
  if (u >= 0x38800000u) {                               // normal half
    const unsigned mant_round = u + 0xfffu + ((u >> 13) & 1u);
    return static_cast<unsigned short>(sign | ((mant_round - 0x38000000u) >> 13));
  }
  if (u < 0x33000001u) return static_cast<unsigned short>(sign);  // <= 2^-25: zero (ties to even)
  // Subnormal half: value = mant * 2^(e-150); half ulp is 2^-24.
  const unsigned e = u >> 23;
  const unsigned mant = (u & 0x7fffffu) | 0x800000u;
  const unsigned shift = 126u - e;  // 14..24 (shift of the 24-bit significand to 2^-24 units)
  unsigned r = mant >> shift;
  const unsigned rem = mant & ((1u << shift) - 1u);
  const unsigned half = 1u << (shift - 1u);
  if (rem > half || (rem == half && (r & 1u))) ++r;
  return static_cast<unsigned short>(sign | r);
}

inline float f16_bits_to_f32(unsigned short h) {
  const unsigned sign = (static_cast<unsigned>(h) & 0x8000u) << 16;
  const unsigned e = (h >> 10) & 0x1fu;
  unsigned m = h & 0x3ffu;
  unsigned u;
  if (e == 0x1f) {
    u = m ? 0x7fffffffu : (sign | 0x7f800000u);  // NaN canonical (as CUDA), inf keeps sign
  } else if (e == 0) {
    if (m == 0) {
      u = sign;
    } else {
      unsigned ex = 113;  // 127 - 15 + 1
      while ((m & 0x400u) == 0) {
        m <<= 1;
        --ex;
      }
      u = sign | (ex << 23) | ((m & 0x3ffu) << 13);
    }
  } else {
    u = sign | ((e + 112u) << 23) | (m << 13);
  }
  return std::bit_cast<float>(u);
}

inline unsigned short f32_to_bf16_bits(float f) {
  const unsigned x = std::bit_cast<unsigned>(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;  // NaN
  const unsigned r = x + 0x7fffu + ((x >> 16) & 1u);
  return static_cast<unsigned short>(r >> 16);
}

inline float bf16_bits_to_f32(unsigned short b) {
  return std::bit_cast<float>(static_cast<unsigned>(b) << 16);
}

}  // namespace tl_shim

// ---------------------------------------------------------------------------
// __half and __nv_bfloat16: trivially copyable 16-bit storage with the
// conversions and operators CUDA gives them (arithmetic rounds each result).
struct __half_raw { unsigned short x; };
struct __nv_bfloat16_raw { unsigned short x; };

struct alignas(2) __half {
  unsigned short __x;
  __half() = default;
  constexpr __half(__half_raw r) : __x(r.x) {}
  __half(float f) : __x(tl_shim::f32_to_f16_bits(f)) {}
  __half(double d) : __x(tl_shim::f32_to_f16_bits(static_cast<float>(d))) {}
  __half(int i) : __x(tl_shim::f32_to_f16_bits(static_cast<float>(i))) {}
  __half(unsigned i) : __x(tl_shim::f32_to_f16_bits(static_cast<float>(i))) {}
  operator float() const { return tl_shim::f16_bits_to_f32(__x); }
  operator __half_raw() const { return __half_raw{__x}; }
  __half& operator+=(__half o) { return *this = __half(float(*this) + float(o)); }
  __half& operator-=(__half o) { return *this = __half(float(*this) - float(o)); }
  __half& operator*=(__half o) { return *this = __half(float(*this) * float(o)); }
  __half& operator/=(__half o) { return *this = __half(float(*this) / float(o)); }
};
inline __half operator+(__half a, __half b) { return __half(float(a) + float(b)); }
inline __half operator-(__half a, __half b) { return __half(float(a) - float(b)); }
inline __half operator*(__half a, __half b) { return __half(float(a) * float(b)); }
inline __half operator/(__half a, __half b) { return __half(float(a) / float(b)); }
inline __half operator-(__half a) { __half r = a; r.__x ^= 0x8000u; return r; }
inline bool operator==(__half a, __half b) { return float(a) == float(b); }
inline bool operator!=(__half a, __half b) { return float(a) != float(b); }
inline bool operator<(__half a, __half b) { return float(a) < float(b); }
inline bool operator>(__half a, __half b) { return float(a) > float(b); }
inline bool operator<=(__half a, __half b) { return float(a) <= float(b); }
inline bool operator>=(__half a, __half b) { return float(a) >= float(b); }

struct alignas(2) __nv_bfloat16 {
  unsigned short __x;
  __nv_bfloat16() = default;
  constexpr __nv_bfloat16(__nv_bfloat16_raw r) : __x(r.x) {}
  __nv_bfloat16(float f) : __x(tl_shim::f32_to_bf16_bits(f)) {}
  __nv_bfloat16(double d) : __x(tl_shim::f32_to_bf16_bits(static_cast<float>(d))) {}
  __nv_bfloat16(int i) : __x(tl_shim::f32_to_bf16_bits(static_cast<float>(i))) {}
  __nv_bfloat16(unsigned i) : __x(tl_shim::f32_to_bf16_bits(static_cast<float>(i))) {}
  operator float() const { return tl_shim::bf16_bits_to_f32(__x); }
  operator __nv_bfloat16_raw() const { return __nv_bfloat16_raw{__x}; }
  __nv_bfloat16& operator+=(__nv_bfloat16 o) { return *this = __nv_bfloat16(float(*this) + float(o)); }
  __nv_bfloat16& operator-=(__nv_bfloat16 o) { return *this = __nv_bfloat16(float(*this) - float(o)); }
  __nv_bfloat16& operator*=(__nv_bfloat16 o) { return *this = __nv_bfloat16(float(*this) * float(o)); }
  __nv_bfloat16& operator/=(__nv_bfloat16 o) { return *this = __nv_bfloat16(float(*this) / float(o)); }
};
inline __nv_bfloat16 operator+(__nv_bfloat16 a, __nv_bfloat16 b) { return __nv_bfloat16(float(a) + float(b)); }
inline __nv_bfloat16 operator-(__nv_bfloat16 a, __nv_bfloat16 b) { return __nv_bfloat16(float(a) - float(b)); }
inline __nv_bfloat16 operator*(__nv_bfloat16 a, __nv_bfloat16 b) { return __nv_bfloat16(float(a) * float(b)); }
inline __nv_bfloat16 operator/(__nv_bfloat16 a, __nv_bfloat16 b) { return __nv_bfloat16(float(a) / float(b)); }
inline __nv_bfloat16 operator-(__nv_bfloat16 a) { __nv_bfloat16 r = a; r.__x ^= 0x8000u; return r; }
inline bool operator==(__nv_bfloat16 a, __nv_bfloat16 b) { return float(a) == float(b); }
inline bool operator!=(__nv_bfloat16 a, __nv_bfloat16 b) { return float(a) != float(b); }
inline bool operator<(__nv_bfloat16 a, __nv_bfloat16 b) { return float(a) < float(b); }
inline bool operator>(__nv_bfloat16 a, __nv_bfloat16 b) { return float(a) > float(b); }
inline bool operator<=(__nv_bfloat16 a, __nv_bfloat16 b) { return float(a) <= float(b); }
inline bool operator>=(__nv_bfloat16 a, __nv_bfloat16 b) { return float(a) >= float(b); }

struct alignas(4) __half2 {
  __half x, y;
  __half2() = default;
  __half2(__half a, __half b) : x(a), y(b) {}
};
struct alignas(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
  __nv_bfloat162() = default;
  __nv_bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) : x(a), y(b) {}
};
typedef __half half;
typedef __half2 half2;
typedef __nv_bfloat16 nv_bfloat16;
typedef __nv_bfloat162 nv_bfloat162;

static_assert(sizeof(__half) == 2 && std::is_trivially_copyable_v<__half>);
static_assert(sizeof(__nv_bfloat16) == 2 && std::is_trivially_copyable_v<__nv_bfloat16>);
static_assert(sizeof(__half2) == 4 && sizeof(__nv_bfloat162) == 4);

inline __half __float2half(float f) { return __half(__half_raw{tl_shim::f32_to_f16_bits(f)}); }
inline __half __float2half_rn(float f) { return __float2half(f); }
inline float __half2float(__half h) { return tl_shim::f16_bits_to_f32(h.__x); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(__nv_bfloat16_raw{tl_shim::f32_to_bf16_bits(f)}); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __float2bfloat16(f); }
inline float __bfloat162float(__nv_bfloat16 b) { return tl_shim::bf16_bits_to_f32(b.__x); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(unsigned short u) { return __half(__half_raw{u}); }
inline short __half_as_short(__half h) { return static_cast<short>(h.__x); }
inline __half __short_as_half(short s) { return __half(__half_raw{static_cast<unsigned short>(s)}); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return __nv_bfloat16(__nv_bfloat16_raw{u}); }
inline short __bfloat16_as_short(__nv_bfloat16 b) { return static_cast<short>(b.__x); }
inline __nv_bfloat16 __short_as_bfloat16(short s) { return __nv_bfloat16(__nv_bfloat16_raw{static_cast<unsigned short>(s)}); }

inline __half2 __floats2half2_rn(float a, float b) { return __half2(__float2half_rn(a), __float2half_rn(b)); }
inline __half2 __float2half2_rn(float a) { return __floats2half2_rn(a, a); }
inline __half2 __float22half2_rn(float2 f) { return __floats2half2_rn(f.x, f.y); }
inline float2 __half22float2(__half2 h) { return make_float2(__half2float(h.x), __half2float(h.y)); }
inline __half2 __halves2half2(__half a, __half b) { return __half2(a, b); }
inline __half2 __half2half2(__half a) { return __half2(a, a); }
inline __half __low2half(__half2 h) { return h.x; }
inline __half __high2half(__half2 h) { return h.y; }
inline float __low2float(__half2 h) { return __half2float(h.x); }
inline float __high2float(__half2 h) { return __half2float(h.y); }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return __nv_bfloat162(__float2bfloat16_rn(a), __float2bfloat16_rn(b)); }
inline __nv_bfloat162 __float2bfloat162_rn(float a) { return __floats2bfloat162_rn(a, a); }
inline __nv_bfloat162 __float22bfloat162_rn(float2 f) { return __floats2bfloat162_rn(f.x, f.y); }
inline float2 __bfloat1622float2(__nv_bfloat162 h) { return make_float2(__bfloat162float(h.x), __bfloat162float(h.y)); }
inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) { return __nv_bfloat162(a, b); }
inline __nv_bfloat162 __bfloat162bfloat162(__nv_bfloat16 a) { return __nv_bfloat162(a, a); }
inline __nv_bfloat16 __low2bfloat16(__nv_bfloat162 h) { return h.x; }
inline __nv_bfloat16 __high2bfloat16(__nv_bfloat162 h) { return h.y; }
inline float __low2float(__nv_bfloat162 h) { return __bfloat162float(h.x); }
inline float __high2float(__nv_bfloat162 h) { return __bfloat162float(h.y); }

inline __half __hadd(__half a, __half b) { return a + b; }
inline __half __hsub(__half a, __half b) { return a - b; }
inline __half __hmul(__half a, __half b) { return a * b; }
inline __half __hdiv(__half a, __half b) { return a / b; }
inline __half __hfma(__half a, __half b, __half c) { return __half(std::fma(float(a), float(b), float(c))); }
inline __half __hneg(__half a) { return -a; }
inline __half __habs(__half a) { __half r = a; r.__x &= 0x7fffu; return r; }
inline bool __hisnan(__half a) { return std::isnan(float(a)); }
inline int __hisinf(__half a) { const float f = float(a); return std::isinf(f) ? (f > 0 ? 1 : -1) : 0; }
inline __half __hmax(__half a, __half b) { return __half(std::fmax(float(a), float(b))); }
inline __half __hmin(__half a, __half b) { return __half(std::fmin(float(a), float(b))); }
inline __nv_bfloat16 __hadd(__nv_bfloat16 a, __nv_bfloat16 b) { return a + b; }
inline __nv_bfloat16 __hsub(__nv_bfloat16 a, __nv_bfloat16 b) { return a - b; }
inline __nv_bfloat16 __hmul(__nv_bfloat16 a, __nv_bfloat16 b) { return a * b; }
inline __nv_bfloat16 __hdiv(__nv_bfloat16 a, __nv_bfloat16 b) { return a / b; }
inline __nv_bfloat16 __hfma(__nv_bfloat16 a, __nv_bfloat16 b, __nv_bfloat16 c) { return __nv_bfloat16(std::fma(float(a), float(b), float(c))); }
inline __nv_bfloat16 __hneg(__nv_bfloat16 a) { return -a; }
inline __nv_bfloat16 __habs(__nv_bfloat16 a) { __nv_bfloat16 r = a; r.__x &= 0x7fffu; return r; }
inline bool __hisnan(__nv_bfloat16 a) { return std::isnan(float(a)); }
inline int __hisinf(__nv_bfloat16 a) { const float f = float(a); return std::isinf(f) ? (f > 0 ? 1 : -1) : 0; }
inline __nv_bfloat16 __hmax(__nv_bfloat16 a, __nv_bfloat16 b) { return __nv_bfloat16(std::fmax(float(a), float(b))); }
inline __nv_bfloat16 __hmin(__nv_bfloat16 a, __nv_bfloat16 b) { return __nv_bfloat16(std::fmin(float(a), float(b))); }

// ---------------------------------------------------------------------------
// Synchronization.
inline void __syncthreads() {
  tl_shim::t_ctx.launch->block_barrier.sync(0, "__syncthreads");
}
inline int __syncthreads_count(int pred) {
  return static_cast<int>(tl_shim::t_ctx.launch->block_barrier.sync(pred, "__syncthreads_count"));
}
inline int __syncthreads_and(int pred) { return __syncthreads_count(!pred) == 0 ? 1 : 0; }
inline int __syncthreads_or(int pred) { return __syncthreads_count(pred) != 0 ? 1 : 0; }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  unsigned long long all[32];
  tl_shim::warp().exchange(mask, tl_shim::kOpSyncwarp, 0, all);
}
namespace tl_shim {
#if defined(__SANITIZE_THREAD__)
// ThreadSanitizer does not model standalone fences; a seq_cst RMW on one
// shared variable orders every fence after every earlier one, which TSan
// understands (stronger than a real fence, so it hides no race the kernel's
// atomics would not).
inline std::atomic<unsigned> g_fence{0};
inline void fence() { g_fence.fetch_add(0, std::memory_order_seq_cst); }
#else
inline void fence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
#endif
}  // namespace tl_shim
inline void __threadfence() { tl_shim::fence(); }
inline void __threadfence_block() { tl_shim::fence(); }
inline void __threadfence_system() { tl_shim::fence(); }
inline void __nanosleep(unsigned) {}
[[noreturn]] inline void __trap() { tl_shim::fatal("__trap()"); }
inline long long clock64() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// ---------------------------------------------------------------------------
// Warp shuffles and votes.
// The shim cannot see convergence: __activemask() is the set of lanes this
// lane last met in a warp-synchronous operation (all lanes of the warp before
// the first one). Do not build shuffle masks from it inside divergent code.
inline unsigned __activemask() { return tl_shim::t_ctx.last_mask; }

template <class T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize) {
  const int w = tl_shim::clamp_width(width);
  return tl_shim::shuffle(mask, var, [&](int lane) { return (lane & ~(w - 1)) + (src_lane & (w - 1)); });
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  const int w = tl_shim::clamp_width(width);
  return tl_shim::shuffle(mask, var, [&](int lane) {
    const int s = (lane & (w - 1)) - static_cast<int>(delta);
    return s < 0 ? -1 : (lane & ~(w - 1)) + s;
  });
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  const int w = tl_shim::clamp_width(width);
  return tl_shim::shuffle(mask, var, [&](int lane) {
    const int s = (lane & (w - 1)) + static_cast<int>(delta);
    return s >= w ? -1 : (lane & ~(w - 1)) + s;
  });
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize) {
  const int w = tl_shim::clamp_width(width);
  return tl_shim::shuffle(mask, var, [&](int lane) {
    const int s = lane ^ lane_mask;
    return (s & ~(w - 1)) != (lane & ~(w - 1)) ? -1 : s;
  });
}
inline unsigned __ballot_sync(unsigned mask, int pred) { return tl_shim::vote(mask, pred); }
inline int __any_sync(unsigned mask, int pred) { return tl_shim::vote(mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) {
  // Lanes that do not exist (partial last warp) are not in the effective mask.
  const unsigned m = mask & tl_shim::warp().existing;
  return tl_shim::vote(mask, pred) == m;
}
template <class T>
inline unsigned __match_any_sync(unsigned mask, T value) {
  unsigned long long all[32];
  const unsigned long long mine = tl_shim::to_bits64(value);
  const unsigned m = tl_shim::warp().exchange(mask, tl_shim::kOpMatch, mine, all);
  unsigned r = 0;
  for (unsigned rest = m; rest != 0; rest &= rest - 1) {
    const unsigned j = static_cast<unsigned>(std::countr_zero(rest));
    if (all[j] == mine) r |= 1u << j;
  }
  return r;
}

// ---------------------------------------------------------------------------
// Atomics (sequentially consistent, which also keeps ThreadSanitizer exact).
namespace tl_shim {
template <class T>
inline std::atomic_ref<T> aref(T* p) {
  return std::atomic_ref<T>(*p);
}
template <class T, class F>
inline T atomic_update(T* p, F f) {
  auto a = aref(p);
  T old = a.load();
  while (!a.compare_exchange_weak(old, f(old))) {
  }
  return old;
}
}  // namespace tl_shim

inline int atomicAdd(int* p, int v) { return tl_shim::aref(p).fetch_add(v); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return tl_shim::aref(p).fetch_add(v); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) { return tl_shim::aref(p).fetch_add(v); }
inline float atomicAdd(float* p, float v) { return tl_shim::aref(p).fetch_add(v); }
inline double atomicAdd(double* p, double v) { return tl_shim::aref(p).fetch_add(v); }
inline __half atomicAdd(__half* p, __half v) {
  const unsigned short old = tl_shim::atomic_update(&p->__x, [&](unsigned short o) {
    return __half_as_ushort(__ushort_as_half(o) + v);
  });
  return __ushort_as_half(old);
}
inline __nv_bfloat16 atomicAdd(__nv_bfloat16* p, __nv_bfloat16 v) {
  const unsigned short old = tl_shim::atomic_update(&p->__x, [&](unsigned short o) {
    return __bfloat16_as_ushort(__ushort_as_bfloat16(o) + v);
  });
  return __ushort_as_bfloat16(old);
}
inline int atomicSub(int* p, int v) { return tl_shim::aref(p).fetch_sub(v); }
inline unsigned atomicSub(unsigned* p, unsigned v) { return tl_shim::aref(p).fetch_sub(v); }
inline int atomicExch(int* p, int v) { return tl_shim::aref(p).exchange(v); }
inline unsigned atomicExch(unsigned* p, unsigned v) { return tl_shim::aref(p).exchange(v); }
inline unsigned long long atomicExch(unsigned long long* p, unsigned long long v) { return tl_shim::aref(p).exchange(v); }
inline float atomicExch(float* p, float v) { return tl_shim::aref(p).exchange(v); }
template <class T>
inline T tl_atomic_cas(T* p, T compare, T val) {
  tl_shim::aref(p).compare_exchange_strong(compare, val);
  return compare;  // the old value, whether or not it was replaced
}
inline int atomicCAS(int* p, int c, int v) { return tl_atomic_cas(p, c, v); }
inline unsigned atomicCAS(unsigned* p, unsigned c, unsigned v) { return tl_atomic_cas(p, c, v); }
inline unsigned long long atomicCAS(unsigned long long* p, unsigned long long c, unsigned long long v) { return tl_atomic_cas(p, c, v); }
inline unsigned short atomicCAS(unsigned short* p, unsigned short c, unsigned short v) { return tl_atomic_cas(p, c, v); }
#define TL_SHIM_MINMAX(T)                                                                       \
  inline T atomicMax(T* p, T v) { return tl_shim::atomic_update(p, [&](T o) { return o < v ? v : o; }); } \
  inline T atomicMin(T* p, T v) { return tl_shim::atomic_update(p, [&](T o) { return v < o ? v : o; }); }
TL_SHIM_MINMAX(int)
TL_SHIM_MINMAX(unsigned)
TL_SHIM_MINMAX(long long)
TL_SHIM_MINMAX(unsigned long long)
#undef TL_SHIM_MINMAX
inline int atomicOr(int* p, int v) { return tl_shim::aref(p).fetch_or(v); }
inline unsigned atomicOr(unsigned* p, unsigned v) { return tl_shim::aref(p).fetch_or(v); }
inline unsigned long long atomicOr(unsigned long long* p, unsigned long long v) { return tl_shim::aref(p).fetch_or(v); }
inline int atomicAnd(int* p, int v) { return tl_shim::aref(p).fetch_and(v); }
inline unsigned atomicAnd(unsigned* p, unsigned v) { return tl_shim::aref(p).fetch_and(v); }
inline unsigned long long atomicAnd(unsigned long long* p, unsigned long long v) { return tl_shim::aref(p).fetch_and(v); }
inline int atomicXor(int* p, int v) { return tl_shim::aref(p).fetch_xor(v); }
inline unsigned atomicXor(unsigned* p, unsigned v) { return tl_shim::aref(p).fetch_xor(v); }
inline unsigned long long atomicXor(unsigned long long* p, unsigned long long v) { return tl_shim::aref(p).fetch_xor(v); }

// ---------------------------------------------------------------------------
// Cached loads/stores: plain memory accesses here.
template <class T> inline T __ldg(const T* p) { return *p; }
template <class T> inline T __ldcg(const T* p) { return *p; }
template <class T> inline T __ldca(const T* p) { return *p; }
template <class T> inline T __ldcs(const T* p) { return *p; }
template <class T> inline T __ldlu(const T* p) { return *p; }
template <class T> inline T __ldcv(const T* p) { return *p; }
template <class T> inline void __stcg(T* p, T v) { *p = v; }
template <class T> inline void __stcs(T* p, T v) { *p = v; }
template <class T> inline void __stwb(T* p, T v) { *p = v; }
template <class T> inline void __stwt(T* p, T v) { *p = v; }

// ---------------------------------------------------------------------------
// Math and bit intrinsics (glibc provides expf, logf, tanhf, fmaxf, fmaf, ...).
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float rcbrtf(float x) { return 1.0f / std::cbrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __exp10f(float x) { return std::pow(10.0f, x); }
inline float __logf(float x) { return std::log(x); }
inline float __log2f(float x) { return std::log2(x); }
inline float __log10f(float x) { return std::log10(x); }
inline float __powf(float x, float y) { return std::pow(x, y); }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline float __tanf(float x) { return std::tan(x); }
inline float __tanhf(float x) { return std::tanh(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline float __frsqrt_rn(float x) { return 1.0f / std::sqrt(x); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : (x == x ? x : 0.0f)); }
inline int __float_as_int(float x) { return std::bit_cast<int>(x); }
inline unsigned __float_as_uint(float x) { return std::bit_cast<unsigned>(x); }
inline float __int_as_float(int x) { return std::bit_cast<float>(x); }
inline float __uint_as_float(unsigned x) { return std::bit_cast<float>(x); }
inline long long __double_as_longlong(double x) { return std::bit_cast<long long>(x); }
inline double __longlong_as_double(long long x) { return std::bit_cast<double>(x); }
inline int __float2int_rn(float x) { return static_cast<int>(std::nearbyint(x)); }
inline int __float2int_rz(float x) { return static_cast<int>(x); }
inline int __float2int_rd(float x) { return static_cast<int>(std::floor(x)); }
inline int __float2int_ru(float x) { return static_cast<int>(std::ceil(x)); }
inline unsigned __float2uint_rn(float x) { return static_cast<unsigned>(std::nearbyint(x)); }
inline float __int2float_rn(int x) { return static_cast<float>(x); }
inline float __uint2float_rn(unsigned x) { return static_cast<float>(x); }
inline int __popc(unsigned x) { return std::popcount(x); }
inline int __popcll(unsigned long long x) { return std::popcount(x); }
inline int __clz(int x) { return std::countl_zero(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return std::countl_zero(static_cast<unsigned long long>(x)); }
inline int __ffs(int x) { return x == 0 ? 0 : std::countr_zero(static_cast<unsigned>(x)) + 1; }
inline int __ffsll(long long x) { return x == 0 ? 0 : std::countr_zero(static_cast<unsigned long long>(x)) + 1; }
inline unsigned __brev(unsigned x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
  x = ((x >> 8) & 0x00ff00ffu) | ((x & 0x00ff00ffu) << 8);
  return (x >> 16) | (x << 16);
}
inline unsigned __umulhi(unsigned a, unsigned b) { return static_cast<unsigned>((static_cast<unsigned long long>(a) * b) >> 32); }
inline int __mulhi(int a, int b) { return static_cast<int>((static_cast<long long>(a) * b) >> 32); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return static_cast<unsigned long long>((static_cast<unsigned __int128>(a) * b) >> 64);
}

// CUDA's min/max: overloads for every arithmetic pair, with the usual
// arithmetic conversions; floating point follows fminf/fmaxf (NaN-ignoring).
template <class A, class B>
  requires(std::is_arithmetic_v<A> && std::is_arithmetic_v<B>)
inline std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point_v<C>) return std::fmin(static_cast<C>(a), static_cast<C>(b));
  else return static_cast<C>(b) < static_cast<C>(a) ? static_cast<C>(b) : static_cast<C>(a);
}
template <class A, class B>
  requires(std::is_arithmetic_v<A> && std::is_arithmetic_v<B>)
inline std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point_v<C>) return std::fmax(static_cast<C>(a), static_cast<C>(b));
  else return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(b) : static_cast<C>(a);
}

// ---------------------------------------------------------------------------
// WMMA: fragments hold the whole tile in every lane.
namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K> struct tl_shape;
template <int M, int N, int K> struct tl_shape<matrix_a, M, N, K> { static constexpr int rows = M, cols = K; };
template <int M, int N, int K> struct tl_shape<matrix_b, M, N, K> { static constexpr int rows = K, cols = N; };
template <int M, int N, int K> struct tl_shape<accumulator, M, N, K> { static constexpr int rows = M, cols = N; };

template <class Use, int M, int N, int K, class T, class Layout = void>
class fragment {
 public:
  static_assert((M == 16 && N == 16 && K == 16) || (M == 32 && N == 8 && K == 16) || (M == 8 && N == 32 && K == 16),
                "the shim supports the half/bf16 WMMA shapes m16n16k16, m32n8k16, m8n32k16");
  using element_type = T;
  using storage_element_type = T;
  static constexpr int rows = tl_shape<Use, M, N, K>::rows;
  static constexpr int cols = tl_shape<Use, M, N, K>::cols;
  static constexpr int num_elements = rows * cols;
  // Logical element (r, c) is x[r * cols + c].
  T x[num_elements];
};

template <class T> inline float tl_f(T v) { return static_cast<float>(v); }

template <class Use, int M, int N, int K, class T, class L, class V>
inline void fill_fragment(fragment<Use, M, N, K, T, L>& f, const V& v) {
  const T t = static_cast<T>(v);
  for (int i = 0; i < f.num_elements; ++i) f.x[i] = t;
}

namespace detail {
template <class Frag, class T>
inline void load(Frag& f, const T* p, unsigned ldm, bool col_major) {
  unsigned long long all[32];
  tl_shim::warp().exchange(0xffffffffu, tl_shim::kOpWmmaLoad, 0, all);
  for (int r = 0; r < Frag::rows; ++r)
    for (int c = 0; c < Frag::cols; ++c)
      f.x[r * Frag::cols + c] = col_major ? p[static_cast<std::size_t>(c) * ldm + r]
                                          : p[static_cast<std::size_t>(r) * ldm + c];
}
}  // namespace detail

template <int M, int N, int K, class T>
inline void load_matrix_sync(fragment<matrix_a, M, N, K, T, row_major>& f, const T* p, unsigned ldm) {
  detail::load(f, p, ldm, false);
}
template <int M, int N, int K, class T>
inline void load_matrix_sync(fragment<matrix_a, M, N, K, T, col_major>& f, const T* p, unsigned ldm) {
  detail::load(f, p, ldm, true);
}
template <int M, int N, int K, class T>
inline void load_matrix_sync(fragment<matrix_b, M, N, K, T, row_major>& f, const T* p, unsigned ldm) {
  detail::load(f, p, ldm, false);
}
template <int M, int N, int K, class T>
inline void load_matrix_sync(fragment<matrix_b, M, N, K, T, col_major>& f, const T* p, unsigned ldm) {
  detail::load(f, p, ldm, true);
}
template <int M, int N, int K, class T>
inline void load_matrix_sync(fragment<accumulator, M, N, K, T>& f, const T* p, unsigned ldm, layout_t layout) {
  detail::load(f, p, ldm, layout == mem_col_major);
}

template <int M, int N, int K, class T>
inline void store_matrix_sync(T* p, const fragment<accumulator, M, N, K, T>& f, unsigned ldm, layout_t layout) {
  using Frag = fragment<accumulator, M, N, K, T>;
  unsigned long long all[32];
  tl_shim::Warp& w = tl_shim::warp();
  const unsigned m = w.exchange(0xffffffffu, tl_shim::kOpWmmaStoreBegin, 0, all);
  // Every lane holds the same tile; the lowest lane writes it once.
  if (tl_shim::t_ctx.lane == static_cast<unsigned>(std::countr_zero(m))) {
    for (int r = 0; r < Frag::rows; ++r)
      for (int c = 0; c < Frag::cols; ++c) {
        const std::size_t off = layout == mem_col_major ? static_cast<std::size_t>(c) * ldm + r
                                                        : static_cast<std::size_t>(r) * ldm + c;
        p[off] = f.x[r * Frag::cols + c];
      }
  }
  w.exchange(0xffffffffu, tl_shim::kOpWmmaStoreEnd, 0, all);
}

// D = A * B + C, products and sums in f32 (k order), like the tensor cores
// up to summation order.
template <int M, int N, int K, class TA, class LA, class TB, class LB, class TC>
inline void mma_sync(fragment<accumulator, M, N, K, TC>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
                     const fragment<matrix_b, M, N, K, TB, LB>& b, const fragment<accumulator, M, N, K, TC>& c,
                     bool satf = false) {
  float acc[M * N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float s = tl_f(c.x[i * N + j]);
      for (int k = 0; k < K; ++k) s = std::fma(tl_f(a.x[i * K + k]), tl_f(b.x[k * N + j]), s);
      acc[i * N + j] = s;
    }
  for (int i = 0; i < M * N; ++i) {
    float v = acc[i];
    if (satf) v = std::isnan(v) ? 0.0f : std::fmin(std::fmax(v, -FLT_MAX), FLT_MAX);
    d.x[i] = static_cast<TC>(v);
  }
}

}  // namespace wmma
}  // namespace nvcuda
