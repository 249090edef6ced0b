// Work sharing on XLA's intra-op thread pool for the native CPU kernels
// (conv_cpu.cc, dense_cpu.cc). Header-only; each kernel file includes it.
#ifndef CNN_JAX_OPS_CSRC_PARALLEL_H_
#define CNN_JAX_OPS_CSRC_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace cnn_native {

namespace ffi = xla::ffi;

// ---------------------------------------------------------------------------
// Work sharing on XLA's pool: the caller takes part, so a busy pool only costs
// parallelism, never progress (a task that starts after all items are claimed
// returns without touching the caller's data).
// ---------------------------------------------------------------------------
struct SharedWork {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::atomic<int> workers{0};
  int64_t count = 0;
  std::function<void(int64_t item, int worker)> fn;
};

inline void RunItems(SharedWork* w) {
  int worker = -1;
  for (;;) {
    int64_t item = w->next.fetch_add(1, std::memory_order_relaxed);
    if (item >= w->count) return;
    if (worker < 0) worker = w->workers.fetch_add(1, std::memory_order_relaxed);
    w->fn(item, worker);
    w->done.fetch_add(1, std::memory_order_release);
  }
}

// Runs fn(item, worker) for item in [0, count); worker ids are < max_workers.
inline void ParallelFor(ffi::ThreadPool& pool, int64_t count, int max_workers,
                 std::function<void(int64_t, int)> fn) {
  auto work = std::make_shared<SharedWork>();
  work->count = count;
  work->fn = std::move(fn);
  int helpers = std::min<int64_t>(max_workers - 1, count - 1);
  for (int t = 0; t < helpers; ++t) {
    pool.Schedule([work]() { RunItems(work.get()); });
  }
  RunItems(work.get());
  while (work->done.load(std::memory_order_acquire) < count) {
    std::this_thread::yield();
  }
}

inline int NumWorkers(ffi::ThreadPool& pool) {
  int64_t n = pool.num_threads();
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(n, 64)));
}

}  // namespace cnn_native

#endif  // CNN_JAX_OPS_CSRC_PARALLEL_H_
