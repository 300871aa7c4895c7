// The executor behind cuda_on_cpu.h: the threads of a launch as fibers on the
// calling OS thread, with CUDA's barrier and warp semantics (see the header).
//
// A non-cooperative launch runs its blocks one after another (CUDA orders
// blocks in no way), or in a cluster launch its clusters one after another,
// the blocks of each together so that cluster.sync() can hold; a cooperative
// launch runs all of them together so that grid.sync() can hold. Inside a group of fibers the scheduler makes passes:
// each pass resumes every runnable fiber once, in the chosen thread order, and
// a fiber runs until it finishes, reaches a barrier, parks at a warp intrinsic
// or yields. A barrier opens when every thread it covers has reached it; when
// nothing can run and some thread has not finished, the launch fails with a
// description of where each thread stands.
//
// Under ThreadSanitizer (the _C_emu_tsan build) every emulated thread is a
// TSan fiber, and the happens-before order TSan knows of is CUDA's: the host's
// work before a launch precedes every thread of it; __syncthreads orders the
// threads of a block, cluster.sync() those of the cluster, grid.sync() those
// of the grid, __syncwarp those of its
// mask; atomics order as atomics; every thread
// precedes the host's work after the launch. Nothing else does: switching
// fibers does not synchronize, and the executor's own bookkeeping is hidden
// from TSan. So two accesses to one address by different threads, one a write,
// with no barrier between them, are reported as a data race whichever order
// the threads ran in: what compute-sanitizer's racecheck reports on a GPU, for
// global memory too.
#include "emulation/cuda_on_cpu.h"

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <deque>
#include <limits>
#include <map>
#include <exception>
#include <memory>
#include <numeric>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define VK_ASAN 1
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif
#if defined(__SANITIZE_THREAD__)
#define VK_TSAN 1
#include <sanitizer/tsan_interface.h>
extern "C" void __tsan_ignore_thread_begin();
extern "C" void __tsan_ignore_thread_end();
#endif

namespace vk_emu {
namespace {

constexpr size_t kStackBytes = 256 * 1024;
// Under ThreadSanitizer: the TSan fibers that the blocks of a non-cooperative
// launch take turns on (setup_block).
constexpr size_t kTsanBlockSlots = 4096;

// Thrown inside a parked fiber to unwind it after another thread failed.
struct Cancelled {};

// A kernel's own failure (assert or exception), with where it happened.
struct KernelError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

enum class State { Ready, Block, Grid, Cluster, Warp, Done };

// An asynchronous copy of `bytes` bytes (at most 16), the first `src_bytes`
// from src, zeros after them; `seen`, the source's bytes when it was issued.
struct AsyncCopy {
  unsigned char* dst;
  const unsigned char* src;
  size_t bytes, src_bytes;
  unsigned char seen[16];
};

struct Fiber {
  ucontext_t ctx;
  char* stack = nullptr;  // usable part, above a guard page
  uint3 tid{0, 0, 0};
  int block = 0;  // index into the launch's blocks
  int lane = 0, warp = 0;
  State state = State::Ready;
  // Warp intrinsic deposit and result.
  WarpOp wop = WarpOp::Sync;
  unsigned wmask = 0;
  uint64_t wvalue = 0, wresult = 0;
  int warg = 0, wwidth = 32;
  // A tensor-core instruction's deposit (warp_gather): warg bytes.
  unsigned char wblob[32] = {};
  // Block barrier with a reduction, and where the thread reached it.
  int bpred = 0, bresult = 0;
  const char* bfile = nullptr;
  unsigned bline = 0;
  bool yielded = false;  // parked by yield() in the last pass
  void* fake_stack = nullptr;  // AddressSanitizer's, while switched out
  // ThreadSanitizer: the fiber this thread runs as, whether it has run yet in
  // this launch, how many block and grid barriers it has passed, and the
  // sync object of the __syncwarp it waits at or last passed.
  void* tsan_fiber = nullptr;
  bool tsan_started = false;
  unsigned block_syncs = 0, grid_syncs = 0, cluster_syncs = 0;
  char* warp_sync = nullptr;
  // Asynchronous copies (async_copy): those not yet committed, and the
  // committed groups, oldest first, not yet waited for.
  std::vector<AsyncCopy> async_open;
  std::deque<std::vector<AsyncCopy>> async_groups;
};

// ThreadSanitizer's sync objects of one barrier: a slot for each parity of
// its crossings (see tsan_arrive).
struct BarrierSync {
  char slots[2] = {};
};

// Those of the __syncwarp of one mask in one warp: the lanes of a crossing
// release on the slot of its parity and acquire it once it completes (the
// argument of tsan_arrive holds because every crossing of one mask has the
// same lanes).
struct WarpSync {
  unsigned mask = 0, crossings = 0;
  BarrierSync sync;
};

struct SharedBuffer {
  const void* site;
  size_t bytes;
  std::unique_ptr<unsigned char[]> data;
};

// Dynamic shared memory is 256-byte aligned, as the nvcc build declares it at
// least 128-byte aligned and ldmatrix needs 16-byte aligned rows.
constexpr std::align_val_t kDynamicAlign{256};
struct AlignedDelete {
  void operator()(unsigned char* p) const { ::operator delete[](p, kDynamicAlign); }
};

// A bulk copy (bulk_copy) not yet complete, and an mbarrier's state: the
// arrivals of a phase, those still to come, the bytes the phase still waits
// for, the phases completed, the copies issued on it and its sync object for
// ThreadSanitizer (the completion releases it, each wait acquires it).
struct BulkCopy {
  unsigned char* dst;
  const unsigned char* src;  // nullptr: a store (store_async), whose value is `seen`
  std::vector<unsigned char> seen;
};
struct Mbarrier {
  unsigned count = 0, pending = 0;
  int64_t tx = 0;
  unsigned phase = 0;
  std::vector<BulkCopy> copies;
  std::unique_ptr<char> tsan_sync = std::make_unique<char>(0);
};

struct BlockState {
  uint3 idx{0, 0, 0};
  int first = 0, count = 0;  // fibers [first, first + count)
  // ThreadSanitizer's sync objects: two for __syncthreads, and those of
  // __syncwarp per warp and mask; the block's own allocations, alive until
  // the launch ends, so no two blocks of a launch share one.
  std::unique_ptr<BarrierSync> tsan_sync;
  std::vector<std::vector<std::unique_ptr<WarpSync>>> warp_syncs;
  std::vector<SharedBuffer> shared;
  std::unique_ptr<unsigned char[], AlignedDelete> dynamic;
  std::map<const void*, Mbarrier> mbarriers;  // by address in this block's shared memory
  // Per warp, the deposits of its last tensor-core instruction, lane by lane
  // (warp_gather): read by its lanes until the warp's next intrinsic completes.
  std::vector<std::vector<unsigned char>> gathered;
};

struct Launch {
  dim3 grid, block;
  size_t dynamic_smem = 0;
  bool cooperative = false;
  unsigned cluster = 1;  // blocks per cluster
  const std::function<void()>* body = nullptr;
  std::vector<Fiber> fibers;
  std::vector<BlockState> blocks;
  int active_first = 0, active_count = 0;  // the fibers being scheduled
  std::vector<std::vector<int>> warp_lanes;  // fibers of each (block, warp)
  // Warps whose intrinsic just completed: the scheduler runs them on at once,
  // so a warp gets ahead of the others until it reaches a block barrier.
  std::vector<size_t> run_ahead;
  int warps_per_block = 0;
  std::exception_ptr error;
  bool cancelling = false;
  BarrierSync grid_sync;   // ThreadSanitizer's sync objects of grid.sync()
  // ... of cluster.sync(), one per cluster run (the last is the running one's),
  // alive until the launch ends, so no two clusters share one.
  std::vector<std::unique_ptr<BarrierSync>> cluster_syncs;
  char end_sync = 0;       // ... and of the launch's end
  std::vector<BlockState> retired;  // blocks run, kept under ThreadSanitizer (see tsan_sync)
};

// Stacks are kept per OS thread and reused across launches.
struct StackPool {
  std::vector<char*> free;
  ~StackPool() {
    for (char* s : free) munmap(s - getpagesize(), kStackBytes + getpagesize());
  }
  char* get() {
    if (!free.empty()) {
      char* s = free.back();
      free.pop_back();
      return s;
    }
    const size_t page = getpagesize();
    void* p = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK, -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("emulated launch: cannot map a fiber stack");
    if (mprotect(p, page, PROT_NONE) != 0)  // guard page below the stack
      throw std::runtime_error("emulated launch: cannot protect a fiber stack's guard page");
    return static_cast<char*>(p) + page;
  }
  void put(char* s) { free.push_back(s); }
};

struct ThreadState {
  Order order = Order::Forward;
  uint64_t seed = 0;
  uint64_t launches = 0;
  Launch* launch = nullptr;  // the launch running on this OS thread
  Fiber* current = nullptr;  // the fiber running, or null in the scheduler
  ucontext_t scheduler;
  const void* sched_stack_bottom = nullptr;
  size_t sched_stack_size = 0;
  void* sched_fake_stack = nullptr;
  void* tsan_scheduler = nullptr;  // ThreadSanitizer's fiber of the scheduler
  StackPool stacks;
  // Under ThreadSanitizer: slots of a TSan fiber and the stack only it runs
  // on (a stack another TSan fiber wrote would be a race), reused across
  // launches.
  struct TsanSlot {
    void* fiber;
    char* stack;
  };
  std::vector<TsanSlot> tsan_slots;
};

thread_local ThreadState ts;
DeviceLimits g_limits;

// ------------------------------------------------------------ ThreadSanitizer
#ifdef VK_TSAN
#define VK_NO_TSAN __attribute__((no_sanitize_thread))
inline void tsan_hide(bool on) {
  if (on) __tsan_ignore_thread_begin();
  else __tsan_ignore_thread_end();
}
// Release at a barrier, and acquire once it opens, on the slot of this
// crossing's parity: a thread cannot release at crossing k + 2 before every
// thread covered has acquired at crossing k (it would have had to pass
// crossing k + 1, which they had not reached), so no thread acquires what
// another did after the barrier it is passing.
inline void tsan_release(void* p) { __tsan_release(p); }
inline void tsan_acquire(void* p) { __tsan_acquire(p); }
inline void tsan_arrive(BarrierSync& b, unsigned crossings) { __tsan_release(&b.slots[crossings & 1]); }
inline void tsan_pass(BarrierSync& b, unsigned& crossings) {
  __tsan_acquire(&b.slots[crossings & 1]);
  ++crossings;
}
#else
#define VK_NO_TSAN
inline void tsan_hide(bool) {}
inline void tsan_release(void*) {}
inline void tsan_acquire(void*) {}
inline void tsan_arrive(BarrierSync&, unsigned) {}
inline void tsan_pass(BarrierSync&, unsigned& crossings) { ++crossings; }
#endif

// For a scope: hides what the fiber does from TSan (the executor's
// bookkeeping: no part of the kernel, and it orders nothing the kernel does),
// or shows it (the kernel's body, run from hidden code), and restores the
// other state however the scope ends.
class TsanScope {
 public:
  explicit TsanScope(bool hide) : hide_(hide) { tsan_hide(hide); }
  ~TsanScope() { tsan_hide(!hide_); }
  TsanScope(const TsanScope&) = delete;
  TsanScope& operator=(const TsanScope&) = delete;

 private:
  bool hide_;
};
#define VK_HIDDEN const TsanScope vk_hidden(true)

std::string str(uint3 v) {
  std::ostringstream s;
  s << "(" << v.x << ", " << v.y << ", " << v.z << ")";
  return s.str();
}

std::string where(const Fiber& f) {
  const Launch& L = *ts.launch;
  return "block " + str(L.blocks[f.block].idx) + " thread " + str(f.tid);
}

#ifdef VK_TSAN
ThreadState::TsanSlot& tsan_slot(size_t i) {
  while (ts.tsan_slots.size() <= i) ts.tsan_slots.push_back({__tsan_create_fiber(0), ts.stacks.get()});
  return ts.tsan_slots[i];
}
#endif

// ------------------------------------------------------------ switching
// Not instrumented (as fiber_main): a thread's last switch never returns, and
// TSan would keep its frame on the TSan fiber's stack for every later launch.
VK_NO_TSAN void switch_to_scheduler(Fiber& f, bool finished) {
#ifdef VK_TSAN
  __tsan_switch_to_fiber(ts.tsan_scheduler, __tsan_switch_to_fiber_no_sync);
#endif
#ifdef VK_ASAN
  __sanitizer_start_switch_fiber(finished ? nullptr : &f.fake_stack, ts.sched_stack_bottom,
                                 ts.sched_stack_size);
#endif
  swapcontext(&f.ctx, &ts.scheduler);
#ifdef VK_ASAN
  __sanitizer_finish_switch_fiber(f.fake_stack, nullptr, nullptr);
#endif
  (void)finished;
}

void set_indices(const Fiber& f) {
  const Launch& L = *ts.launch;
  threadIdx = f.tid;
  blockIdx = L.blocks[f.block].idx;
  blockDim = L.block;
  gridDim = L.grid;
}

void resume(Fiber& f) {
  ts.current = &f;
  tsan_hide(true);  // the kernel reads these: written for each thread as it runs
  set_indices(f);
  tsan_hide(false);
#ifdef VK_ASAN
  __sanitizer_start_switch_fiber(&ts.sched_fake_stack, f.stack, kStackBytes);
#endif
#ifdef VK_TSAN
  // The first switch into a thread synchronizes: what the host did before the
  // launch precedes it. The others do not.
  const unsigned flags = f.tsan_started ? __tsan_switch_to_fiber_no_sync : 0;
  f.tsan_started = true;
  __tsan_switch_to_fiber(f.tsan_fiber, flags);
#endif
  swapcontext(&ts.scheduler, &f.ctx);
#ifdef VK_ASAN
  __sanitizer_finish_switch_fiber(ts.sched_fake_stack, nullptr, nullptr);
#endif
  ts.current = nullptr;
}

void recheck_warp(const Fiber& done);

// Runs the kernel's body: its own accesses count for ThreadSanitizer, hidden
// again however the body ends.
void run_body(const Launch& L) {
  const TsanScope shown(false);
  (*L.body)();
}

// A thread must not exit with asynchronous copies it has not waited for.
void check_async_done(const Fiber& f) {
  size_t pending = f.async_open.size();
  for (const auto& g : f.async_groups) pending += g.size();
  if (pending > 0)
    throw KernelError(where(f) + ": the thread exited with " + std::to_string(pending) +
                      " asynchronous copies to shared memory that it did not wait for");
}

VK_NO_TSAN void fiber_main() {
#ifdef VK_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &ts.sched_stack_bottom, &ts.sched_stack_size);
#endif
  tsan_hide(true);
  Fiber& f = *ts.current;
  Launch& L = *ts.launch;
  try {
    if (!L.cancelling) {  // a fiber first resumed to be cancelled never runs
      run_body(L);
      check_async_done(f);
    }
  } catch (const Cancelled&) {
  } catch (const KernelError&) {
    if (!L.error) L.error = std::current_exception();
  } catch (const std::exception& e) {
    if (!L.error)
      L.error = std::make_exception_ptr(KernelError(where(f) + ": " + e.what()));
  } catch (...) {
    if (!L.error) L.error = std::make_exception_ptr(KernelError(where(f) + ": unknown exception"));
  }
  tsan_release(&L.end_sync);  // the thread precedes the host's work after the launch
  f.state = State::Done;
  if (!L.cancelling && !L.error) {
    try {
      recheck_warp(f);
    } catch (...) {
      L.error = std::current_exception();
    }
  }
  tsan_hide(false);  // its TSan fiber runs other threads in later launches
  switch_to_scheduler(f, true);
}

void start_fiber(Fiber& f) {
#ifndef VK_TSAN
  f.stack = ts.stacks.get();  // under TSan the slot's (setup_block)
#endif
#ifdef VK_ASAN
  __asan_unpoison_memory_region(f.stack, kStackBytes);  // a reused stack may hold old poison
#endif
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = f.stack;
  f.ctx.uc_stack.ss_size = kStackBytes;
  f.ctx.uc_link = nullptr;
  makecontext(&f.ctx, fiber_main, 0);
  // ASan's swapcontext interceptor clears the shadow of uc_stack at every
  // switch into the context; with a size of 0 it leaves the live stack alone.
  f.ctx.uc_stack.ss_size = 0;
}

// Parks the running fiber in `state` until the scheduler resumes it.
void park(State state) {
  Fiber& f = *ts.current;
  f.state = state;
  switch_to_scheduler(f, false);
  if (ts.launch->cancelling) throw Cancelled{};
}

Fiber& running(const char* what) {
  if (ts.current == nullptr || ts.launch == nullptr)
    throw std::runtime_error(std::string(what) + " called outside an emulated kernel");
  return *ts.current;
}

// ------------------------------------------------------------ warps
std::string op_name(WarpOp op) {
  static const char* names[] = {"__syncwarp", "__shfl_sync", "__shfl_up_sync", "__shfl_down_sync",
                                "__shfl_xor_sync", "__ballot_sync", "__any_sync", "__all_sync",
                                "a tensor-core instruction (ldmatrix, mma)"};
  return names[int(op)];
}

[[noreturn]] void warp_fail(const Fiber& f, const std::string& msg) {
  throw KernelError(where(f) + ": " + op_name(f.wop) + ": " + msg);
}

// If every lane of f's mask that exists and has not exited is parked at the
// same intrinsic with the same mask, computes their results and makes them
// runnable. (CUDA requires only the non-exited lanes named in the mask to take
// part; a shuffle that reads an absent lane is an error here, where CUDA
// would return an undefined value.)
// The sync object state of `mask`'s __syncwarp in f's warp (ThreadSanitizer).
WarpSync& warp_sync_of(const Fiber& f, unsigned mask) {
  std::vector<std::unique_ptr<WarpSync>>& all = ts.launch->blocks[f.block].warp_syncs[f.warp];
  for (auto& w : all)
    if (w->mask == mask) return *w;
  all.push_back(std::make_unique<WarpSync>());
  all.back()->mask = mask;
  return *all.back();
}

// The instruction of a tensor-core gather (warp_gather's `what`).
std::string gather_name(uint64_t what) {
  static const char* kinds[] = {"ldmatrix.x4", "mma.sync f16", "mma.sync bf16", "mma.sync tf32",
                                "ldmatrix.x2"};
  return kinds[what];
}

void try_complete_warp(Fiber& f) {
  Launch& L = *ts.launch;
  const std::vector<int>& lanes = L.warp_lanes[size_t(f.block) * L.warps_per_block + f.warp];
  unsigned present = 0;
  for (int l = 0; l < int(lanes.size()); ++l) {
    if (!(f.wmask >> l & 1u)) continue;
    const Fiber& o = L.fibers[lanes[l]];
    if (o.state == State::Done) continue;
    // Not there yet, or still at another intrinsic of its own group (which
    // may complete first); a lane that never comes is a deadlock, reported
    // by the scheduler.
    if (o.state != State::Warp || o.wop != f.wop || o.wmask != f.wmask) return;
    present |= 1u << l;
  }
  if (f.wop == WarpOp::Gather) {
    // All 32 lanes of a whole warp, at the same instruction.
    for (int l = 0; l < 32; ++l) {
      if (l >= int(lanes.size()))
        warp_fail(f, "needs a whole warp of 32 lanes; this one has " + std::to_string(lanes.size()));
      if (!(present >> l & 1u)) warp_fail(f, "lane " + std::to_string(l) + " has exited");
      if (L.fibers[lanes[l]].wvalue != L.fibers[lanes[0]].wvalue)
        warp_fail(f, "lanes 0 and " + std::to_string(l) + " at different instructions (" +
                         gather_name(L.fibers[lanes[0]].wvalue) + ", " +
                         gather_name(L.fibers[lanes[l]].wvalue) + ")");
    }
    std::vector<std::vector<unsigned char>>& g = L.blocks[f.block].gathered;
    if (g.size() <= size_t(f.warp)) g.resize(size_t(f.warp) + 1);
    g[f.warp].resize(size_t(32) * f.warg);
    for (int l = 0; l < 32; ++l)
      std::memcpy(g[f.warp].data() + size_t(l) * f.warg, L.fibers[lanes[l]].wblob, size_t(f.warg));
  }
  uint64_t bits = 0;
  for (int l = 0; l < 32; ++l)
    if (present >> l & 1u) bits |= uint64_t(L.fibers[lanes[l]].wvalue != 0) << l;
  for (int l = 0; l < 32; ++l) {
    if (!(present >> l & 1u)) continue;
    Fiber& o = L.fibers[lanes[l]];
    // PTX uses the low 5 bits of the lane argument; width is a power of 2.
    const int w = o.wwidth, base = l & ~(w - 1), d = o.warg & 31;
    int src = l;
    switch (o.wop) {
      case WarpOp::ShflIdx: src = base + (d & (w - 1)); break;
      case WarpOp::ShflUp: src = l - d >= base ? l - d : l; break;
      case WarpOp::ShflDown: src = l + d < base + w ? l + d : l; break;
      case WarpOp::ShflXor: src = (l ^ d) < base + w ? (l ^ d) : l; break;
      default: break;
    }
    switch (o.wop) {
      case WarpOp::Ballot: o.wresult = bits; break;
      case WarpOp::Any: o.wresult = bits != 0; break;
      case WarpOp::All: o.wresult = bits == present; break;
      case WarpOp::Sync: o.wresult = 0; break;
      default:
        if (!(present >> src & 1u))
          warp_fail(o, "lane " + std::to_string(l) + " reads lane " + std::to_string(src) + ", which " +
                           (src >= int(lanes.size()) ? "does not exist in this block"
                            : !(f.wmask >> src & 1u) ? "is not in the mask"
                                                      : "has exited"));
        o.wresult = L.fibers[lanes[src]].wvalue;
    }
  }
  for (int l = 0; l < 32; ++l)
    if (present >> l & 1u) L.fibers[lanes[l]].state = State::Ready;
  if (f.wop == WarpOp::Sync && f.warp_sync != nullptr)
    ++warp_sync_of(f, f.wmask).crossings;  // the next crossing of this mask: the other slot
  L.run_ahead.push_back(size_t(f.block) * L.warps_per_block + f.warp);
}

// A fiber that exits may be the last lane a parked warp group waited for.
void recheck_warp(const Fiber& done) {
  Launch& L = *ts.launch;
  for (int i : L.warp_lanes[size_t(done.block) * L.warps_per_block + done.warp])
    if (L.fibers[i].state == State::Warp) try_complete_warp(L.fibers[i]);
}

// ------------------------------------------------------------ scheduling
std::vector<int> pass_order(int first, int count, std::mt19937_64& rng) {
  std::vector<int> idx(count);
  std::iota(idx.begin(), idx.end(), first);
  if (ts.order == Order::Reverse) std::reverse(idx.begin(), idx.end());
  if (ts.order == Order::Random) std::shuffle(idx.begin(), idx.end(), rng);
  return idx;
}

std::string describe_stuck(const Launch& L) {
  std::ostringstream s;
  int shown = 0;
  for (int i = L.active_first; i < L.active_first + L.active_count && shown < 8; ++i) {
    const Fiber& f = L.fibers[i];
    const char* st = f.state == State::Block  ? "at __syncthreads"
                     : f.state == State::Grid ? "at grid.sync()"
                     : f.state == State::Cluster ? "at cluster.sync()"
                     : f.state == State::Warp ? nullptr
                     : f.state == State::Done ? "exited"
                                              : "runnable";
    s << "\n  " << where(f) << ": " << (st ? st : ("at " + op_name(f.wop)).c_str());
    ++shown;
  }
  return s.str();
}

// Opens the barriers that every thread they cover has reached. Returns
// whether any fiber became runnable; throws if a barrier can never open.
bool release_barriers(Launch& L) {
  bool released = false;
  const int lo = L.active_first, hi = L.active_first + L.active_count;
  // Block barriers.
  for (size_t b = 0; b < L.blocks.size(); ++b) {
    const BlockState& B = L.blocks[b];
    if (B.first < lo || B.first >= hi) continue;
    int at = 0, done = 0, count = 0;
    const Fiber* first_at = nullptr;
    for (int i = B.first; i < B.first + B.count; ++i) {
      const Fiber& f = L.fibers[i];
      if (f.state == State::Block) {
        ++at;
        count += f.bpred != 0;
        if (first_at == nullptr) first_at = &f;
        if (f.bline != first_at->bline || std::string(f.bfile) != first_at->bfile)
          throw KernelError("threads of block " + str(B.idx) + " wait at different __syncthreads(): " +
                            where(*first_at) + " at " + first_at->bfile + ":" +
                            std::to_string(first_at->bline) + ", " + where(f) + " at " + f.bfile +
                            ":" + std::to_string(f.bline) + " (a divergent barrier)");
      }
      done += f.state == State::Done;
    }
    if (at == 0 || at + done < B.count) continue;
    if (done > 0)
      throw KernelError("__syncthreads() reached by " + std::to_string(at) + " of the " +
                        std::to_string(B.count) + " threads of block " + str(B.idx) +
                        "; the others have exited (a barrier must be reached by every thread "
                        "of the block)");
    for (int i = B.first; i < B.first + B.count; ++i) {
      Fiber& f = L.fibers[i];
      f.bresult = count;  // threads whose predicate was true
      f.state = State::Ready;
    }
    released = true;
  }
  // The grid barrier, or the cluster barrier: the fibers scheduled together
  // are the grid of a cooperative launch, or one cluster.
  for (const State barrier : {State::Grid, State::Cluster}) {
    int at = 0, done = 0;
    for (int i = lo; i < hi; ++i) {
      at += L.fibers[i].state == barrier;
      done += L.fibers[i].state == State::Done;
    }
    if (at == 0 || at + done < L.active_count) continue;
    const bool grid = barrier == State::Grid;
    if (done > 0)
      throw KernelError(std::string(grid ? "grid.sync()" : "cluster.sync()") + " reached by " +
                        std::to_string(at) + " of the " + std::to_string(L.active_count) +
                        " threads of the " + (grid ? "grid" : "cluster") +
                        "; the others have exited");
    for (int i = lo; i < hi; ++i) L.fibers[i].state = State::Ready;
    released = true;
  }
  return released;
}

void cancel_all(Launch& L) {
  L.cancelling = true;
  for (int i = L.active_first; i < L.active_first + L.active_count; ++i) {
    Fiber& f = L.fibers[i];
    if (f.state != State::Done) resume(f);  // unwinds it (Cancelled) to fiber_main
  }
}

// Passes in a row in which every thread that ran only yielded (a spin wait):
// past this, the flag it waits for can never be set.
constexpr int kMaxSpinPasses = 10000;

void release_stacks(Launch& L, int first, int count) {
#ifndef VK_TSAN
  for (int i = first; i < first + count; ++i) ts.stacks.put(L.fibers[i].stack);
#else
  (void)L, (void)first, (void)count;  // the slots keep theirs
#endif
}

// A block must not end with bulk copies pending on its mbarriers.
void check_bulk_done(const Launch& L) {
  for (const BlockState& B : L.blocks)
    for (const auto& [bar, m] : B.mbarriers)
      if (!m.copies.empty())
        throw KernelError("block (" + std::to_string(B.idx.x) + ", " + std::to_string(B.idx.y) +
                          ", " + std::to_string(B.idx.z) + ") ended with " +
                          std::to_string(m.copies.size()) +
                          " bulk copies or stores to shared memory that nothing waited for");
}

void run_group(Launch& L, int first, int count, std::mt19937_64& rng) {
  L.active_first = first;
  L.active_count = count;
  for (int i = first; i < first + count; ++i) start_fiber(L.fibers[i]);
  int spin_passes = 0;
  try {
    for (;;) {
      bool ran = false, only_yields = true;
      for (int i : pass_order(first, count, rng)) {
        Fiber& f = L.fibers[i];
        if (f.state != State::Ready) continue;
        f.yielded = false;
        resume(f);
        ran = true;
        only_yields &= f.yielded && f.state == State::Ready;
        while (!L.error && !L.run_ahead.empty()) {
          const size_t w = L.run_ahead.back();
          L.run_ahead.pop_back();
          std::vector<int> lanes = L.warp_lanes[w];
          if (ts.order == Order::Reverse) std::reverse(lanes.begin(), lanes.end());
          if (ts.order == Order::Random) std::shuffle(lanes.begin(), lanes.end(), rng);
          for (int lane : lanes) {
            if (L.fibers[lane].state == State::Ready) resume(L.fibers[lane]);
            if (L.error) break;
          }
        }
        if (L.error) break;
      }
      if (L.error) std::rethrow_exception(L.error);
      bool done = true;
      for (int i = first; i < first + count; ++i) done &= L.fibers[i].state == State::Done;
      if (done) break;
      const bool released = release_barriers(L);
      if (!released && !ran)
        throw KernelError("deadlock: no thread can go on" + describe_stuck(L));
      spin_passes = released || !only_yields ? 0 : spin_passes + 1;
      if (spin_passes > kMaxSpinPasses)
        throw KernelError(std::string("livelock: every runnable thread spins in a wait that nothing "
                                      "ends") +
                          (L.cooperative ? ""
                           : L.cluster > 1
                               ? " (a cluster launch runs its clusters one after another: a flag "
                                 "set by another cluster never comes)"
                               : " (a non-cooperative launch runs its blocks one after another: "
                                 "a flag set by another block never comes)") +
                          describe_stuck(L));
    }
  } catch (...) {
    cancel_all(L);
    release_stacks(L, first, count);
    throw;
  }
  release_stacks(L, first, count);
}

// SMs that cooperative launches get at run time.
uint64_t runtime_sms() {
  return uint64_t(g_limits.runtime_sm_count > 0 ? g_limits.runtime_sm_count : g_limits.sm_count);
}

void check_config(dim3 grid, dim3 block, size_t smem, bool cooperative, unsigned cluster) {
  const DeviceLimits& d = g_limits;
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;
  std::ostringstream err;
  if (threads == 0 || blocks == 0)
    err << "invalid configuration: grid (" << grid.x << ", " << grid.y << ", " << grid.z
        << ") and block (" << block.x << ", " << block.y << ", " << block.z
        << ") must have no zero dimension";
  else if (threads > uint64_t(d.max_threads_per_block) || block.z > 64)
    err << "invalid configuration: " << threads << " threads per block, at most "
        << d.max_threads_per_block;
  else if (grid.x > 2147483647u || grid.y > 65535u || grid.z > 65535u)
    err << "invalid configuration: grid (" << grid.x << ", " << grid.y << ", " << grid.z
        << ") exceeds (2^31-1, 65535, 65535)";
  else if (smem > d.max_shared_per_block)
    err << "invalid configuration: " << smem << " bytes of dynamic shared memory, at most "
        << d.max_shared_per_block;
  else if (cluster == 0 || cluster > unsigned(d.max_cluster_blocks) || grid.x % cluster != 0 ||
           (cluster > 1 && cooperative))
    err << "invalid cluster: " << cluster << " blocks per cluster with grid.x = " << grid.x
        << " (a cluster has 1 to " << d.max_cluster_blocks
        << " blocks and divides grid.x; the emulator has no cooperative cluster launch)";
  if (!err.str().empty()) throw std::runtime_error("emulated launch: " + err.str());
  const uint64_t per_sm = blocks_per_sm(threads, smem);
  if (cluster > 1) {
    // Every block of a cluster is resident at once, on SMs of one GPC.
    if (per_sm == 0 || cluster * threads > uint64_t(d.max_cooperative_threads))
      throw std::runtime_error("emulated cluster launch: a cluster of " + std::to_string(cluster) +
                               " blocks of " + std::to_string(threads) + " threads and " +
                               std::to_string(smem) + " bytes of shared memory cannot be resident");
#ifdef VK_TSAN
    if (cluster > std::max<uint64_t>(2, kTsanBlockSlots / threads))
      throw std::runtime_error("emulated cluster launch: more threads in a cluster than "
                               "ThreadSanitizer fiber slots");
#endif
  }
  if (!cooperative) return;
  const uint64_t sms = runtime_sms();
  if (blocks > per_sm * sms)
    throw std::runtime_error(
        "emulated cooperative launch: too many blocks in cooperative launch (" +
        std::to_string(blocks) + " blocks, at most " + std::to_string(per_sm * sms) +
        " can be resident: " + std::to_string(per_sm) + " per SM on " + std::to_string(sms) +
        " SMs)");
  if (blocks * threads > uint64_t(d.max_cooperative_threads))
    throw std::runtime_error("emulated cooperative launch: " + std::to_string(blocks * threads) +
                             " threads, the emulator runs at most " +
                             std::to_string(d.max_cooperative_threads) + " at once");
}

}  // namespace

// ------------------------------------------------------------ API
uint64_t blocks_per_sm(uint64_t threads, size_t smem) {
  const DeviceLimits& d = g_limits;
  if (threads == 0 || threads > uint64_t(d.max_threads_per_block) || smem > d.max_shared_per_block)
    return 0;
  uint64_t per_sm = std::min<uint64_t>(d.max_blocks_per_sm, d.max_threads_per_sm / threads);
  if (smem > 0) per_sm = std::min<uint64_t>(per_sm, d.max_shared_per_sm / smem);
  return per_sm;
}

bool cooperative_fits(dim3 grid, dim3 block, size_t dynamic_smem) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;
  return blocks <= blocks_per_sm(threads, dynamic_smem) * runtime_sms();
}

void set_thread_order(Order order, uint64_t seed) {
  ts.order = order;
  ts.seed = seed;
}
Order thread_order() { return ts.order; }
DeviceLimits& device_limits() { return g_limits; }
LaunchCounts& launch_counts() {
  static LaunchCounts counts;
  return counts;
}

void launch(dim3 grid, dim3 block, size_t dynamic_smem, bool cooperative,
            const std::function<void()>& body, unsigned clusters_of) {
  if (ts.launch != nullptr) throw std::runtime_error("emulated launch from inside a kernel");
  const unsigned cluster = clusters_of == 0 ? 1 : clusters_of;  // a plain launch: blocks
  check_config(grid, block, dynamic_smem, cooperative, cluster);
  LaunchCounts& counts = launch_counts();
  ++counts.launches;
  if (cooperative) {
    ++counts.cooperative;
    counts.last_cooperative_blocks = uint64_t(grid.x) * grid.y * grid.z;
  }
  if (clusters_of > 0) {
    ++counts.clustered;
    counts.last_cluster_grid = uint64_t(grid.x) * grid.y * grid.z;
    counts.last_cluster_blocks = cluster;
  }
  Launch L;
  L.grid = grid;
  L.block = block;
  L.dynamic_smem = dynamic_smem;
  L.cooperative = cooperative;
  L.cluster = cluster;
  L.body = &body;
  const int threads = int(block.x * block.y * block.z);
  const uint64_t nblocks = uint64_t(grid.x) * grid.y * grid.z;
  L.warps_per_block = (threads + 31) / 32;
  std::mt19937_64 rng(ts.seed * 0x9E3779B97F4A7C15ull + ++ts.launches);

  struct Scope {
    Launch& L;
    ~Scope() {
      tsan_acquire(&L.end_sync);  // every thread precedes what the host does next
      ts.launch = nullptr;
    }
  } scope{L};
  ts.launch = &L;
#ifdef VK_TSAN
  // Set once (it never changes): a thread's last switch reads it unhidden.
  if (ts.tsan_scheduler == nullptr) ts.tsan_scheduler = __tsan_get_current_fiber();
#endif

  auto setup_block = [&](uint64_t b, int first, uint64_t seq) {
    BlockState& B = L.blocks.emplace_back();
    B.idx = {unsigned(b % grid.x), unsigned(b / grid.x % grid.y), unsigned(b / grid.x / grid.y)};
    B.first = first;
    B.count = threads;
    if (dynamic_smem > 0) {
      B.dynamic.reset(static_cast<unsigned char*>(::operator new[](dynamic_smem, kDynamicAlign)));
      std::memset(B.dynamic.get(), 0xff, dynamic_smem);  // NaN in every float type
    }
    const int bi = int(L.blocks.size() - 1);
    B.tsan_sync = std::make_unique<BarrierSync>();
#ifdef VK_TSAN
    B.warp_syncs.resize(L.warps_per_block);
    // Threads of a cooperative launch are distinct TSan fibers. Those of
    // other launches, whose blocks run one after another, are distinct in
    // kTsanBlockSlots / threads blocks in a row of the run order (a fiber is
    // ordered with itself: a race between blocks that many apart, and only
    // between threads that share a fiber, goes unseen).
    const size_t per_run = std::max<size_t>(2, kTsanBlockSlots / size_t(threads));
    const size_t fiber_base = cooperative ? size_t(first) : (seq % per_run) * threads;
#else
    (void)seq;
#endif
    for (int t = 0; t < threads; ++t) {
      Fiber& f = L.fibers.emplace_back();
      f.tid = {unsigned(t % block.x), unsigned(t / block.x % block.y),
               unsigned(t / block.x / block.y)};
      f.block = bi;
      f.lane = t % 32;
      f.warp = t / 32;
#ifdef VK_TSAN
      const ThreadState::TsanSlot& slot = tsan_slot(fiber_base + t);
      f.tsan_fiber = slot.fiber;
      f.stack = slot.stack;
      __tsan_set_fiber_name(f.tsan_fiber, ("block " + str(B.idx) + " thread " + str(f.tid)).c_str());
#endif
    }
    for (int w = 0; w < L.warps_per_block; ++w) {
      std::vector<int>& lanes = L.warp_lanes.emplace_back();
      for (int t = w * 32; t < std::min(threads, w * 32 + 32); ++t) lanes.push_back(first + t);
    }
  };

  // Block order (cluster order, and block order within a cluster) follows
  // the thread order too.
  auto ordered = [&](uint64_t n) {
    std::vector<uint64_t> order(n);
    std::iota(order.begin(), order.end(), 0);
    if (ts.order == Order::Reverse) std::reverse(order.begin(), order.end());
    if (ts.order == Order::Random) std::shuffle(order.begin(), order.end(), rng);
    return order;
  };

  if (cooperative) {
    const std::vector<uint64_t> order = ordered(nblocks);
    L.fibers.reserve(nblocks * threads);
    for (uint64_t seq = 0; seq < nblocks; ++seq) setup_block(order[seq], int(L.fibers.size()), seq);
    run_group(L, 0, int(L.fibers.size()), rng);
    check_bulk_done(L);
  } else {
    // One cluster at a time (a block, unless clustered): its blocks are
    // consecutive along x, so cluster c of row (y, z) holds the blocks
    // (c * cluster + r, y, z).
    L.fibers.reserve(size_t(cluster) * threads);
    const uint64_t per_row = grid.x / cluster;
    uint64_t seq = 0;
    for (const uint64_t c : ordered(nblocks / cluster)) {
      L.fibers.clear();
#ifdef VK_TSAN
      for (BlockState& done : L.blocks) L.retired.push_back(std::move(done));
#endif
      L.blocks.clear();
      L.warp_lanes.clear();
      L.cluster_syncs.push_back(std::make_unique<BarrierSync>());
      const uint64_t row = c / per_row, x0 = (c % per_row) * cluster;
      for (const uint64_t r : ordered(cluster))
        setup_block(row * grid.x + x0 + r, int(L.fibers.size()), seq++);
      run_group(L, 0, int(L.fibers.size()), rng);
      check_bulk_done(L);
    }
  }
}

void assert_failed(const char* cond, const char* file, int line) {
  VK_HIDDEN;
  std::string msg = std::string("device-side assert failed: ") + cond + " (" + file + ":" +
                    std::to_string(line) + ")";
  if (ts.current != nullptr && ts.launch != nullptr)
    msg = where(*ts.current) + ": " + msg;
  throw KernelError(msg);
}

// A block barrier at (file, line): returns how many threads of the block
// passed a nonzero pred.
int block_barrier(const char* what, int pred, const char* file, unsigned line) {
  Fiber& f = running(what);
  f.bpred = pred != 0;
  f.bfile = file;
  f.bline = line;
  BarrierSync& sync = *ts.launch->blocks[f.block].tsan_sync;
  tsan_arrive(sync, f.block_syncs);
  park(State::Block);
  tsan_pass(sync, f.block_syncs);
  return f.bresult;
}

void sync_block(const char* file, unsigned line) {
  VK_HIDDEN;
  block_barrier("__syncthreads", 0, file, line);
}

int sync_block_reduce(int pred, int op, const char* file, unsigned line) {
  VK_HIDDEN;
  const int count = block_barrier("__syncthreads_count/and/or", pred, file, line);
  const int n = int(blockDim.x * blockDim.y * blockDim.z);
  return op == 0 ? count : (op == 1 ? int(count == n) : int(count > 0));
}

void sync_grid() {
  VK_HIDDEN;
  Fiber& f = running("grid.sync()");
  if (!ts.launch->cooperative)
    throw KernelError(where(f) + ": grid.sync() needs a cooperative launch");
  Launch& L = *ts.launch;
  tsan_arrive(L.grid_sync, f.grid_syncs);
  park(State::Grid);
  tsan_pass(L.grid_sync, f.grid_syncs);
}

void sync_cluster() {
  VK_HIDDEN;
  Fiber& f = running("cluster.sync()");
  Launch& L = *ts.launch;
  if (L.cooperative)
    throw KernelError(where(f) + ": cluster.sync() in a cooperative launch (not emulated)");
  BarrierSync& sync = *L.cluster_syncs.back();
  ++launch_counts().cluster_syncs;
  tsan_arrive(sync, f.cluster_syncs);
  park(State::Cluster);
  tsan_pass(sync, f.cluster_syncs);
}

unsigned cluster_blocks() {
  VK_HIDDEN;
  running("this_cluster()");
  return ts.launch->cluster;
}

// The blocks of the running cluster are those of L.blocks (a cluster launch
// sets up one cluster at a time; a plain launch one block, a cluster of one).
void* cluster_shared(const void* p, unsigned rank) {
  VK_HIDDEN;
  Fiber& f = running("map_shared_rank");
  Launch& L = *ts.launch;
  if (L.cooperative)
    throw KernelError(where(f) + ": map_shared_rank in a cooperative launch (not emulated)");
  const BlockState& self = L.blocks[f.block];
  const auto* base = self.dynamic.get();
  const auto* q = static_cast<const unsigned char*>(p);
  if (base == nullptr || q < base || q >= base + L.dynamic_smem)
    throw KernelError(where(f) + ": map_shared_rank of an address outside the block's dynamic "
                      "shared memory (the emulator maps only that)");
  if (rank >= L.cluster)
    throw KernelError(where(f) + ": map_shared_rank to block rank " + std::to_string(rank) +
                      " of a cluster of " + std::to_string(L.cluster));
  const unsigned x = self.idx.x / L.cluster * L.cluster + rank;
  for (BlockState& b : L.blocks) {
    if (b.idx.x != x || b.idx.y != self.idx.y || b.idx.z != self.idx.z) continue;
    // On the GPU a block's shared memory is gone once all its threads exit
    // (a cluster.sync() before the exit keeps it for the others' accesses).
    bool exited = true;
    for (int t = b.first; t < b.first + b.count; ++t) exited = exited && L.fibers[t].state == State::Done;
    if (exited)
      throw KernelError(where(f) + ": map_shared_rank to block rank " + std::to_string(rank) +
                        ", whose threads have all exited (its shared memory is gone)");
    return b.dynamic.get() + (q - base);
  }
  throw KernelError(where(f) + ": map_shared_rank: block rank " + std::to_string(rank) +
                    " of the cluster is not running");
}

void async_copy(void* dst, const void* src, size_t bytes, size_t src_bytes) {
  VK_HIDDEN;
  Fiber& f = running("an asynchronous copy");
  const Launch& L = *ts.launch;
  const BlockState& B = L.blocks[f.block];
  const auto* d = static_cast<unsigned char*>(dst);
  if ((bytes != 4 && bytes != 8 && bytes != 16) || src_bytes > bytes)
    throw KernelError(where(f) + ": an asynchronous copy of " + std::to_string(bytes) +
                      " bytes, " + std::to_string(src_bytes) +
                      " from the source (4, 8 or 16, and at most as many from the source)");
  if (reinterpret_cast<uintptr_t>(dst) % bytes != 0 || reinterpret_cast<uintptr_t>(src) % bytes != 0)
    throw KernelError(where(f) + ": an asynchronous copy of " + std::to_string(bytes) +
                      " bytes needs source and destination aligned to that many bytes");
  bool in_shared = B.dynamic != nullptr && d >= B.dynamic.get() &&
                   d + bytes <= B.dynamic.get() + L.dynamic_smem;
  for (const SharedBuffer& s : B.shared)
    in_shared = in_shared || (d >= s.data.get() && d + bytes <= s.data.get() + s.bytes);
  if (!in_shared)
    throw KernelError(where(f) + ": an asynchronous copy to an address outside the block's "
                      "shared memory");
  AsyncCopy c{static_cast<unsigned char*>(dst), static_cast<const unsigned char*>(src), bytes,
              src_bytes, {}};
  {
    const TsanScope shown(false);  // the kernel's own accesses (not the bookkeeping)
    std::memcpy(c.seen, c.src, src_bytes);
    // Until it completes, the destination holds garbage (NaN in every float type).
    std::memset(c.dst, 0xff, bytes);
  }
  f.async_open.push_back(c);
}

void async_commit() {
  VK_HIDDEN;
  Fiber& f = running("an asynchronous copy commit");
  f.async_groups.push_back(std::move(f.async_open));
  f.async_open.clear();
}

void async_wait(int pending) {
  VK_HIDDEN;
  Fiber& f = running("an asynchronous copy wait");
  while (f.async_groups.size() > size_t(pending < 0 ? 0 : pending)) {
    for (const AsyncCopy& queued : f.async_groups.front()) {
      const AsyncCopy c = queued;  // (the kernel's accesses below touch no bookkeeping)
      bool changed;
      {
        const TsanScope shown(false);  // the kernel's own accesses
        changed = std::memcmp(c.seen, c.src, c.src_bytes) != 0;
        if (!changed) {
          std::memcpy(c.dst, c.seen, c.src_bytes);
          std::memset(c.dst + c.src_bytes, 0, c.bytes - c.src_bytes);
        }
      }
      if (changed)
        throw KernelError(where(f) + ": the source of an asynchronous copy changed before the "
                          "copy completed");
    }
    f.async_groups.pop_front();
  }
}

// Whether [p, p + bytes) lies in the shared memory of block B.
bool in_shared_memory(const Launch& L, const BlockState& B, const void* p, size_t bytes) {
  const auto* d = static_cast<const unsigned char*>(p);
  bool in = B.dynamic != nullptr && d >= B.dynamic.get() &&
            d + bytes <= B.dynamic.get() + L.dynamic_smem;
  for (const SharedBuffer& s : B.shared)
    in = in || (d >= s.data.get() && d + bytes <= s.data.get() + s.bytes);
  return in;
}

// What mbarrier_init writes in the barrier's 8 bytes (on a GPU, its state):
// a store or a copy over them is an error at the barrier's next use.
constexpr unsigned char kMbarrierMark = 0x5b;

// The mbarrier at `bar` in block B's shared memory (the running thread's
// block unless given).
Mbarrier& mbarrier_of(Fiber& f, const void* bar, const char* what, BlockState* in = nullptr) {
  BlockState& B = in != nullptr ? *in : ts.launch->blocks[f.block];
  const auto it = B.mbarriers.find(bar);
  if (it == B.mbarriers.end())
    throw KernelError(where(f) + ": " + what + " on an address where no mbarrier was initialized");
  const auto* bytes = static_cast<const unsigned char*>(bar);
  for (int i = 0; i < 8; ++i)
    if (bytes[i] != kMbarrierMark)
      throw KernelError(where(f) + ": " + what + " on an mbarrier whose bytes were overwritten "
                        "since its init (by a store or a copy)");
  return it->second;
}

void mbarrier_init(void* bar, unsigned count) {
  VK_HIDDEN;
  Fiber& f = running("an mbarrier init");
  const Launch& L = *ts.launch;
  BlockState& B = ts.launch->blocks[f.block];
  if (reinterpret_cast<uintptr_t>(bar) % 8 != 0 || !in_shared_memory(L, B, bar, 8))
    throw KernelError(where(f) + ": an mbarrier must be 8 bytes of the block's shared memory, "
                      "8-byte aligned");
  if (count < 1) throw KernelError(where(f) + ": an mbarrier needs at least one arrival a phase");
  const auto it = B.mbarriers.find(bar);
  if (it != B.mbarriers.end() && !it->second.copies.empty())
    throw KernelError(where(f) + ": an mbarrier initialized again with copies pending on it");
  Mbarrier& m = B.mbarriers[bar];
  std::memset(bar, kMbarrierMark, 8);
  m.count = m.pending = count;
  m.tx = 0;
  m.phase = 0;
}

void mbarrier_arrive_expect_tx(void* bar, unsigned bytes) {
  VK_HIDDEN;
  Fiber& f = running("an mbarrier arrival");
  Mbarrier& m = mbarrier_of(f, bar, "an arrival");
  if (m.pending == 0)
    throw KernelError(where(f) + ": more arrivals on an mbarrier than its phase has");
  m.tx += int64_t(bytes);
  tsan_release(m.tsan_sync.get());  // what the thread did before precedes the phase's end
  --m.pending;
}

// A bulk copy or st.async store c issued on mbarrier m (counted in `count`):
// its bytes, c.seen (read from c.src at issue where it has one), land at c.dst
// when m's phase completes (mbarrier_wait); until then c.dst holds garbage.
void pend(Mbarrier& m, BulkCopy c, uint64_t& count) {
  {
    const TsanScope shown(false);  // the kernel's own accesses
    if (c.src != nullptr) std::memcpy(c.seen.data(), c.src, c.seen.size());
    std::memset(c.dst, 0xff, c.seen.size());
  }
  tsan_release(m.tsan_sync.get());  // the issue (and what preceded it) precedes the completion
  m.copies.push_back(std::move(c));
  ++count;
}

void bulk_copy(void* dst, const void* src, size_t bytes, void* bar) {
  VK_HIDDEN;
  Fiber& f = running("a bulk copy");
  const Launch& L = *ts.launch;
  const BlockState& B = L.blocks[f.block];
  if (bytes == 0 || bytes % 16 != 0 || reinterpret_cast<uintptr_t>(dst) % 16 != 0 ||
      reinterpret_cast<uintptr_t>(src) % 16 != 0)
    throw KernelError(where(f) + ": a bulk copy of " + std::to_string(bytes) +
                      " bytes (a positive multiple of 16, both addresses 16-byte aligned)");
  if (!in_shared_memory(L, B, dst, bytes))
    throw KernelError(where(f) + ": a bulk copy to an address outside the block's shared memory");
  pend(mbarrier_of(f, bar, "a bulk copy completing"),
       {static_cast<unsigned char*>(dst), static_cast<const unsigned char*>(src),
        std::vector<unsigned char>(bytes)},
       launch_counts().bulk_copies);
}

void store_async(void* dst, const void* src, size_t bytes, void* bar) {
  VK_HIDDEN;
  Fiber& f = running("a store into another block's shared memory (st.async)");
  Launch& L = *ts.launch;
  if ((bytes != 4 && bytes != 8 && bytes != 16) || reinterpret_cast<uintptr_t>(dst) % bytes != 0)
    throw KernelError(where(f) + ": st.async stores 4, 8 or 16 bytes to an address aligned to "
                      "them, not " + std::to_string(bytes) + " bytes");
  BlockState* owner = nullptr;
  for (BlockState& b : L.blocks)
    if (in_shared_memory(L, b, bar, 8)) owner = &b;
  if (owner == nullptr)
    throw KernelError(where(f) + ": st.async completing on an mbarrier outside the shared memory "
                      "of the cluster's blocks");
  if (!in_shared_memory(L, *owner, dst, bytes))
    throw KernelError(where(f) + ": st.async into a block other than its mbarrier's");
  pend(mbarrier_of(f, bar, "a store completing", owner),
       {static_cast<unsigned char*>(dst), nullptr,
        std::vector<unsigned char>(static_cast<const unsigned char*>(src),
                                   static_cast<const unsigned char*>(src) + bytes)},
       launch_counts().async_stores);
}

void mbarrier_wait(void* bar, unsigned parity) {
  VK_HIDDEN;
  Fiber& f = running("an mbarrier wait");
  for (;;) {
    Mbarrier& m = mbarrier_of(f, bar, "a wait");
    if ((m.phase & 1u) != (parity & 1u)) break;  // that phase has completed
    int64_t issued = 0;
    for (const BulkCopy& c : m.copies) issued += int64_t(c.seen.size());
    if (m.pending == 0 && issued > m.tx)
      throw KernelError(where(f) + ": an mbarrier phase that expects " + std::to_string(m.tx) +
                        " bytes has bulk copies and st.async stores of " + std::to_string(issued) +
                        " bytes: on a GPU it would complete before some of them");
    if (m.pending == 0 && issued == m.tx) {  // every arrival and byte: the copies complete
      tsan_acquire(m.tsan_sync.get());  // after every issue and arrival
      for (const BulkCopy& c : m.copies) {
        bool changed;
        // (its destination holds the garbage of its issue, unless a store
        // or another copy wrote there since)
        const bool clobbered = std::any_of(c.dst, c.dst + c.seen.size(),
                                           [](unsigned char b) { return b != 0xff; });
        {
          const TsanScope shown(false);
          changed = c.src != nullptr && std::memcmp(c.seen.data(), c.src, c.seen.size()) != 0;
          if (!changed && !clobbered) std::memcpy(c.dst, c.seen.data(), c.seen.size());
        }
        if (changed)
          throw KernelError(where(f) + ": the source of a bulk copy changed before the copy "
                            "completed");
        if (clobbered)
          throw KernelError(where(f) + ": a store or a copy wrote into the destination of a "
                            "bulk copy or st.async before it completed");
      }
      m.copies.clear();
      tsan_release(m.tsan_sync.get());
      ++m.phase;
      m.pending = m.count;
      m.tx = 0;
      break;
    }
    yield();
  }
  tsan_acquire(mbarrier_of(f, bar, "a wait").tsan_sync.get());
}

void yield() {
  VK_HIDDEN;
  Fiber& f = running("vk_emu::yield");
  f.yielded = true;
  park(State::Ready);
}

uint64_t warp_op(WarpOp op, unsigned mask, uint64_t value, int arg, int width) {
  VK_HIDDEN;
  Fiber& f = running("a warp intrinsic");
  f.wop = op;
  f.wmask = mask;
  f.wvalue = value;
  f.warg = arg;
  f.wwidth = width;
  if (!(mask >> f.lane & 1u)) warp_fail(f, "the calling lane is not in the mask");
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0)
    warp_fail(f, "width must be a power of 2 in [1, 32], got " + std::to_string(width));
  // __syncwarp orders memory among its lanes (ThreadSanitizer); shuffles
  // and votes move values only, as in CUDA.
#ifdef VK_TSAN
  if (op == WarpOp::Sync) {
    WarpSync& w = warp_sync_of(f, mask);
    f.warp_sync = &w.sync.slots[w.crossings & 1];
    tsan_release(f.warp_sync);
  }
#endif
  f.state = State::Warp;
  try_complete_warp(f);
  if (f.state == State::Warp) park(State::Warp);
  else if (ts.launch->cancelling) throw Cancelled{};
  if (op == WarpOp::Sync) tsan_acquire(f.warp_sync);
  return f.wresult;
}

// ------------------------------------------------------------ tensor cores
// The deposits of every lane of the warp, lane by lane, once all 32 have made
// theirs (`bytes` each, at most 32) at the same instruction (`what`: every
// lane of the warp must give the same): valid until the warp's next
// intrinsic. The caller hides it from ThreadSanitizer (VK_HIDDEN).
const unsigned char* warp_gather(const void* mine, unsigned bytes, uint64_t what) {
  Fiber& f = running("a tensor-core instruction");
  f.wop = WarpOp::Gather;
  f.wmask = 0xffffffffu;
  f.wvalue = what;
  f.warg = int(bytes);
  f.wwidth = 32;
  std::memcpy(f.wblob, mine, bytes);
  f.state = State::Warp;
  try_complete_warp(f);
  if (f.state == State::Warp) park(State::Warp);
  else if (ts.launch->cancelling) throw Cancelled{};
  return ts.launch->blocks[f.block].gathered[f.warp].data();
}

// ldmatrix of `matrices` (4 or 2) 8x8 matrices: lane l gives row l % 8 of
// matrix l / 8 (lanes past 8 * matrices give none); register j of matrix j.
void ldmatrix(uint32_t* r, const void* row, int matrices) {
  bool gives;
  {
    VK_HIDDEN;  // (the executor's own state: which lane this is)
    gives = running("ldmatrix").lane < 8 * matrices;
    if (gives && reinterpret_cast<uintptr_t>(row) % 16 != 0)
      throw KernelError(where(running("ldmatrix")) +
                        ": ldmatrix needs 16-byte aligned row addresses");
  }
  unsigned char mine[16] = {};
  if (gives) std::memcpy(mine, row, 16);  // the lane's row, read by the lane (the sanitizers see it)
  VK_HIDDEN;
  Fiber& f = running("ldmatrix");
  const unsigned char* all = warp_gather(mine, 16, matrices == 4 ? 0 : 4);
  // Register j: of matrix j (the rows of lanes 8j .. 8j + 7), row lane / 4,
  // bytes 4 * (lane % 4) ..
  for (int j = 0; j < matrices; ++j)
    std::memcpy(&r[j], all + (j * 8 + f.lane / 4) * 16 + (f.lane % 4) * 4, 4);
}

void ldmatrix_x4(uint32_t* r, const void* row) { ldmatrix(r, row, 4); }
void ldmatrix_x2(uint32_t* r, const void* row) { ldmatrix(r, row, 2); }

namespace {
float half_bits_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h >> 15) << 31, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  float v;
  if (exp == 0) v = std::ldexp(float(man), -24);  // zero and subnormals
  else if (exp == 31) v = man ? std::numeric_limits<float>::quiet_NaN() : INFINITY;
  else v = std::ldexp(float(man | 0x400), int(exp) - 25);
  uint32_t b;
  std::memcpy(&b, &v, 4);
  b |= sign;
  std::memcpy(&v, &b, 4);
  return v;
}
float bits_to_float(uint32_t b) {
  float v;
  std::memcpy(&v, &b, 4);
  return v;
}
}  // namespace

void mma(MmaKind kind, float* d, const uint32_t* a, const uint32_t* b) {
  VK_HIDDEN;
  Fiber& f = running("mma");
  uint32_t mine[6] = {a[0], a[1], a[2], a[3], b[0], b[1]};
  const unsigned char* all = warp_gather(mine, sizeof(mine), 1 + uint64_t(kind));
  auto reg = [&](int lane, int i) {
    uint32_t v;
    std::memcpy(&v, all + lane * sizeof(mine) + i * 4, 4);
    return v;
  };
  // Element (row, col) of A and (k, n) of B as float, from the lanes and
  // registers that hold them (mma.h).
  auto a_at = [&](int row, int k) -> float {
    if (kind == MmaKind::TF32)
      return bits_to_float(reg((row % 8) * 4 + k % 4, row / 8 + 2 * (k / 4)) & 0xffffe000u);
    const uint32_t w = reg((row % 8) * 4 + (k % 8) / 2, row / 8 + 2 * (k / 8));
    const uint16_t h = uint16_t(k % 2 ? w >> 16 : w);
    return kind == MmaKind::BF16 ? bits_to_float(uint32_t(h) << 16) : half_bits_to_float(h);
  };
  auto b_at = [&](int k, int n) -> float {
    if (kind == MmaKind::TF32) return bits_to_float(reg(n * 4 + k % 4, 4 + k / 4) & 0xffffe000u);
    const uint32_t w = reg(n * 4 + (k % 8) / 2, 4 + k / 8);
    const uint16_t h = uint16_t(k % 2 ? w >> 16 : w);
    return kind == MmaKind::BF16 ? bits_to_float(uint32_t(h) << 16) : half_bits_to_float(h);
  };
  const int K = kind == MmaKind::TF32 ? 8 : 16, g = f.lane / 4, t = f.lane % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i / 2), col = 2 * t + i % 2;
    float s = d[i];
    for (int k = 0; k < K; ++k) s = std::fma(a_at(row, k), b_at(k, col), s);
    d[i] = s;
  }
}

float to_tf32(float v) {
  if (!std::isfinite(v)) return v;
  // to nearest, ties away from zero: add half of the dropped part's range, truncate
  uint32_t b;
  std::memcpy(&b, &v, 4);
  return bits_to_float((b + 0x1000u) & 0xffffe000u);
}

void* shared_array(const void* site, size_t bytes, size_t align) {
  VK_HIDDEN;
  Fiber& f = running("VK_SHARED");
  BlockState& B = ts.launch->blocks[f.block];
  for (SharedBuffer& s : B.shared) {
    if (s.site != site) continue;
    if (s.bytes != bytes)
      throw KernelError(where(f) + ": VK_SHARED array declared with " + std::to_string(bytes) +
                        " bytes here and " + std::to_string(s.bytes) + " by another thread");
    return s.data.get();
  }
  (void)align;  // new[] aligns to max_align_t
  size_t total = bytes;
  for (const SharedBuffer& s : B.shared) total += s.bytes;
  if (total + ts.launch->dynamic_smem > g_limits.max_shared_per_block)
    throw KernelError(where(f) + ": " + std::to_string(total + ts.launch->dynamic_smem) +
                      " bytes of shared memory in one block, at most " +
                      std::to_string(g_limits.max_shared_per_block));
  SharedBuffer& s = B.shared.emplace_back(SharedBuffer{site, bytes, nullptr});
  s.data.reset(new unsigned char[bytes == 0 ? 1 : bytes]);
  std::memset(s.data.get(), 0xff, bytes);  // garbage: NaN in every float type
  return s.data.get();
}

unsigned active_mask() {
  VK_HIDDEN;
  Fiber& f = running("__activemask");
  const Launch& L = *ts.launch;
  unsigned m = 0;
  const std::vector<int>& lanes = L.warp_lanes[size_t(f.block) * L.warps_per_block + f.warp];
  for (int l = 0; l < int(lanes.size()); ++l)
    if (L.fibers[lanes[l]].state != State::Done) m |= 1u << l;
  return m;
}

void* dynamic_shared(size_t align) {
  VK_HIDDEN;
  Fiber& f = running("VK_DYNAMIC_SHARED");
  (void)align;
  BlockState& B = ts.launch->blocks[f.block];
  return B.dynamic.get();
}

}  // namespace vk_emu
