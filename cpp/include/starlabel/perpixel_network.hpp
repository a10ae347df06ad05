// The per-pixel networks of BinSpec (El-Badry et al. 2018) and of the Payne paper era (Ting
// et al. 2019): every pixel p has its own sigmoid network. BinSpec's has one hidden layer,
//     inner_p(x) = sum_j w1[p, j] sigmoid( sum_k w0[p, j, k] x_k + b0[p, j] ) + b1[p],
// and flux_p = inner_p. The paper-era networks feed inner_p to one more sigmoid unit and a
// scalar affine map: flux_p = w2[p] sigmoid(inner_p) + b2[p].
// Forward pass and Jacobian d flux / d x, batched over stars. Work is split by star, so
// results do not depend on the number of threads.
#pragma once

#include <algorithm>
#include <cmath>

#include "common.hpp"

namespace starlabel {

template <class T>
struct PerPixelNetwork {
  const T* w0;  // (n_pixels, n_hidden, n_labels)
  const T* b0;  // (n_pixels, n_hidden)
  const T* w1;  // (n_pixels, n_hidden)
  const T* b1;  // (n_pixels,)
  index_t n_pixels, n_hidden, n_labels;
  const T* w2 = nullptr;  // (n_pixels,) the outer sigmoid's scale, or null (BinSpec)
  const T* b2 = nullptr;  // (n_pixels,) its offset; set exactly when w2 is
};

//   x        (n_stars, n_labels)
//   out      (n_stars, n_pixels)
//   jac_out  (n_stars, n_pixels, n_labels) or null
//   interrupt (or null): once it fires the remaining stars are skipped (out is incomplete)
template <class T>
void perpixel_forward(const PerPixelNetwork<T>& net, const T* x, index_t n_stars, T* out,
                      T* jac_out, int n_threads, Interrupt* interrupt = nullptr) {
  const index_t P = net.n_pixels, H = net.n_hidden, K = net.n_labels;
#pragma omp parallel for schedule(static) num_threads(resolve_threads(n_threads))
  for (index_t s = 0; s < n_stars; ++s) {
    if (interrupted(interrupt)) continue;
    const T* xs = x + s * K;
    T* o = out + s * P;
    T* js = jac_out ? jac_out + s * P * K : nullptr;
    for (index_t p = 0; p < P; ++p) {
      const T* w0p = net.w0 + p * H * K;
      const T* b0p = net.b0 + p * H;
      const T* w1p = net.w1 + p * H;
      T f = net.b1[p];
      T* jp = js ? js + p * K : nullptr;
      if (jp) std::fill(jp, jp + K, T(0));
      for (index_t j = 0; j < H; ++j) {
        T z = b0p[j];
        const T* wr = w0p + j * K;
        for (index_t k = 0; k < K; ++k) z += wr[k] * xs[k];
        const T h = T(1) / (T(1) + std::exp(-z));
        f += w1p[j] * h;
        if (jp) {
          const T c = w1p[j] * h * (T(1) - h);
          for (index_t k = 0; k < K; ++k) jp[k] += c * wr[k];
        }
      }
      if (net.w2) {
        const T g = T(1) / (T(1) + std::exp(-f));
        f = net.w2[p] * g + net.b2[p];
        if (jp) {
          const T c = net.w2[p] * g * (T(1) - g);
          for (index_t k = 0; k < K; ++k) jp[k] *= c;
        }
      }
      o[p] = f;
    }
  }
}

}  // namespace starlabel
