// Polynomial label vectorizer of The Cannon: v_k(x) = prod_a x_a^e_ka, and its derivatives.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common.hpp"

namespace starlabel {

// The polynomial's structure, built once per kernel call from an exponent table.
//
//   exponents  (n_terms, n_labels) int32, row-major: e_ka >= 0, the power of label a in term k.
//
// The derivative dv_k/dx_a is non-zero only where e_ka > 0; those (k, a) pairs are listed in
// `deriv_term` / `deriv_label` so a Jacobian touches only the terms that contain a label
// (for a quadratic model in L labels that is ~L+1 of the ~L^2/2 terms per label).
struct Polynomial {
  index_t n_terms = 0;
  index_t n_labels = 0;
  std::vector<std::int32_t> exponents;    // (n_terms, n_labels)
  std::vector<std::int32_t> max_power;    // (n_labels,)
  std::vector<index_t> deriv_term;        // (n_deriv,)
  std::vector<index_t> deriv_label;       // (n_deriv,)

  Polynomial(const std::int32_t* exponents_in, index_t n_terms_in, index_t n_labels_in)
      : n_terms(n_terms_in), n_labels(n_labels_in),
        exponents(exponents_in, exponents_in + n_terms_in * n_labels_in),
        max_power(n_labels_in, 0) {
    for (index_t k = 0; k < n_terms; ++k)
      for (index_t a = 0; a < n_labels; ++a) {
        const std::int32_t e = exponents[k * n_labels + a];
        max_power[a] = std::max(max_power[a], e);
        if (e > 0) {
          deriv_term.push_back(k);
          deriv_label.push_back(a);
        }
      }
  }

  index_t n_deriv() const { return static_cast<index_t>(deriv_term.size()); }

  // Powers x_a^0 .. x_a^max_power[a], stored label after label in `powers`
  // (size sum_a (max_power[a] + 1)); `offsets` gives where each label's run starts.
  void fill_powers(const double* x, std::vector<double>& powers, std::vector<index_t>& offsets) const {
    offsets.resize(n_labels);
    index_t total = 0;
    for (index_t a = 0; a < n_labels; ++a) {
      offsets[a] = total;
      total += max_power[a] + 1;
    }
    powers.resize(total);
    for (index_t a = 0; a < n_labels; ++a) {
      double* p = powers.data() + offsets[a];
      p[0] = 1.0;
      for (std::int32_t e = 1; e <= max_power[a]; ++e) p[e] = p[e - 1] * x[a];
    }
  }

  // Evaluate the terms and, if `deriv_out` is not null, the non-zero derivatives.
  //   x          (n_labels,)  scaled labels
  //   terms_out  (n_terms,)   v_k(x)
  //   deriv_out  (n_deriv,)   dv_k/dx_a for the listed (deriv_term, deriv_label) pairs
  //   powers, offsets: scratch reused between calls
  void evaluate(const double* x, double* terms_out, double* deriv_out,
                std::vector<double>& powers, std::vector<index_t>& offsets) const {
    fill_powers(x, powers, offsets);
    for (index_t k = 0; k < n_terms; ++k) {
      double v = 1.0;
      for (index_t a = 0; a < n_labels; ++a) v *= powers[offsets[a] + exponents[k * n_labels + a]];
      terms_out[k] = v;
    }
    if (deriv_out == nullptr) return;
    for (index_t d = 0; d < n_deriv(); ++d) {
      const index_t k = deriv_term[d], a_d = deriv_label[d];
      double v = 1.0;
      for (index_t a = 0; a < n_labels; ++a) {
        const std::int32_t e = exponents[k * n_labels + a];
        v *= (a == a_d) ? e * powers[offsets[a] + e - 1] : powers[offsets[a] + e];
      }
      deriv_out[d] = v;
    }
  }
};

}  // namespace starlabel
