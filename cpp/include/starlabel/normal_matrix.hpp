// h += a^T a over the upper triangle: the Gauss-Newton matrix J^T W J of one block of pixels,
// a = sqrt(W) J (rows = pixels, cols = parameters).
//
// Why not Eigen's rankUpdate: for the spectrum fit's blocks (256 pixels x 30-40 parameters)
// it ran at 13-16 GFLOP/s, 0.6 ms per Jacobian of The Payne's 7214 pixels. Here each tile of
// h (kRows parameters x up to 3 packets of parameters) is summed over all the block's pixels
// in registers: in a fit of 25 labels + RV + continuum (perf, 1 thread) 4.3% of the samples,
// where the rank update took ~8%.
//
// Every entry of h is one running sum over the pixels in order, whatever the block, so the
// result does not depend on the thread count or on the other spectra.
#pragma once

#include <Eigen/Core>
#include <algorithm>

#include "common.hpp"

namespace starlabel {

class NormalMatrix {
  using Packet = Eigen::internal::packet_traits<double>::type;
  static constexpr int kWidth = Eigen::internal::packet_traits<double>::size;
  // a tile is kRows x (up to 3 packets): 24 accumulators where the ISA has 32 vector
  // registers (AVX-512), 12 where it has 16, leaving room for the packets of a row and the
  // broadcast entry
  static constexpr int kRows = EIGEN_ARCH_DEFAULT_NUMBER_OF_REGISTERS >= 32 ? 8 : 4;

 public:
  // the row length (leading dimension) a must have for `cols` parameters: a multiple of the
  // packet width and of kRows, the columns past `cols` zero
  static index_t padded(index_t cols) {
    constexpr index_t step = std::max<index_t>(kWidth, kRows);
    return (cols + step - 1) / step * step;
  }

  // h (cols, cols), column-major with leading dimension ld_h: h(i, k) += sum_j a(j, i) a(j, k)
  // for k >= i; a (rows, padded(cols)) row-major. Entries below the diagonal are not written.
  static void add_upper(const double* a, index_t rows, index_t cols, double* h, index_t ld_h) {
    const index_t ld = padded(cols);
    for (index_t i0 = 0; i0 < cols; i0 += kRows)
      for (index_t k0 = i0 / kWidth * kWidth; k0 < cols; k0 += 3 * kWidth) {
        const index_t packets = std::min<index_t>(3, (ld - k0) / kWidth);
        if (packets == 3)
          tile<3>(a, rows, ld, i0, k0, cols, h, ld_h);
        else if (packets == 2)
          tile<2>(a, rows, ld, i0, k0, cols, h, ld_h);
        else
          tile<1>(a, rows, ld, i0, k0, cols, h, ld_h);
      }
  }

 private:
  // h's tile rows [i0, i0 + kRows) x columns [k0, k0 + P packets). Not inlined, accumulators
  // started at zero: inlined into a large loop, GCC 12 kept such accumulators on the stack.
  template <int P>
  EIGEN_DONT_INLINE static void tile(const double* a, index_t rows, index_t ld, index_t i0,
                                     index_t k0, index_t cols, double* h, index_t ld_h) {
    using namespace Eigen::internal;
    Packet acc[kRows][P];
    for (int r = 0; r < kRows; ++r)
      for (int p = 0; p < P; ++p) acc[r][p] = pset1<Packet>(0.0);
    for (index_t j = 0; j < rows; ++j) {
      const double* row = a + j * ld;
      Packet columns[P];
      for (int p = 0; p < P; ++p) columns[p] = ploadu<Packet>(row + k0 + p * kWidth);
      for (int r = 0; r < kRows; ++r) {
        const Packet entry = pset1<Packet>(row[i0 + r]);
        for (int p = 0; p < P; ++p) acc[r][p] = pmadd(entry, columns[p], acc[r][p]);
      }
    }
    alignas(64) double sums[P * kWidth];
    for (index_t r = 0; r < kRows && i0 + r < cols; ++r) {
      for (int p = 0; p < P; ++p) pstore(sums + p * kWidth, acc[r][p]);
      for (index_t k = std::max(k0, i0 + r); k < std::min(cols, k0 + P * kWidth); ++k)
        h[k * ld_h + i0 + r] += sums[k - k0];
    }
  }
};

}  // namespace starlabel
