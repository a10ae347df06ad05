// out = bias + x W^T for a dense layer: our own register-tiled kernel, with the bias added and
// the outputs checked for finiteness as each tile of outputs leaves the registers.
// Used for a network's last layer by the forward pass without Jacobian (mlp_forward, from 64
// stars) and by a training step's forward pass (the weights packed ahead, from 256 rows).
//
// Why not Eigen's GEMM (gemm.hpp), which every other product uses: for the Payne's output
// layer (300 -> 7214, The Payne's network) it needs a pass that copies the bias into the
// output before the product accumulates onto it, and another that reads every output for NaN
// (4.8% and 1.9% of a forward pass's samples at 1024 stars), and its kernel keeps 3 x 4
// packets of accumulators where AVX-512 has registers for 3 x 8. On one thread, the output
// layer for 1024 stars: 235 GFLOP/s through Eigen, 246 with this kernel (NumPy's own float32
// matmul: 239-256), bias included in both.
//
// Shapes and layout
//   W     (n_out, depth) row-major, as a network stores a layer ("out x in")
//   x     (n_rows, depth) row-major, leading dimension ld_x: one row per star
//   out   (n_rows, n_out) row-major, leading dimension ld_out
// The weights are packed once into panels of kOutputs outputs: panel q holds W[q kOutputs + i, k]
// at [k kOutputs + i], outputs past n_out as zeros. The rows of x are packed by each product
// into panels of kRows rows ([k kRows + j]). The kernel keeps a (kRows x kOutputs) tile of
// sums in registers: every k loads kOutputs / packet weights once and multiplies them by each
// row's x[k] broadcast. Each output is bias + the sum over k in order of fused multiply-adds
// from zero: the same value whatever the tiling and the number of threads, and (for full
// packets) the same bits as Eigen's kernel.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <stdexcept>
#include <vector>

#include "common.hpp"

namespace starlabel {

template <class T>
struct AffineTile {
  using Packet = typename Eigen::internal::packet_traits<T>::type;
  static constexpr int kPacket = Eigen::internal::unpacket_traits<Packet>::size;
  static constexpr int kPackets = 3;  // packets of outputs per tile
  static constexpr int kOutputs = kPackets * kPacket;
  // rows (stars) per tile: 3 x 8 accumulators fit in AVX-512's 32 registers; with 16
  // registers (AVX2, SSE, NEON), 3 x 4 leave room for the weights and the broadcast
  static constexpr int kRows = EIGEN_ARCH_DEFAULT_NUMBER_OF_REGISTERS >= 32 ? 8 : 4;
};

// A layer's weights W (n_out, depth), packed for affine_product. Keeps its memory from call to
// call (it only grows).
template <class T>
class PackedWeights {
 public:
  using Tile = AffineTile<T>;

  // Room for rows [first, first + n) of a W (., depth); pack() fills it.
  void reset(index_t first, index_t n, index_t depth) {
    first_ = first;
    n_ = n;
    depth_ = depth;
    const std::size_t size = std::size_t(n_panels()) * Tile::kOutputs * depth;
    if (data_.size() < size) data_.resize(size);
  }

  // Pack those rows from w (leading dimension ld). Called by every thread of an OpenMP team,
  // the team shares the panels (an orphaned `omp for` with its barrier); called outside a
  // parallel region, the calling thread packs them all.
  void pack(const T* w, index_t ld) {
#pragma omp for schedule(static)
    for (index_t q = 0; q < n_panels(); ++q) pack_panel(w, ld, q);
  }
  index_t first() const { return first_; }
  index_t depth() const { return depth_; }
  index_t n_panels() const { return (n_ + Tile::kOutputs - 1) / Tile::kOutputs; }
  const T* panel(index_t q) const { return data_.data() + q * Tile::kOutputs * depth_; }

  // Panel q alone, from w (leading dimension ld)
  void pack_panel(const T* w, index_t ld, index_t q) {
    using Packet = typename Tile::Packet;
    constexpr int m = Tile::kOutputs, P = Tile::kPacket;
    T* dst = data_.data() + q * m * depth_;
    const index_t r0 = first_ + q * m, n = std::min<index_t>(m, first_ + n_ - r0);
    index_t k0 = 0;
    if constexpr (P > 1) {
      // whole (P x P) blocks transposed in registers: a scalar copy writing with stride m
      // took 0.6 ms for The Payne's output layer, as long as 16 stars' products
      if (n == m)
        for (; k0 + P <= depth_; k0 += P)
          for (int b = 0; b < Tile::kPackets; ++b) {
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wignored-attributes"  // a vector type as template argument
            Eigen::internal::PacketBlock<Packet, P> block;
#pragma GCC diagnostic pop
            for (int i = 0; i < P; ++i)
              block.packet[i] = Eigen::internal::ploadu<Packet>(w + (r0 + b * P + i) * ld + k0);
            Eigen::internal::ptranspose(block);
            for (int i = 0; i < P; ++i)
              Eigen::internal::pstore(dst + (k0 + i) * m + b * P, block.packet[i]);
          }
    }
    for (index_t i = 0; i < n; ++i) {  // the rest: columns past the blocks, a short panel
      const T* row = w + (r0 + i) * ld;
      for (index_t k = k0; k < depth_; ++k) dst[k * m + i] = row[k];
    }
    for (index_t i = n; i < m; ++i)
      for (index_t k = k0; k < depth_; ++k) dst[k * m + i] = T(0);
  }

 private:
  index_t first_ = 0, n_ = 0, depth_ = 0;
  // aligned: the kernel loads whole packets of weights (a panel is a whole number of packets)
  std::vector<T, Eigen::aligned_allocator<T>> data_;
};

namespace affine_detail {

using Eigen::internal::padd;
using Eigen::internal::pload;
using Eigen::internal::ploadu;
using Eigen::internal::pmadd;
using Eigen::internal::pmul;
using Eigen::internal::pset1;
using Eigen::internal::pstoreu;

// One tile: out[j, i] = bias[i] + sum_k w[k kOutputs + i] x[k kRows + j] for the first n_rows
// rows j of the tile (all kOutputs outputs i). Returns a packet whose lanes are NaN where some
// output was not finite (the sum of every output times zero), else zero.
//   w     a packed panel (depth, kOutputs)
//   x     a packed row panel (depth, kRows)
//   out   (n_rows, kOutputs), leading dimension ld
//   bias  (kOutputs,)
template <class T>
inline typename AffineTile<T>::Packet tile(index_t depth, const T* __restrict w,
                                           const T* __restrict x, T* out, index_t ld,
                                           const T* bias, int n_rows) {
  using Tile = AffineTile<T>;
  using Packet = typename Tile::Packet;
  constexpr int P = Tile::kPacket, R = Tile::kRows;
  Packet acc[R][Tile::kPackets];
  for (int j = 0; j < R; ++j)
    for (int v = 0; v < Tile::kPackets; ++v) acc[j][v] = pset1<Packet>(T(0));
  for (index_t k = 0; k < depth; ++k) {
    const Packet w0 = pload<Packet>(w), w1 = pload<Packet>(w + P), w2 = pload<Packet>(w + 2 * P);
#pragma GCC unroll 8
    for (int j = 0; j < R; ++j) {
      const Packet b = pset1<Packet>(x[j]);
      acc[j][0] = pmadd(w0, b, acc[j][0]);
      acc[j][1] = pmadd(w1, b, acc[j][1]);
      acc[j][2] = pmadd(w2, b, acc[j][2]);
    }
    w += Tile::kOutputs;
    x += R;
  }
  const Packet b0 = ploadu<Packet>(bias), b1 = ploadu<Packet>(bias + P),
               b2 = ploadu<Packet>(bias + 2 * P), zero = pset1<Packet>(T(0));
  Packet check = zero;
  // unrolled with constant row indices: indexing acc by a run-time count would keep it in
  // memory (GCC then stores every accumulator to the stack at every k)
#pragma GCC unroll 8
  for (int j = 0; j < R; ++j) {
    if (j >= n_rows) break;
    const Packet o0 = padd(acc[j][0], b0), o1 = padd(acc[j][1], b1), o2 = padd(acc[j][2], b2);
    pstoreu(out + j * ld, o0);
    pstoreu(out + j * ld + P, o1);
    pstoreu(out + j * ld + 2 * P, o2);
    check = padd(check, padd(pmul(o0, zero), padd(pmul(o1, zero), pmul(o2, zero))));
  }
  return check;
}

}  // namespace affine_detail

namespace affine_detail {

// affine_product's loops; with `unpacked` given, w's panels are packed from it (leading
// dimension ld_w) by the first row panel, each just before its first product
template <class T>
bool run(T* out, index_t ld_out, const T* x, index_t ld_x, index_t n_rows,
         const PackedWeights<T>& w, index_t c0, index_t n_cols, const T* bias,
         PackedWeights<T>* to_fill, const T* unpacked, index_t ld_w) {
  using Tile = AffineTile<T>;
  using Packet = typename Tile::Packet;
  constexpr int M = Tile::kOutputs, R = Tile::kRows;
  if ((c0 - w.first()) % M != 0)
    throw std::invalid_argument("affine_product: outputs must start at a panel of the weights");
  const index_t depth = w.depth(), q0 = (c0 - w.first()) / M;
  // x's rows in panels of R, zero-padded: the tile always multiplies R rows
  thread_local std::vector<T> packed_x;
  const index_t n_row_panels = (n_rows + R - 1) / R;
  if (packed_x.size() < std::size_t(n_row_panels * R * depth))
    packed_x.resize(n_row_panels * R * depth);
  for (index_t r0 = 0; r0 < n_rows; r0 += R) {
    T* dst = packed_x.data() + r0 * depth;
    const index_t n = std::min<index_t>(R, n_rows - r0);
    for (index_t j = 0; j < R; ++j)
      for (index_t k = 0; k < depth; ++k) dst[k * R + j] = j < n ? x[(r0 + j) * ld_x + k] : T(0);
  }
  Packet check = pset1<Packet>(T(0));
  int bad = 0;
  T edge[R * M], edge_bias[M];  // the last panel when n_cols is not a multiple of M
  const index_t full = n_cols / M, rest = n_cols - full * M;
  if (rest) {
    std::fill(edge_bias, edge_bias + M, T(0));
    std::copy(bias + full * M, bias + n_cols, edge_bias);
  }
  // row panel outside, weight panels inside: a row panel (R x depth) stays in L1 while the
  // weight panels stream from L2
  for (index_t r0 = 0; r0 < n_rows; r0 += R) {
    const T* xp = packed_x.data() + r0 * depth;
    const int n = static_cast<int>(std::min<index_t>(R, n_rows - r0));
    T* o = out + r0 * ld_out;
    const bool pack_now = to_fill && r0 == 0;
    for (index_t q = 0; q < full; ++q) {
      if (pack_now) to_fill->pack_panel(unpacked, ld_w, q0 + q);
      check = padd(check, tile(depth, w.panel(q0 + q), xp, o + q * M, ld_out, bias + q * M, n));
    }
    if (rest) {
      if (pack_now) to_fill->pack_panel(unpacked, ld_w, q0 + full);
      tile(depth, w.panel(q0 + full), xp, edge, M, edge_bias, n);
      for (int j = 0; j < n; ++j)
        for (index_t i = 0; i < rest; ++i) {
          const T v = edge[j * M + i];
          bad |= !(v - v == T(0));
          o[j * ld_out + full * M + i] = v;
        }
    }
  }
  return !bad && Eigen::internal::predux(check) == T(0);
}

}  // namespace affine_detail

// out (n_rows, n_cols) = bias (n_cols) + x (n_rows, depth) W[c0 : c0 + n_cols]^T, the rows of W
// from the packed ones (c0 - w.first() a multiple of kOutputs, all n_cols rows packed in w);
// out and x row-major with leading dimensions ld_out and ld_x. Returns whether
// every output is finite. Single-threaded; rows are packed into a per-thread buffer.
template <class T>
bool affine_product(T* out, index_t ld_out, const T* x, index_t ld_x, index_t n_rows,
                    const PackedWeights<T>& w, index_t c0, index_t n_cols, const T* bias) {
  return affine_detail::run(out, ld_out, x, ld_x, n_rows, w, c0, n_cols, bias,
                            static_cast<PackedWeights<T>*>(nullptr), static_cast<const T*>(nullptr),
                            index_t(0));
}

// The same with W (., depth) row-major (leading dimension ld_w) not packed ahead: its rows
// [c0, c0 + n_cols) are packed into a per-thread buffer, each panel just before its first
// product, while the row panel that uses it first is in cache.
template <class T>
bool affine_product(T* out, index_t ld_out, const T* x, index_t ld_x, index_t n_rows,
                    const T* weights, index_t ld_w, index_t depth, index_t c0, index_t n_cols,
                    const T* bias) {
  thread_local PackedWeights<T> block;
  block.reset(c0, n_cols, depth);
  return affine_detail::run(out, ld_out, x, ld_x, n_rows, block, c0, n_cols, bias, &block,
                            weights, ld_w);
}

}  // namespace starlabel
