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
