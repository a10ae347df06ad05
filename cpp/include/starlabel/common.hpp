// Shared definitions of the starlabel compiled core: status codes, thread counts and
// cooperative cancellation. Header-only, no Python. Every kernel takes raw pointers and sizes
// and writes into caller-provided outputs; per-item failures are reported as status codes.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>
#include <utility>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace starlabel {

using index_t = std::int64_t;

// n values of T left uninitialized, for buffers that are written whole before they are read
// (std::vector zeroes them first: an extra pass over tens of MB per training call).
template <class T>
class Buffer {
 public:
  Buffer() = default;
  explicit Buffer(index_t n) : data_(new T[n]) {}
  T* data() { return data_.get(); }
  const T* data() const { return data_.get(); }

 private:
  std::unique_ptr<T[]> data_;
};

// Uninitialized storage that only grows: at_least(n) returns room for n values, reallocating
// (contents lost) only when n exceeds what it holds.
template <class T>
class GrowingBuffer {
 public:
  T* at_least(index_t n) {
    if (n > size_) {
      data_ = Buffer<T>(n);
      size_ = n;
    }
    return data_.data();
  }

 private:
  Buffer<T> data_;
  index_t size_ = 0;
};

// Outcome of one spectrum's label fit. Mirrored by starlabel.status.FitStatus.
enum FitStatus : std::int8_t {
  FIT_CONVERGED = 0,       // relative chi2 decrease (or step) below tolerance
  FIT_MAX_ITER = 1,        // iteration limit reached before convergence
  FIT_NO_PIXELS = 2,       // fewer usable pixels than free parameters
  FIT_NON_FINITE = 3,      // the model or chi2 is not finite at every starting point
};

// Outcome of training one pixel. Mirrored by starlabel.status.PixelStatus.
enum PixelStatus : std::int8_t {
  PIXEL_OK = 0,
  PIXEL_TOO_FEW_STARS = 1,   // fewer stars with ivar > 0 than free terms
  PIXEL_SINGULAR = 2,        // normal equations singular or too ill-conditioned, or w r^2 overflows
  PIXEL_NOT_CONVERGED = 3     // s2 or L1 iterations hit their limit (theta, s2 usable but not final)
};

// A matrix an emulator keeps in one of two precisions (exactly one pointer is set): a float32
// network's Jacobian in float32 (its products are float32), any other in T.
template <class T>
struct EitherPrecision {
  const T* values = nullptr;
  const float* values_f32 = nullptr;
};

// Number of threads for a kernel: n_threads <= 0 means the OpenMP default
// (OMP_NUM_THREADS, omp_set_num_threads or threadpoolctl's limit).
inline int resolve_threads(int n_threads) {
#ifdef _OPENMP
  return n_threads > 0 ? n_threads : omp_get_max_threads();
#else
  (void)n_threads;
  return 1;
#endif
}

// Cooperative cancellation of a long kernel (Ctrl-C in Python), without Python in the kernel.
//
// The caller supplies `poll`, a function that says whether to stop (the bindings check
// Python's signal handlers in it). `poll` runs only on the thread that constructed the
// Interrupt, which is the thread that calls the kernel and so OpenMP's master thread of the
// kernel's parallel region: the poll may need that thread's own state (the Python thread
// state). Other threads only read an atomic flag. Kernels call check() between units of work
// (pixel blocks, star tiles, batches) and skip the remaining units once it returns true;
// their outputs are then incomplete and the caller must discard them.
//
// In a kernel:     if (interrupted(interrupt)) continue;     // interrupt: Interrupt* or null
// Polls are rate-limited (every `interval`), so check() is cheap enough for inner loops.
class Interrupt {
 public:
  using Poll = std::function<bool()>;

  Interrupt() = default;  // never interrupts unless request() is called
  explicit Interrupt(Poll poll, std::chrono::milliseconds interval = std::chrono::milliseconds(20))
      : poll_(std::move(poll)), owner_(std::this_thread::get_id()), interval_(interval) {}
  Interrupt(const Interrupt&) = delete;
  Interrupt& operator=(const Interrupt&) = delete;

  // Whether the kernel should stop. Any thread; on the owner thread it also polls.
  bool check() {
    if (requested()) return true;
    if (!poll_ || std::this_thread::get_id() != owner_) return false;
    const auto now = std::chrono::steady_clock::now();
    if (polled_ && now - last_poll_ < interval_) return false;
    polled_ = true;
    last_poll_ = now;
    if (poll_()) request();
    return requested();
  }

  // Whether a stop was requested, without polling. Any thread.
  bool requested() const { return flag_.load(std::memory_order_relaxed); }

  // Ask running kernels to stop (any thread).
  void request() { flag_.store(true, std::memory_order_relaxed); }

 private:
  Poll poll_;
  std::thread::id owner_;
  std::chrono::milliseconds interval_{20};
  std::chrono::steady_clock::time_point last_poll_{};   // owner thread only
  bool polled_ = false;                                  // owner thread only
  std::atomic<bool> flag_{false};
};

// check() through a pointer that kernels take with a null default (no cancellation).
inline bool interrupted(Interrupt* interrupt) { return interrupt != nullptr && interrupt->check(); }
inline bool stop_requested(const Interrupt* interrupt) {
  return interrupt != nullptr && interrupt->requested();
}

}  // namespace starlabel
