// dst = lhs * rhs through Eigen's own GEMM kernel, with its packing buffers kept per thread
// from call to call instead of allocated and freed by every product.
//
// Why: an emulator fit makes thousands of tile products, and Eigen allocates each one's packed
// operands (~1 MB) on the heap. Where glibc's dynamic mmap threshold is off, as in every Dask
// worker (the nanny sets MALLOC_TRIM_THRESHOLD_), each such buffer is a fresh mmap whose pages
// fault in, zeroed by the kernel, and leave again at free: `fit_spectra` in one process with
// MALLOC_TRIM_THRESHOLD_=65536 took 4.2-4.3 s instead of 3.4 s for 32 spectra.
//
// The result is the same, bit for bit, as `dst.noalias() = lhs * rhs`: the same dispatch
// (coefficient-based product for tiny sizes, matrix-vector for a single row or column), the
// same kernel and the same blocking sizes; only where the packed blocks live differs. It uses
// Eigen's internal GEMM interface (Eigen 3.4: general_matrix_matrix_product, level3_blocking,
// computeProductBlockingSizes), hence the version bound in pyproject.toml.
#pragma once

#include <Eigen/Core>
#include <type_traits>
#include <utility>
#include <vector>

#include "common.hpp"

namespace starlabel {
namespace gemm_detail {

// Eigen's blocking object with buffers that only grow and are never freed between products:
// a thread keeps the blocks of the largest product it has run (at most a few MB), as long as
// it lives.
template <class T>
class KeptBlocking : public Eigen::internal::level3_blocking<T, T> {
 public:
  // the sizes Eigen's gemm_blocking_space computes for one thread and this product
  void prepare(index_t rows, index_t cols, index_t depth, bool row_major_dst) {
    this->m_mc = row_major_dst ? cols : rows;
    this->m_nc = row_major_dst ? rows : cols;
    this->m_kc = depth;
    Eigen::internal::computeProductBlockingSizes<T, T, 1>(this->m_kc, this->m_mc, this->m_nc,
                                                          index_t(1));
    const std::size_t size_a = this->m_mc * this->m_kc, size_b = this->m_kc * this->m_nc;
    if (block_a_.size() < size_a) block_a_.resize(size_a);
    if (block_b_.size() < size_b) block_b_.resize(size_b);
    this->m_blockA = block_a_.data();
    this->m_blockB = block_b_.data();
  }

 private:
  // aligned: Eigen's packing routines store whole SIMD packets
  std::vector<T, Eigen::aligned_allocator<T>> block_a_, block_b_;
};

// One per thread and scalar type, shared by every call site: a thread runs one product at a
// time, and one set of blocks sized for the largest is all it needs.
template <class T>
KeptBlocking<T>& thread_blocking() {
  thread_local KeptBlocking<T> blocking;
  return blocking;
}

// dst (+)= lhs * rhs as Eigen's `dst.noalias() = lhs * rhs` (or `+=`) computes it
template <bool accumulate, class Dst, class Lhs, class Rhs>
void product(Dst&& dst, const Lhs& lhs, const Rhs& rhs) {
  using D = std::decay_t<Dst>;
  using T = typename D::Scalar;
  using LhsTraits = Eigen::internal::blas_traits<Lhs>;
  using RhsTraits = Eigen::internal::blas_traits<Rhs>;
  static_assert(std::is_same_v<typename Lhs::Scalar, T> && std::is_same_v<typename Rhs::Scalar, T>);
  static_assert(!LhsTraits::NeedToConjugate && !RhsTraits::NeedToConjugate);
  const index_t rows = dst.rows(), cols = dst.cols(), depth = lhs.cols();
  // where Eigen itself would not run its GEMM, let it do what it does
  if (rows <= 1 || cols <= 1 || depth == 0 ||
      depth + rows + cols < EIGEN_GEMM_TO_COEFFBASED_THRESHOLD) {
    if constexpr (accumulate)
      dst.noalias() += lhs * rhs;
    else
      dst.noalias() = lhs * rhs;
    return;
  }
  const auto& a = LhsTraits::extract(lhs);
  const auto& b = RhsTraits::extract(rhs);
  using A = std::decay_t<decltype(a)>;
  using B = std::decay_t<decltype(b)>;
  constexpr bool dst_row_major = D::Flags & Eigen::RowMajorBit;
  using Gemm = Eigen::internal::general_matrix_matrix_product<
      index_t, T, (A::Flags & Eigen::RowMajorBit) ? Eigen::RowMajor : Eigen::ColMajor, false, T,
      (B::Flags & Eigen::RowMajorBit) ? Eigen::RowMajor : Eigen::ColMajor, false,
      dst_row_major ? Eigen::RowMajor : Eigen::ColMajor, D::InnerStrideAtCompileTime>;
  KeptBlocking<T>& blocking = thread_blocking<T>();
  blocking.prepare(rows, cols, depth, dst_row_major);
  if constexpr (!accumulate) dst.setZero();
  Gemm::run(rows, cols, depth, a.data(), a.outerStride(), b.data(), b.outerStride(), dst.data(),
            dst.innerStride(), dst.outerStride(), T(1), blocking);
}

}  // namespace gemm_detail

// A matrix W (rows, depth) packed once as the left-hand operand of Eigen's GEMM kernel, for
// products x W^T that use the same W many times: a network's last layer, for every star tile
// of a forward pass and every iteration of an LM fit. A product packs that operand each time:
// 11% of a 1024-star forward pass's samples, and ~17 MB copied per LM trial step in double.
//
// W is packed in blocks of `block` rows; the products use one block each. Within a block the
// order and cache blocking (kc, mc) are those Eigen's sequential GEMM uses for a product of
// that block with `cols` columns, so results are the same, bit for bit, as Eigen's product.
template <class T>
class PackedRows {
 public:
  // Room for W (rows, depth) in blocks of `block` rows, for products with up to
  // about `cols` columns (sets the cache blocking only).
  void reset(index_t rows, index_t depth, index_t block, index_t cols) {
    rows_ = rows;
    depth_ = depth;
    block_ = block;
    kc_ = depth;
    mc_ = block;
    index_t nc = cols;
    Eigen::internal::computeProductBlockingSizes<T, T, 1>(kc_, mc_, nc, index_t(1));
    block_stride_ = 0;
    for_each_panel(block, [&](index_t, index_t, index_t mc, index_t kc, index_t offset) {
      block_stride_ = offset + padded(mc * kc);
    });
    const std::size_t size = std::size_t(block_stride_) * ((rows + block - 1) / block);
    if (data_.size() < size) data_.resize(size);
  }

  // Pack rows [r0, r0 + min(block, rows - r0)) of W (row-major, leading dimension ld); r0 a
  // multiple of block. Blocks are independent, so threads may pack different blocks at once.
  void pack(const T* w, index_t ld, index_t r0) {
    using Mapper = Eigen::internal::const_blas_data_mapper<T, index_t, Eigen::RowMajor>;
    Eigen::internal::gemm_pack_lhs<T, index_t, Mapper, Traits::mr, Traits::LhsProgress,
                                   typename Traits::LhsPacket4Packing, Eigen::RowMajor>
        pack_lhs;
    const Mapper lhs(w + r0 * ld, ld);
    T* dst = data_.data() + (r0 / block_) * block_stride_;
    for_each_panel(std::min(block_, rows_ - r0),
                   [&](index_t i2, index_t k2, index_t mc, index_t kc, index_t offset) {
                     pack_lhs(dst + offset, lhs.getSubMapper(i2, k2), kc, mc);
                   });
  }

  // dst (cols, n) += x (cols, depth) * W[r0 : r0 + n]^T, n = min(block, rows - r0); dst and x
  // row-major with leading dimensions ld_dst and ld_x; r0 a multiple of block.
  void add_product(T* dst, index_t ld_dst, const T* x, index_t ld_x, index_t cols,
                   index_t r0) const {
    using namespace Eigen::internal;
    using RhsMapper = const_blas_data_mapper<T, index_t, Eigen::ColMajor>;
    using ResMapper = blas_data_mapper<T, index_t, Eigen::ColMajor, Eigen::Unaligned, 1>;
    if (cols <= 0) return;
    // Eigen's view of a row-major product: dst^T (n, cols) = W_block (n, depth) * x^T
    const RhsMapper rhs(x, ld_x);
    const ResMapper res(dst, ld_dst);
    gemm_pack_rhs<T, index_t, RhsMapper, Traits::nr, Eigen::ColMajor> pack_rhs;
    gebp_kernel<T, T, index_t, ResMapper, Traits::mr, Traits::nr, false, false> gebp;
    thread_local std::vector<T, Eigen::aligned_allocator<T>> packed_x;
    if (packed_x.size() < std::size_t(kc_ * cols)) packed_x.resize(kc_ * cols);
    const T* block = data_.data() + (r0 / block_) * block_stride_;
    index_t packed_k2 = -1;
    for_each_panel(std::min(block_, rows_ - r0),
                   [&](index_t i2, index_t k2, index_t mc, index_t kc, index_t offset) {
                     if (k2 != packed_k2) {  // a single depth panel is packed once
                       pack_rhs(packed_x.data(), rhs.getSubMapper(k2, 0), kc, cols);
                       packed_k2 = k2;
                     }
                     gebp(res.getSubMapper(i2, 0), block + offset, packed_x.data(), mc, kc,
                          cols, T(1));
                   });
  }

  index_t rows() const { return rows_; }
  index_t depth() const { return depth_; }
  index_t block() const { return block_; }

 private:
  using Traits = Eigen::internal::gebp_traits<T, T>;
  static constexpr index_t kAlign = 64 / sizeof(T);  // each panel starts on a 64-byte line
  static index_t padded(index_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

  // visit(i2, k2, mc, kc, offset) for the (mc x kc) panels of a block of n rows, in the order
  // of Eigen's sequential GEMM (row panels, then depth panels), offset within the block
  template <class Visit>
  void for_each_panel(index_t n, Visit&& visit) const {
    index_t offset = 0;
    for (index_t i2 = 0; i2 < n; i2 += mc_) {
      const index_t mc = std::min(mc_, n - i2);
      for (index_t k2 = 0; k2 < depth_; k2 += kc_) {
        const index_t kc = std::min(kc_, depth_ - k2);
        visit(i2, k2, mc, kc, offset);
        offset += padded(mc * kc);
      }
    }
  }

  std::vector<T, Eigen::aligned_allocator<T>> data_;
  index_t rows_ = 0, depth_ = 0, block_ = 1, kc_ = 1, mc_ = 1, block_stride_ = 0;
};

// dst (rows, cols) = lhs (rows, depth) * rhs (depth, cols); dst a writable Eigen::Map, Matrix
// or block of one that aliases neither operand; lhs and rhs Maps, Matrices or blocks, or
// transposes of them, of dst's scalar type.
template <class Dst, class Lhs, class Rhs>
void assign_product(Dst&& dst, const Lhs& lhs, const Rhs& rhs) {
  gemm_detail::product<false>(std::forward<Dst>(dst), lhs, rhs);
}

// dst += lhs * rhs, same arguments
template <class Dst, class Lhs, class Rhs>
void add_product(Dst&& dst, const Lhs& lhs, const Rhs& rhs) {
  gemm_detail::product<true>(std::forward<Dst>(dst), lhs, rhs);
}

}  // namespace starlabel
