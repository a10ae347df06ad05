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

// A matrix A (rows, depth) packed once as the left-hand operand of Eigen's GEMM kernel, for
// products x A^T that use the same A many times: a network's last layer, for every star tile
// of a forward pass with the Jacobian, of a training step's backward pass (as W^T) and of an
// LM fit's steps. A product packs that operand each time: in a training step at batch 512,
// that was 12% of the samples (the forward and the backward pass each packed the last layer
// once per 64-star tile). (The forward passes without Jacobian use affine_kernel.hpp.)
//
// A is stored in w with leading dimension ld: A(i, k) = w[i ld + k] (Order = RowMajor: a
// weight matrix W (out, in), A = W) or w[k ld + i] (ColMajor: A = W^T). It is packed in blocks
// of `block` rows and a product uses one block. Within a block the panels, their order and
// the cache blocking (kc, mc) are those of Eigen's sequential GEMM for a product of that
// block with `cols` columns, so results are those of Eigen's product, bit for bit.
template <class T, int Order>
class PackedMatrix {
 public:
  // Room and the panel table for A (rows, depth) in blocks of `block` rows, for products with
  // about `cols` columns (sets the cache blocking only). Keeps its memory from call to call.
  void reset(index_t rows, index_t depth, index_t block, index_t cols) {
    block_ = block;
    index_t kc = depth, mc = std::min(block, rows), nc = cols;
    Eigen::internal::computeProductBlockingSizes<T, T, 1>(kc, mc, nc, index_t(1));
    panels_.clear();
    first_.clear();
    index_t offset = 0;
    for (index_t r0 = 0; r0 < rows; r0 += block) {
      first_.push_back(static_cast<index_t>(panels_.size()));
      const index_t n = std::min(block, rows - r0);
      for (index_t i2 = 0; i2 < n; i2 += mc)  // row panels, then depth panels, as Eigen
        for (index_t k2 = 0; k2 < depth; k2 += kc) {
          const Panel panel{r0 + i2, k2, std::min(mc, n - i2), std::min(kc, depth - k2), offset};
          panels_.push_back(panel);
          offset += padded(panel.rows * panel.depth);
        }
    }
    first_.push_back(static_cast<index_t>(panels_.size()));
    if (data_.size() < std::size_t(offset)) data_.resize(offset);
  }

  index_t block() const { return block_; }

  // Pack A from w (leading dimension ld). Called by every thread of an OpenMP team, the team
  // shares the panels (an orphaned `omp for`, with its barrier at the end); called outside a
  // parallel region, the calling thread packs them all.
  void pack(const T* w, index_t ld) {
    const index_t n_panels = static_cast<index_t>(panels_.size());
#pragma omp for schedule(static)
    for (index_t p = 0; p < n_panels; ++p) pack_panel(w, ld, p);
  }

  // dst (cols, n) += x (cols, depth) * A[r0 : r0 + n]^T, the block of rows starting at r0 (a
  // multiple of block); dst and x row-major with leading dimensions ld_dst and ld_x.
  void add_product(T* dst, index_t ld_dst, const T* x, index_t ld_x, index_t cols,
                   index_t r0) const {
    using namespace Eigen::internal;
    using RhsMapper = const_blas_data_mapper<T, index_t, Eigen::ColMajor>;
    using ResMapper = blas_data_mapper<T, index_t, Eigen::ColMajor, Eigen::Unaligned, 1>;
    if (cols <= 0) return;
    // Eigen's view of a row-major product: dst^T (n, cols) = A_block (n, depth) * x^T
    const RhsMapper rhs(x, ld_x);
    const ResMapper res(dst, ld_dst);
    gemm_pack_rhs<T, index_t, RhsMapper, Traits::nr, Eigen::ColMajor> pack_rhs;
    gebp_kernel<T, T, index_t, ResMapper, Traits::mr, Traits::nr, false, false> gebp;
    thread_local std::vector<T, Eigen::aligned_allocator<T>> packed_x;
    const index_t b = r0 / block_;
    index_t packed_k = -1;
    for (index_t p = first_[b]; p < first_[b + 1]; ++p) {
      const Panel& panel = panels_[p];
      if (panel.k != packed_k) {  // with a single depth panel, x is packed once
        if (packed_x.size() < std::size_t(panel.depth * cols)) packed_x.resize(panel.depth * cols);
        pack_rhs(packed_x.data(), rhs.getSubMapper(panel.k, 0), panel.depth, cols);
        packed_k = panel.k;
      }
      gebp(res.getSubMapper(panel.row - r0, 0), data_.data() + panel.offset, packed_x.data(),
           panel.rows, panel.depth, cols, T(1));
    }
  }

 private:
  using Traits = Eigen::internal::gebp_traits<T, T>;

  // panel p of A from w
  void pack_panel(const T* w, index_t ld, index_t p) {
    using Mapper = Eigen::internal::const_blas_data_mapper<T, index_t, Order>;
    Eigen::internal::gemm_pack_lhs<T, index_t, Mapper, Traits::mr, Traits::LhsProgress,
                                   typename Traits::LhsPacket4Packing, Order>
        pack_lhs;
    const Panel& panel = panels_[p];
    pack_lhs(data_.data() + panel.offset, Mapper(w, ld).getSubMapper(panel.row, panel.k),
             panel.depth, panel.rows);
  }

  // every panel starts on a 64-byte line: Eigen's packing stores whole aligned packets
  static constexpr index_t kAlign = 64 / sizeof(T);
  static index_t padded(index_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

  struct Panel {
    index_t row, k, rows, depth, offset;  // A[row : row + rows, k : k + depth] at data_ + offset
  };
  std::vector<Panel> panels_;
  std::vector<index_t> first_;  // first panel of each block, then the number of panels
  std::vector<T, Eigen::aligned_allocator<T>> data_;
  index_t block_ = 1;
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
