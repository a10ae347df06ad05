// A batched dense multilayer perceptron (The Payne's emulator): forward pass, Jacobian of the
// outputs with respect to the inputs, and the loss gradients with respect to every weight.
//
// Layout (as The Payne and PyTorch store them): layer l has weights W_l (n_out_l, n_in_l)
// row-major ("out x in") and biases b_l (n_out_l,). Hidden layers apply an activation g;
// the last layer is linear:
//     a_0 = x,   a_{l+1} = g(W_l a_l + b_l) (hidden),   y = W_{L-1} a_{L-1} + b_{L-1}.
// Batches are row-major (n_stars, width): a layer is the matrix product A W^T, so every
// product is a matrix-matrix product (Eigen's GEMM, single-threaded inside each thread).
//
// Determinism: every product is cut into tiles of a fixed shape (independent of the number
// of threads) and each tile is computed by one thread with the full inner dimension, so the
// result of every element does not depend on the thread count. Bias, activation and its
// derivative are applied to a tile right after its product, while it is in cache.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <new>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "affine_kernel.hpp"
#include "common.hpp"
#include "gemm.hpp"

namespace starlabel {

// Hidden-layer activations. Mirrored by starlabel.payne_io.ACTIVATIONS.
enum Activation : std::int32_t {
  ACT_LEAKY_RELU = 0,  // z > 0 ? z : slope * z   (The Payne: slope 0.01)
  ACT_RELU = 1,
  ACT_SIGMOID = 2,
  ACT_TANH = 3,
  ACT_SOFTPLUS = 4,    // log(1 + exp(z)), computed stably
  ACT_SILU = 5,        // z * sigmoid(z)
  ACT_COUNT = 6
};

namespace mlp_detail {

template <class T>
using RowMat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class T>
using Map = Eigen::Map<RowMat<T>, 0, Eigen::OuterStride<>>;
template <class T>
using CMap = Eigen::Map<const RowMat<T>, 0, Eigen::OuterStride<>>;

template <class T>
inline Map<T> map(T* p, index_t rows, index_t cols, index_t ld) {
  return Map<T>(p, rows, cols, Eigen::OuterStride<>(ld));
}
template <class T>
inline CMap<T> cmap(const T* p, index_t rows, index_t cols, index_t ld) {
  return CMap<T>(p, rows, cols, Eigen::OuterStride<>(ld));
}

template <class T>
inline T sigmoid(T z) {
  return T(1) / (T(1) + std::exp(-z));
}

// false for NaN and +-inf; a comparison rather than std::isfinite, so that the loops that
// use it still vectorize
template <class T>
inline bool is_finite_value(T v) {
  return std::abs(v) <= std::numeric_limits<T>::max();
}

// z (rows x cols, leading dimension ld) <- g(z + bias); deriv (same layout, ld_d) <- g'(z + bias)
// when not null. One switch per tile, a tight loop per activation. Returns whether every
// z + bias is finite: a NaN or inf weight, bias or input makes its unit's pre-activation
// non-finite for every star, even where a saturating activation (sigmoid, tanh) would hide it.
template <class T>
bool bias_activation(T* z, index_t ld, index_t rows, index_t cols, const T* bias, Activation act,
                     T slope, T* deriv, index_t ld_d) {
  int bad = 0;  // an integer OR: the loops still vectorize without reassociating floats
  for (index_t r = 0; r < rows; ++r) {
    T* zr = z + r * ld;
    T* dr = deriv ? deriv + r * ld_d : nullptr;
    switch (act) {
      case ACT_LEAKY_RELU:
      case ACT_RELU: {
        const T s = act == ACT_RELU ? T(0) : slope;
        for (index_t c = 0; c < cols; ++c) {
          const T v = zr[c] + bias[c];
          bad |= !is_finite_value(v);
          zr[c] = v > T(0) ? v : s * v;
          if (dr) dr[c] = v > T(0) ? T(1) : s;
        }
        break;
      }
      case ACT_SIGMOID:
        for (index_t c = 0; c < cols; ++c) {
          const T v = zr[c] + bias[c];
          bad |= !is_finite_value(v);
          const T a = sigmoid(v);
          zr[c] = a;
          if (dr) dr[c] = a * (T(1) - a);
        }
        break;
      case ACT_TANH:
        for (index_t c = 0; c < cols; ++c) {
          const T v = zr[c] + bias[c];
          bad |= !is_finite_value(v);
          const T a = std::tanh(v);
          zr[c] = a;
          if (dr) dr[c] = T(1) - a * a;
        }
        break;
      case ACT_SOFTPLUS:
        for (index_t c = 0; c < cols; ++c) {
          const T v = zr[c] + bias[c];
          bad |= !is_finite_value(v);
          zr[c] = std::max(v, T(0)) + std::log1p(std::exp(-std::abs(v)));
          if (dr) dr[c] = sigmoid(v);
        }
        break;
      case ACT_SILU:
      default:
        for (index_t c = 0; c < cols; ++c) {
          const T v = zr[c] + bias[c];
          bad |= !is_finite_value(v);
          const T s = sigmoid(v);
          zr[c] = v * s;
          if (dr) dr[c] = s * (T(1) + v * (T(1) - s));
        }
        break;
    }
  }
  return !bad;
}

inline index_t n_blocks(index_t n, index_t block) { return (n + block - 1) / block; }

// Whether the last layer's weights are packed once for all the star tiles of n_rows
// (PackedMatrix, PackedWeights) rather than by each tile's product. Packing ahead pays when
// every block of weights serves several tiles (forward pass, 4096 stars: ~10% faster;
// training step, batch 512: ~10%). With one or two tiles, packing each block just before
// its product, while it is in cache, is faster (forward pass, 16 stars: 0.64 against 0.84
// ms, with Eigen's product).
inline bool pack_ahead(index_t n_rows, index_t tile) { return n_blocks(n_rows, tile) >= 4; }

inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// Threads worth starting for `flops` of work split into barrier-separated tiles: tiny networks
// run on one thread (a barrier costs more than their whole step, and far more when the
// machine is oversubscribed). Never changes results: tiles do not depend on the thread count.
inline int useful_threads(int n_threads, double flops) {
  const int nt = resolve_threads(n_threads);
  return static_cast<int>(std::max(1.0, std::min(double(nt), flops / 2e7)));
}

inline double layer_flops(const std::vector<index_t>& sizes, index_t rows) {
  double f = 0.0;
  for (std::size_t l = 0; l + 1 < sizes.size(); ++l) f += 2.0 * double(rows) * sizes[l] * sizes[l + 1];
  return f;
}

}  // namespace mlp_detail

// A network, read-only. sizes has n_layers + 1 entries: sizes[0] inputs, sizes[n_layers] outputs.
template <class T>
struct MLP {
  std::vector<const T*> weights;  // layer l: (sizes[l + 1], sizes[l]) row-major
  std::vector<const T*> biases;   // layer l: (sizes[l + 1],)
  std::vector<index_t> sizes;
  Activation activation = ACT_LEAKY_RELU;
  T slope = T(0.01);
  // Optional, for T = double: the last layer's weights in float32 (a float32 network's own
  // values, widened to double in `weights`). When set, the Jacobian's product J = W M, which
  // is nearly all of its cost, runs in float32 on M rounded to float; everything else stays
  // in double. Label fitting with a float32 network uses it: J only steers the steps and
  // sets the covariance, where float32's ~1e-6 relative error is far below what matters.
  const float* last_weights_f32 = nullptr;
  // Optional: the last layer's weights packed once by a caller that evaluates the network
  // many times (an LM fit), in blocks that then set mlp_forward's pixel block.
  const PackedMatrix<T, Eigen::RowMajor>* packed_last = nullptr;
  // Optional, with last_weights_f32: those weights packed once the same way, for the
  // Jacobian updates' products (jacobian_memory.hpp).
  const PackedMatrix<float, Eigen::RowMajor>* packed_last_f32 = nullptr;
  // Optional: the last layer's weights transposed, (H, n_out) row-major, for such a caller's
  // Jacobian updates (jacobian_memory.hpp), which read a few of its columns whole.
  const T* last_weights_t = nullptr;

  int n_layers() const { return static_cast<int>(weights.size()); }
  index_t n_in() const { return sizes.front(); }
  index_t n_out() const { return sizes.back(); }
};

// Tile shapes. Fixed numbers, never derived from the thread count.
struct MLPBlocking {
  index_t star_block = 128;   // stars per tile of the forward pass
  index_t pixel_block = 512;  // outputs per tile of the last layer
  index_t jac_columns = 256;  // Jacobian: stars per tile = max(1, jac_columns / n_in)
  index_t chunk_tiles = 8;    // star tiles whose hidden layers are held at once
};

// mlp_forward's buffers, one set per calling thread, kept between calls: an LM fit calls it
// every iteration, and buffers of megabytes allocated per call are fresh pages to fault in
// wherever glibc returns freed memory at once (Dask workers: MALLOC_TRIM_THRESHOLD_). Their
// size is bounded by the blocking's chunk, not by the number of stars, plus one copy of the
// last layer's weights once a call has packed them (8.7 MB for The Payne's float32 network).
template <class T>
struct ForwardScratch {
  GrowingBuffer<T> hidden, mcat, scratch;
  GrowingBuffer<float> mcat_f32, scratch_f32;
  PackedMatrix<T, Eigen::RowMajor> last;  // the last layer's weights, when a call packs them
  PackedWeights<T> last_affine;           // the same, for the forward pass without Jacobian
};

// Forward pass (and optionally the Jacobian) for n_stars input vectors.
//   x        (n_stars, n_in)
//   out      (n_stars, n_out)
//   jac_out  (n_stars, n_out, n_in) d out / d x, or null
// Stars are processed in chunks; in each chunk the hidden layers run per star tile (and
// build M_s = D W ... D W_0, the (width, n_in) Jacobian of the last hidden layer, side by
// side for the tile's stars), then the last layer runs on (star tile x output block) tiles:
// out = A W^T + b and J = W M, one GEMM each (J in float32 when net.last_weights_f32 is set).
// interrupt (or null): when it fires, the remaining tiles are skipped (out is incomplete).
// Returns whether every hidden pre-activation and every output is finite (checked in passes
// that touch them anyway). False when a weight or bias is NaN or inf, so a caller can check
// the network only then instead of reading all of it on every call; also when a value
// overflowed.
template <class T>
bool mlp_forward(const MLP<T>& net, const T* x, index_t n_stars, T* out, T* jac_out,
                 int n_threads, const MLPBlocking& blocking = MLPBlocking(),
                 Interrupt* interrupt = nullptr) {
  using namespace mlp_detail;
  if (n_stars <= 0) return true;
  const int L = net.n_layers();
  const index_t n_in = net.n_in(), n_out = net.n_out(), H = net.sizes[L - 1];
  // widest layer held in the per-tile buffers: the inputs and hidden layers, never the output
  const index_t W = *std::max_element(net.sizes.begin(), net.sizes.end() - 1);
  const bool want_jac = jac_out != nullptr;
  const bool jac_f32 = want_jac && net.last_weights_f32 != nullptr;
  if (jac_f32 && !std::is_same_v<T, double>)
    throw std::invalid_argument("last_weights_f32 is for a network evaluated in double");
  const index_t sb = std::min(n_stars, want_jac ? std::max<index_t>(1, blocking.jac_columns / n_in)
                                                : blocking.star_block);
  // a call with few stars (one LM batch) allocates for those stars only
  const index_t chunk = std::min(sb * blocking.chunk_tiles, n_blocks(n_stars, sb) * sb);
  // Without the Jacobian, the last layer runs through affine_product (bias and finiteness
  // check fused), in output blocks of whole panels, once a call has enough stars to pay for
  // packing the weights its own way (The Payne's network, 1 thread: 32 stars 0.94 against
  // 0.80 ms with Eigen's product, 64 stars 1.47 against 1.52, 256 stars 5.7 against 6.1);
  // not with a caller's packed weights (an LM fit: its trial steps keep the values its fits
  // were measured with).
  constexpr index_t panel = AffineTile<T>::kOutputs;
  const bool affine = !want_jac && !net.packed_last && n_stars >= 64;
  const index_t pb = net.packed_last ? net.packed_last->block()
                     : affine        ? n_blocks(blocking.pixel_block, panel) * panel
                                     : blocking.pixel_block;
  const index_t n_pb = n_blocks(n_out, pb);
  const int nt = useful_threads(
      n_threads, layer_flops(net.sizes, n_stars) * (want_jac ? double(n_in) : 1.0));

  // Shared per chunk: the last hidden layer (chunk, H) and M side by side (H, n_in * chunk).
  // Per thread: two activation buffers, a derivative buffer, two M buffers, a J tile (in
  // float32 instead when J is). Kept by the calling thread from call to call (see
  // ForwardScratch); every element is written before it is read.
  const index_t act_size = sb * W, m_size = want_jac ? W * n_in * sb : 0;
  const index_t jt_size = want_jac ? pb * n_in * sb : 0;
  const index_t per_thread = 3 * act_size + 2 * m_size + (jac_f32 ? 0 : jt_size);
  thread_local ForwardScratch<T> kept;
  T* hidden = kept.hidden.at_least(chunk * H);
  T* mcat = kept.mcat.at_least(want_jac ? H * n_in * chunk : 0);
  float* mcat_f32 = kept.mcat_f32.at_least(jac_f32 ? H * n_in * chunk : 0);
  T* scratch = kept.scratch.at_least(per_thread * nt);
  float* scratch_f32 = kept.scratch_f32.at_least(jac_f32 ? jt_size * nt : 0);
  // the calling thread's buffer (`kept` is thread-local: named here, not in the parallel region)
  const bool ahead = !net.packed_last && pack_ahead(n_stars, sb);
  PackedMatrix<T, Eigen::RowMajor>* to_pack = ahead && !affine ? &kept.last : nullptr;
  if (to_pack) to_pack->reset(n_out, H, pb, sb);
  const PackedMatrix<T, Eigen::RowMajor>* packed = net.packed_last ? net.packed_last : to_pack;
  PackedWeights<T>* affine_ahead = ahead && affine ? &kept.last_affine : nullptr;
  if (affine_ahead) affine_ahead->reset(0, n_out, H);
  std::atomic<bool> failed{false}, non_finite{false};

#pragma omp parallel num_threads(nt)
  {
    // once per call, rather than once per star tile and pixel block
    if (to_pack) to_pack->pack(net.weights[L - 1], H);
    if (affine_ahead) affine_ahead->pack(net.weights[L - 1], H);
    bool finite = true;
    const int tid = thread_id();
    T* buf0 = scratch + per_thread * tid;
    T* buf1 = buf0 + act_size;
    T* dbuf = buf1 + act_size;
    T* m0 = dbuf + act_size;
    T* m1 = m0 + m_size;
    T* jt = m1 + m_size;
    float* jt_f32 = jac_f32 ? scratch_f32 + jt_size * tid : nullptr;
    for (index_t c0 = 0; c0 < n_stars; c0 += chunk) {
      const index_t nc = std::min(chunk, n_stars - c0), n_sub = n_blocks(nc, sb);
      const index_t mld = n_in * nc;  // leading dimension of mcat in this chunk
#pragma omp for schedule(static)
      for (index_t sub = 0; sub < n_sub; ++sub) {
        if (failed || interrupted(interrupt)) continue;
        try {
          const index_t s0 = c0 + sub * sb, ns = std::min(sb, n_stars - s0);
          const T* a = x + s0 * n_in;
          index_t width = n_in;
          T* cur = buf0;
          T* nxt = buf1;
          T* m_cur = m0;
          T* m_nxt = m1;
          for (int l = 0; l + 1 < L; ++l) {
            const index_t wo = net.sizes[l + 1];
            T* z = (l + 2 == L) ? hidden + (s0 - c0) * H : nxt;
            assign_product(map(z, ns, wo, wo), cmap(a, ns, width, width),
                           cmap(net.weights[l], wo, width, width).transpose());
            finite &= bias_activation(z, wo, ns, wo, net.biases[l], net.activation, net.slope,
                                      want_jac ? dbuf : nullptr, wo);
            if (want_jac) {
              // M_new (wo, n_in * ns): star s in columns [s n_in, (s + 1) n_in)
              const bool last = l + 2 == L;
              T* mdst = last ? mcat + (s0 - c0) * n_in : m_nxt;
              const index_t ld = last ? mld : n_in * ns;
              auto mnew = map(mdst, wo, n_in * ns, ld);
              if (l == 0) {
                auto w0 = cmap(net.weights[0], wo, n_in, n_in);
                for (index_t s = 0; s < ns; ++s) mnew.middleCols(s * n_in, n_in) = w0;
              } else {
                assign_product(mnew, cmap(net.weights[l], wo, width, width),
                               cmap(m_cur, width, n_in * ns, n_in * ns));
              }
              for (index_t h = 0; h < wo; ++h) {
                T* row = mdst + h * ld;
                for (index_t s = 0; s < ns; ++s) {
                  const T d = dbuf[s * wo + h];
                  for (index_t k = 0; k < n_in; ++k) row[s * n_in + k] *= d;
                }
              }
              std::swap(m_cur, m_nxt);
            }
            a = z;
            width = wo;
            std::swap(cur, nxt);
          }
          if (L == 1) {  // no hidden layer: the "last hidden layer" is x itself, M = identity
            map(hidden + (s0 - c0) * H, ns, H, H) = cmap(x + s0 * n_in, ns, n_in, n_in);
            if (want_jac) {
              auto m = map(mcat + (s0 - c0) * n_in, n_in, n_in * ns, mld);
              m.setZero();
              for (index_t s = 0; s < ns; ++s)
                m.middleCols(s * n_in, n_in).setIdentity();
            }
          }
          if (jac_f32)  // this tile's columns of M, rounded once for every output block
            map(mcat_f32 + (s0 - c0) * n_in, H, n_in * ns, mld) =
                cmap(mcat + (s0 - c0) * n_in, H, n_in * ns, mld).template cast<float>();
        } catch (...) {
          failed = true;
        }
      }
      // The last (linear) layer on (stars x output block) tiles: star tiles of sb with the
      // Jacobian (the tile's M) or with the weights packed ahead (the tile's activations stay
      // in cache); otherwise the chunk's few star tiles in one product per output block, so
      // that Eigen packs each block of weights once, not once per star tile (forward pass,
      // 256 stars, 1 thread: 7.3 against 8.5 ms; that packing was 15% of the time).
      const T* wl = net.weights[L - 1];
      const T* bl = net.biases[L - 1];
      const bool by_chunk = !want_jac && !packed && !affine_ahead;
      const index_t tile_stars = by_chunk ? nc : sb;
      const index_t n_tiles = n_blocks(nc, tile_stars);
      auto last_layer_tile = [&](index_t t) {
        if (failed || interrupted(interrupt)) return;
        try {
          const index_t sub = t / n_pb, p0 = (t % n_pb) * pb, np = std::min(pb, n_out - p0);
          const index_t s0 = c0 + sub * tile_stars, ns = std::min(tile_stars, n_stars - s0);
          if (affine) {
            T* o = out + s0 * n_out + p0;
            const T* a = hidden + (s0 - c0) * H;
            finite &= affine_ahead
                          ? affine_product(o, n_out, a, H, ns, *affine_ahead, p0, np, bl + p0)
                          : affine_product(o, n_out, a, H, ns, wl, H, H, p0, np, bl + p0);
            return;
          }
          // out = b + hidden W^T: the product accumulates onto the bias (the same value as
          // adding the bias after it, one pass fewer)
          for (index_t s = 0; s < ns; ++s)
            std::copy(bl + p0, bl + p0 + np, out + (s0 + s) * n_out + p0);
          const T* a = hidden + (s0 - c0) * H;
          if (packed)
            packed->add_product(out + s0 * n_out + p0, n_out, a, H, ns, p0);
          else
            add_product(map(out + s0 * n_out + p0, ns, np, n_out), cmap(a, ns, H, H),
                        cmap(wl + p0 * H, np, H, H).transpose());
          int bad = 0;
          for (index_t s = 0; s < ns; ++s) {
            const T* row = out + (s0 + s) * n_out + p0;
            for (index_t p = 0; p < np; ++p) bad |= !is_finite_value(row[p]);
          }
          finite &= !bad;
          if (!want_jac) return;
          const index_t nk = n_in * ns;
          auto scatter = [&](const auto* tile) {  // tile (np, nk) -> each star's (np, n_in)
            for (index_t s = 0; s < ns; ++s) {
              T* dst = jac_out + ((s0 + s) * n_out + p0) * n_in;
              for (index_t p = 0; p < np; ++p)
                std::copy(tile + p * nk + s * n_in, tile + p * nk + (s + 1) * n_in, dst + p * n_in);
            }
          };
          if (jac_f32) {
            assign_product(map(jt_f32, np, nk, nk), cmap(net.last_weights_f32 + p0 * H, np, H, H),
                           cmap(mcat_f32 + (s0 - c0) * n_in, H, nk, mld));
            scatter(jt_f32);
          } else {
            assign_product(map(jt, np, nk, nk), cmap(wl + p0 * H, np, H, H),
                           cmap(mcat + (s0 - c0) * n_in, H, nk, mld));
            scatter(jt);
          }
        } catch (...) {
          failed = true;
        }
      };
      if (by_chunk) {  // one tile per output block, the last one smaller: handed out as
                       // threads free up (a static split of 15 blocks gave one thread 57%)
#pragma omp for schedule(dynamic, 1)
        for (index_t t = 0; t < n_tiles * n_pb; ++t) last_layer_tile(t);
      } else {
#pragma omp for schedule(static)
        for (index_t t = 0; t < n_tiles * n_pb; ++t) last_layer_tile(t);
      }
    }
    if (!finite) non_finite = true;
  }
  if (failed) throw std::bad_alloc();
  return !non_finite;
}

// ---------------------------------------------------------------------------------------
// Training: loss, gradients, optimizers.

enum Loss : std::int32_t { LOSS_L1 = 0, LOSS_L2 = 1 };
enum Optimizer : std::int32_t { OPT_ADAM = 0, OPT_ADAMW = 1, OPT_RADAM = 2 };

// A network being trained: mutable weights and biases, same layout as MLP.
template <class T>
struct MLPParams {
  std::vector<T*> weights, biases;
  std::vector<index_t> sizes;
  Activation activation = ACT_LEAKY_RELU;
  T slope = T(0.01);

  int n_layers() const { return static_cast<int>(weights.size()); }
  index_t weight_size(int l) const { return sizes[l + 1] * sizes[l]; }
};

struct TrainBlocking {
  index_t star_block = 64;   // batch rows per tile
  index_t out_block = 528;   // output columns per tile: whole panels of affine_product's
                             // kernel (48, 24, 12 or 6 outputs, by instruction set and type)
  index_t grad_block = 256;  // output rows per tile of the weight gradients (the last layer's
                             // 7214 give 29 tiles: even work for 2 threads)
  index_t in_block = 512;    // input columns per tile of the weight gradients / delta
  index_t param_chunk = 16384;
};

// Scratch of one batch size: activations, activation derivatives, deltas, gradients.
template <class T>
struct MLPWorkspace {
  std::vector<std::vector<T>> acts;    // acts[l]: (B, sizes[l]) input of layer l
  std::vector<std::vector<T>> derivs;  // derivs[l]: (B, sizes[l]) g'(z) of hidden layer l-1
  Buffer<T> out;                       // (B, n_out): model, then d loss / d out
  std::vector<T> delta0, delta1;       // (B, max hidden width)
  std::vector<double> tile_loss;
  // the last layer's weights, packed once per step for the forward product (as W) and for
  // the delta product below it (as W^T), instead of once per star tile in each
  PackedWeights<T> last_forward;
  PackedMatrix<T, Eigen::ColMajor> last_backward;
  index_t capacity = 0;

  void reserve(const std::vector<index_t>& sizes, index_t batch, const TrainBlocking& tb) {
    const int L = static_cast<int>(sizes.size()) - 1;
    acts.resize(L);
    derivs.resize(L);
    for (int l = 0; l < L; ++l) {
      acts[l].resize(batch * sizes[l]);
      derivs[l].resize(l > 0 ? batch * sizes[l] : 0);
    }
    out = Buffer<T>(batch * sizes[L]);
    // the last layer's delta lives in `out`: these hold the hidden layers' only
    const index_t w = L > 1 ? *std::max_element(sizes.begin() + 1, sizes.end() - 1) : 0;
    delta0.resize(batch * w);
    delta1.resize(batch * w);
    tile_loss.resize(mlp_detail::n_blocks(batch, tb.star_block) *
                     mlp_detail::n_blocks(sizes[L], tb.out_block));
    if (mlp_detail::pack_ahead(batch, tb.star_block)) {
      last_forward.reset(0, sizes[L], sizes[L - 1]);
      last_backward.reset(sizes[L - 1], sizes[L], tb.in_block, tb.star_block);
    }
    capacity = batch;
  }
};

// Gradient storage of a whole network (same shapes as the parameters).
template <class T>
struct MLPGradients {
  std::vector<T*> weights, biases;
};

namespace mlp_detail {
// The loop of loss_and_gradient, once per (loss, weighting, bias): each instance is a plain
// loop that vectorizes (with a runtime choice inside, GCC kept only a scalar loop).
template <Loss kind, bool add_bias, class T, class Weight>
T loss_row(T* y, const T* bias, const T* target, Weight weight, index_t n, T scale) {
  T row = T(0);
#pragma omp simd reduction(+ : row)
  for (index_t p = 0; p < n; ++p) {
    T r;
    if constexpr (add_bias)
      r = y[p] + bias[p] - target[p];
    else
      r = y[p] - target[p];
    const T w = weight(p);
    if constexpr (kind == LOSS_L1) {
      row += w * std::abs(r);
      y[p] = w * scale * (T(r > T(0)) - T(r < T(0)));
    } else {
      row += w * r * r;
      y[p] = T(2) * w * r * scale;
    }
  }
  return row;
}
}  // namespace mlp_detail

// One row of the last layer: r = y + bias - target; returns sum_p w_p |r_p| (L1) or
// sum_p w_p r_p^2 (L2) and overwrites y with d loss / d y = scale * (w sign(r) or 2 w r).
//   y, bias, target, pixel_weights (n,) (pixel_weights null: all 1; bias null: y has it)
// The sum is accumulated in T within the row (at most a tile's out_block values, all >= 0)
// and in double across rows.
template <class T>
double loss_and_gradient(Loss loss, T* y, const T* bias, const T* target,
                         const T* pixel_weights, index_t n, T scale) {
  using mlp_detail::loss_row;
  const auto weighted = [pixel_weights](index_t p) { return pixel_weights[p]; };
  const auto unweighted = [](index_t) { return T(1); };
  const auto by_weighting = [&](auto with_bias) {
    constexpr bool b = decltype(with_bias)::value;
    if (loss == LOSS_L1)
      return pixel_weights ? loss_row<LOSS_L1, b>(y, bias, target, weighted, n, scale)
                           : loss_row<LOSS_L1, b>(y, bias, target, unweighted, n, scale);
    return pixel_weights ? loss_row<LOSS_L2, b>(y, bias, target, weighted, n, scale)
                         : loss_row<LOSS_L2, b>(y, bias, target, unweighted, n, scale);
  };
  return bias ? by_weighting(std::true_type()) : by_weighting(std::false_type());
}

// Forward pass, loss and backward pass for one batch, run by every thread of an enclosing
// parallel region (orphaned worksharing loops). acts[0] must hold the batch's inputs.
//   target         (B, n_out)
//   pixel_weights  (n_out,) or null
// loss = mean over the batch and outputs of w_p |r| (L1) or w_p r^2 (L2), r = y - target.
// Writes the gradients into grads and returns the loss through loss_out (set by one thread;
// visible to all after the loop's barrier). failed is set on any exception. Once interrupt
// fires the remaining tiles are skipped and the gradients are incomplete.
template <class T>
void mlp_loss_backward_in_region(const MLPParams<T>& net, MLPWorkspace<T>& ws, index_t B,
                                 const T* target, const T* pixel_weights, Loss loss,
                                 const MLPGradients<T>& grads, double& loss_out,
                                 std::atomic<bool>& failed, const TrainBlocking& tb,
                                 Interrupt* interrupt = nullptr) {
  using namespace mlp_detail;
  const int L = net.n_layers();
  const index_t n_out = net.sizes[L];
  const index_t n_sb = n_blocks(B, tb.star_block);
  const bool packed = pack_ahead(B, tb.star_block);  // (then also for ws's capacity)
  if (packed) {
    ws.last_forward.pack(net.weights[L - 1], net.sizes[L - 1]);
    ws.last_backward.pack(net.weights[L - 1], net.sizes[L - 1]);
  }
  // forward
  for (int l = 0; l < L; ++l) {
    const index_t wi = net.sizes[l], wo = net.sizes[l + 1];
    const bool last = l + 1 == L;
    T* dst = last ? ws.out.data() : ws.acts[l + 1].data();
    const index_t n_ob = n_blocks(wo, tb.out_block);
#pragma omp for schedule(static)
    for (index_t t = 0; t < n_sb * n_ob; ++t) {
      if (failed || interrupted(interrupt)) continue;
      try {
        const index_t s0 = (t / n_ob) * tb.star_block, ns = std::min(tb.star_block, B - s0);
        const index_t o0 = (t % n_ob) * tb.out_block, no = std::min(tb.out_block, wo - o0);
        if (last && packed) {  // with the bias
          affine_product(dst + s0 * wo + o0, wo, ws.acts[l].data() + s0 * wi, wi, ns,
                         ws.last_forward, o0, no, net.biases[l] + o0);
        } else {
          assign_product(map(dst + s0 * wo + o0, ns, no, wo),
                         cmap(ws.acts[l].data() + s0 * wi, ns, wi, wi),
                         cmap(net.weights[l] + o0 * wi, no, wi, wi).transpose());
        }
        if (!last) {
          bias_activation(dst + s0 * wo + o0, wo, ns, no, net.biases[l] + o0, net.activation,
                          net.slope, ws.derivs[l + 1].data() + s0 * wo + o0, wo);
          continue;
        }
        // fused: bias (unless the product added it), loss and d loss / d out, in place
        double sum = 0.0;
        for (index_t s = s0; s < s0 + ns; ++s)
          sum += loss_and_gradient(loss, dst + s * wo + o0, packed ? nullptr : net.biases[l] + o0,
                                   target + s * wo + o0,
                                   pixel_weights ? pixel_weights + o0 : nullptr, no,
                                   T(1.0 / (double(B) * double(n_out))));
        ws.tile_loss[t] = sum;
      } catch (...) {
        failed = true;
      }
    }
  }
#pragma omp single
  {
    const index_t n_tiles = n_sb * n_blocks(n_out, tb.out_block);
    double total = 0.0;
    for (index_t t = 0; t < n_tiles; ++t) total += ws.tile_loss[t];
    loss_out = total / (double(B) * double(n_out));
  }
  // backward
  T* delta = ws.out.data();  // (B, wo) d loss / d z of layer l
  T* spare = ws.delta0.data();
  for (int l = L - 1; l >= 0; --l) {
    const index_t wi = net.sizes[l], wo = net.sizes[l + 1];
    const index_t n_ob = n_blocks(wo, tb.grad_block), n_ib = n_blocks(wi, tb.in_block);
    // weight gradient tiles (out block x in block), bias gradient with the first in block
#pragma omp for schedule(static) nowait
    for (index_t t = 0; t < n_ob * n_ib; ++t) {
      if (failed || interrupted(interrupt)) continue;
      try {
        const index_t o0 = (t / n_ib) * tb.grad_block, no = std::min(tb.grad_block, wo - o0);
        const index_t i0 = (t % n_ib) * tb.in_block, ni = std::min(tb.in_block, wi - i0);
        assign_product(map(grads.weights[l] + o0 * wi + i0, no, ni, wi),
                       cmap(delta + o0, B, no, wo).transpose(),
                       cmap(ws.acts[l].data() + i0, B, ni, wi));
        if (i0 == 0) {
          T* gb = grads.biases[l] + o0;
          std::fill(gb, gb + no, T(0));
          for (index_t s = 0; s < B; ++s) {
            const T* d = delta + s * wo + o0;
            for (index_t o = 0; o < no; ++o) gb[o] += d[o];
          }
        }
      } catch (...) {
        failed = true;
      }
    }
    if (l == 0) break;
    // delta of the layer below: (delta W) * g'(z)
    const index_t n_ib2 = n_blocks(wi, tb.in_block);
#pragma omp for schedule(static)
    for (index_t t = 0; t < n_sb * n_ib2; ++t) {
      if (failed || interrupted(interrupt)) continue;
      try {
        const index_t s0 = (t / n_ib2) * tb.star_block, ns = std::min(tb.star_block, B - s0);
        const index_t i0 = (t % n_ib2) * tb.in_block, ni = std::min(tb.in_block, wi - i0);
        if (l == L - 1 && packed) {
          map(spare + s0 * wi + i0, ns, ni, wi).setZero();
          ws.last_backward.add_product(spare + s0 * wi + i0, wi, delta + s0 * wo, wo, ns, i0);
        } else {
          assign_product(map(spare + s0 * wi + i0, ns, ni, wi), cmap(delta + s0 * wo, ns, wo, wo),
                         cmap(net.weights[l] + i0, wo, ni, wi));
        }
        const T* dv = ws.derivs[l].data();
        for (index_t s = s0; s < s0 + ns; ++s) {
          T* row = spare + s * wi;
          const T* drow = dv + s * wi;
          for (index_t i = i0; i < i0 + ni; ++i) row[i] *= drow[i];
        }
      } catch (...) {
        failed = true;
      }
    }
    T* next_spare = (spare == ws.delta0.data()) ? ws.delta1.data() : ws.delta0.data();
    delta = spare;
    spare = next_spare;
  }
#pragma omp barrier
}

// One optimizer's settings; the scalars of one step are computed in double.
struct OptimizerOptions {
  Optimizer kind = OPT_RADAM;
  double lr = 1e-4, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.0;
};

// One step on one parameter segment, as PyTorch's Adam / AdamW / RAdam (single-tensor form).
// step is the step number after increment (1 for the first step).
template <class T>
void optimizer_update(const OptimizerOptions& o, std::int64_t step, T* p, const T* g, T* m, T* v,
                      index_t n) {
  const double bc1 = 1.0 - std::pow(o.beta1, double(step));
  const double bc2 = 1.0 - std::pow(o.beta2, double(step));
  const T b1 = T(o.beta1), b2 = T(o.beta2), one_b1 = T(1.0 - o.beta1), one_b2 = T(1.0 - o.beta2);
  const T wd = T(o.weight_decay), eps = T(o.eps);
  const bool l2 = o.kind != OPT_ADAMW && o.weight_decay != 0.0;
  if (o.kind == OPT_ADAMW && o.weight_decay != 0.0) {
    const T decay = T(1.0 - o.lr * o.weight_decay);
    for (index_t i = 0; i < n; ++i) p[i] *= decay;
  }
  if (o.kind == OPT_ADAM || o.kind == OPT_ADAMW) {
    const T step_size = T(o.lr / bc1), sqrt_bc2 = T(std::sqrt(bc2));
    for (index_t i = 0; i < n; ++i) {
      const T gi = l2 ? g[i] + wd * p[i] : g[i];
      m[i] = b1 * m[i] + one_b1 * gi;
      v[i] = b2 * v[i] + one_b2 * gi * gi;
      p[i] -= step_size * m[i] / (std::sqrt(v[i]) / sqrt_bc2 + eps);
    }
    return;
  }
  // RAdam
  const double rho_inf = 2.0 / (1.0 - o.beta2) - 1.0;
  const double rho_t = rho_inf - 2.0 * double(step) * std::pow(o.beta2, double(step)) / bc2;
  const bool rectify = rho_t > 5.0;
  const double rect = rectify ? std::sqrt((rho_t - 4.0) * (rho_t - 2.0) * rho_inf /
                                          ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t))
                              : 0.0;
  const T inv_bc1 = T(1.0 / bc1), lr = T(o.lr), lr_rect = T(o.lr * rect),
          sqrt_bc2 = T(std::sqrt(bc2));
  for (index_t i = 0; i < n; ++i) {
    const T gi = l2 ? g[i] + wd * p[i] : g[i];
    m[i] = b1 * m[i] + one_b1 * gi;
    v[i] = b2 * v[i] + one_b2 * gi * gi;
    const T mhat = m[i] * inv_bc1;
    if (rectify)
      p[i] -= mhat * lr_rect * (sqrt_bc2 / (std::sqrt(v[i]) + eps));
    else
      p[i] -= mhat * lr;
  }
}

// Loss and gradients of one batch (no update).
//   x (B, n_in), target (B, n_out); grads' arrays as the parameters.
template <class T>
double mlp_loss_gradients(const MLPParams<T>& net, const T* x, const T* target, index_t B,
                          const T* pixel_weights, Loss loss, const MLPGradients<T>& grads,
                          int n_threads, const TrainBlocking& tb = TrainBlocking(),
                          Interrupt* interrupt = nullptr) {
  MLPWorkspace<T> ws;
  ws.reserve(net.sizes, B, tb);
  std::copy(x, x + B * net.sizes[0], ws.acts[0].begin());
  std::atomic<bool> failed{false};
  double loss_value = 0.0;
#pragma omp parallel num_threads(mlp_detail::useful_threads( \
    n_threads, 3.0 * mlp_detail::layer_flops(net.sizes, B)))
  mlp_loss_backward_in_region(net, ws, B, target, pixel_weights, loss, grads, loss_value, failed,
                              tb, interrupt);
  if (failed) throw std::bad_alloc();
  return loss_value;
}

// One epoch of mini-batch training.
//   x (n, n_in), target (n, n_out), order (n,) a permutation of the rows: batch b uses rows
//   order[b * batch_size ...]; the last batch may be smaller.
//   m, v     optimizer moments, same shapes as the parameters (updated)
//   step     optimizer steps taken so far (updated)
//   lr       (n_batches,) learning rate of each step
//   batch_loss_out (n_batches,) loss of each batch before its step
//   interrupt (or null): when it fires, the epoch stops before the next optimizer step, so the
//   parameters and moments are those after the last completed step, which `step` counts.
template <class T>
void mlp_train_epoch(const MLPParams<T>& net, const MLPGradients<T>& m, const MLPGradients<T>& v,
                     std::int64_t& step, const T* x, const T* target, const std::int64_t* order,
                     index_t n, index_t batch_size, const T* pixel_weights, Loss loss,
                     OptimizerOptions opt, const double* lr, double* batch_loss_out,
                     int n_threads, const TrainBlocking& tb = TrainBlocking(),
                     Interrupt* interrupt = nullptr) {
  using namespace mlp_detail;
  const int L = net.n_layers();
  const index_t n_in = net.sizes[0], n_out = net.sizes[L];
  const index_t n_batches = n_blocks(n, batch_size);
  MLPWorkspace<T> ws;
  ws.reserve(net.sizes, std::min(batch_size, n), tb);
  Buffer<T> batch_target(std::min(batch_size, n) * n_out);
  // gradient storage and the optimizer's segment table
  std::vector<Buffer<T>> gw(L), gb(L);  // written whole by every backward pass
  MLPGradients<T> grads;
  struct Segment { T* p; const T* g; T* m; T* v; index_t n; };
  std::vector<Segment> segments;
  for (int l = 0; l < L; ++l) {
    gw[l] = Buffer<T>(net.weight_size(l));
    gb[l] = Buffer<T>(net.sizes[l + 1]);
    grads.weights.push_back(gw[l].data());
    grads.biases.push_back(gb[l].data());
  }
  for (int l = 0; l < L; ++l) {
    for (index_t i0 = 0; i0 < net.weight_size(l); i0 += tb.param_chunk)
      segments.push_back({net.weights[l] + i0, gw[l].data() + i0, m.weights[l] + i0,
                          v.weights[l] + i0, std::min(tb.param_chunk, net.weight_size(l) - i0)});
    for (index_t i0 = 0; i0 < net.sizes[l + 1]; i0 += tb.param_chunk)
      segments.push_back({net.biases[l] + i0, gb[l].data() + i0, m.biases[l] + i0,
                          v.biases[l] + i0, std::min(tb.param_chunk, net.sizes[l + 1] - i0)});
  }
  const index_t n_seg = static_cast<index_t>(segments.size());
  std::atomic<bool> failed{false};
  double loss_value = 0.0;
  index_t completed = 0;
  bool stop = false;  // written by the master thread only, read by all after a barrier
#pragma omp parallel num_threads( \
    useful_threads(n_threads, 3.0 * layer_flops(net.sizes, std::min(batch_size, n))))
  {
    for (index_t b = 0; b < n_batches; ++b) {
      const index_t r0 = b * batch_size, B = std::min(batch_size, n - r0);
#pragma omp for schedule(static)
      for (index_t i = 0; i < B; ++i) {
        const index_t row = order[r0 + i];
        std::copy(x + row * n_in, x + (row + 1) * n_in, ws.acts[0].begin() + i * n_in);
        std::copy(target + row * n_out, target + (row + 1) * n_out,
                  batch_target.data() + i * n_out);
      }
      mlp_loss_backward_in_region(net, ws, B, batch_target.data(), pixel_weights, loss, grads,
                                  loss_value, failed, tb, interrupt);
      if (interrupt) {
        // One thread decides, so that every thread leaves the loop at the same batch (they
        // must meet the same barriers); the gradients of an interrupted batch are partial,
        // so its step is not taken.
#pragma omp master
        stop = interrupt->requested() || failed;
#pragma omp barrier
        if (stop) break;
      }
      OptimizerOptions o = opt;
      o.lr = lr[b];
      const std::int64_t this_step = step + b + 1;
#pragma omp for schedule(static)
      for (index_t s = 0; s < n_seg; ++s) {
        const Segment& g = segments[s];
        optimizer_update(o, this_step, g.p, g.g, g.m, g.v, g.n);
      }
#pragma omp single
      {
        batch_loss_out[b] = loss_value;
        completed = b + 1;
      }
    }
  }
  step += completed;
  if (failed) throw std::bad_alloc();
}

}  // namespace starlabel
