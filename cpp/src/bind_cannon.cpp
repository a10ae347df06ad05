// Bindings for The Cannon's kernels: checks, output allocation, GIL release. No math.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <optional>
#include <string>
#include <vector>

#include "checks.hpp"
#include "starlabel/cannon_model.hpp"
#include "starlabel/cannon_train.hpp"
#include "starlabel/lm.hpp"

namespace py = pybind11;
using namespace starlabel;
using bind::ANY;
using bind::require;
using bind::require_optional;

namespace {

py::tuple train(const py::handle& design_in, const py::handle& monomials_in,
                const py::handle& gram_index_in, const py::handle& penalized_in,
                const py::handle& term_mask_in, const py::handle& flux_in,
                const py::handle& ivar_in, const py::handle& fixed_s2_in, double regularization,
                int n_threads) {
  auto design = require<double>(design_in, "design", {ANY, ANY});
  const index_t n_stars = design.shape(0), n_terms = design.shape(1);
  auto monomials = require<double>(monomials_in, "monomials", {n_stars, ANY});
  auto gram_index = require<std::int64_t>(gram_index_in, "gram_index", {n_terms, n_terms});
  auto penalized = require<std::uint8_t>(penalized_in, "penalized", {n_terms});
  auto flux = require<double>(flux_in, "flux", {n_stars, ANY});
  const index_t n_pixels = flux.shape(1);
  auto ivar = require<double>(ivar_in, "ivar", {n_stars, n_pixels});
  auto term_mask = require_optional<std::uint8_t>(term_mask_in, "term_mask", {n_pixels, n_terms});
  auto fixed_s2 = require_optional<double>(fixed_s2_in, "fixed_s2", {n_pixels});
  const index_t n_monomials = monomials.shape(1);
  const std::int64_t* gi = gram_index.data();
  for (index_t i = 0; i < n_terms * n_terms; ++i)
    if (gi[i] < 0 || gi[i] >= n_monomials)
      throw py::value_error("gram_index must lie in [0, n_monomials)");
  if (!(regularization >= 0.0)) throw py::value_error("regularization must be >= 0");

  py::array_t<double> theta({n_pixels, n_terms});
  py::array_t<double> s2(n_pixels);
  py::array_t<std::int8_t> status(n_pixels);
  CannonTrainingSet data{design.data(), monomials.data(), gi, penalized.data(),
                         bind::data_or_null(term_mask), flux.data(), ivar.data(),
                         n_stars, n_pixels, n_terms, n_monomials};
  TrainOptions options;
  options.regularization = regularization;
  Interrupt interrupt = bind::python_interrupt();
  {
    py::gil_scoped_release release;
    train_cannon(data, bind::data_or_null(fixed_s2), options, n_threads, theta.mutable_data(),
                 s2.mutable_data(), status.mutable_data(), &interrupt);
  }
  bind::raise_if_interrupted(interrupt);
  return py::make_tuple(theta, s2, status);
}

py::object predict(const py::handle& exponents_in, const py::handle& theta_t_in,
                   const py::handle& x_in, bool with_jacobian, int n_threads) {
  auto exponents = require<std::int32_t>(exponents_in, "exponents", {ANY, ANY});
  const index_t n_terms = exponents.shape(0), n_labels = exponents.shape(1);
  auto theta_t = require<double>(theta_t_in, "theta_t", {n_terms, ANY});
  auto x = require<double>(x_in, "x", {ANY, n_labels});
  const index_t n_stars = x.shape(0), n_pixels = theta_t.shape(1);
  const Polynomial poly = bind::polynomial_from(exponents);
  const CannonSpectrumModel model{poly, theta_t.data(), n_pixels, {}, {}};
  py::array_t<double> flux({n_stars, n_pixels});
  py::array_t<double> jac = with_jacobian ? py::array_t<double>({n_stars, n_pixels, n_labels})
                                          : py::array_t<double>();
  {
    py::gil_scoped_release release;
    cannon_predict(model, x.data(), n_stars, flux.mutable_data(),
                   with_jacobian ? jac.mutable_data() : nullptr, n_threads);
  }
  if (with_jacobian) return py::make_tuple(flux, jac);
  return std::move(flux);
}

// The chi2 polynomial's tables (starlabel._chi2_polynomial.Chi2Polynomial without its
// monomials), checked: every index in range, every parent before its monomial.
struct PolynomialArrays {
  std::vector<py::array_t<std::int64_t>> arrays;
  Chi2PolynomialTables tables;

  PolynomialArrays(const py::tuple& in, index_t n_terms, index_t n_labels) {
    if (in.size() != 6)
      throw py::value_error("polynomial must be (parent, pair_monomial, grad_basis, "
                            "grad_entries, hess_basis, hess_entries)");
    auto parent = require<std::int64_t>(in[0], "parent", {ANY, 2});
    const index_t n_monomials = parent.shape(0);
    auto pair_monomial = require<std::int64_t>(in[1], "pair_monomial", {n_terms, n_terms});
    auto grad_basis = require<std::int64_t>(in[2], "grad_basis", {ANY});
    auto grad_entries = require<std::int64_t>(in[3], "grad_entries", {ANY, 4});
    auto hess_basis = require<std::int64_t>(in[4], "hess_basis", {ANY});
    auto hess_entries = require<std::int64_t>(in[5], "hess_entries", {ANY, 4});
    if (n_monomials < 1 || parent.at(0, 0) != -1 || parent.at(0, 1) != -1)
      throw py::value_error("parent: row 0 must be the constant, (-1, -1)");
    for (index_t m = 1; m < n_monomials; ++m)
      if (parent.at(m, 0) < 0 || parent.at(m, 0) >= m || parent.at(m, 1) < 0 ||
          parent.at(m, 1) >= n_labels)
        throw py::value_error("parent: each monomial needs an earlier parent and a label");
    check_range(pair_monomial, 0, n_monomials, "pair_monomial");
    if (pair_monomial.at(0, 0) != 0) throw py::value_error("pair_monomial[0, 0] must be 0");
    check_range(grad_basis, 0, n_monomials, "grad_basis");
    check_range(hess_basis, 0, n_monomials, "hess_basis");
    check_entries(grad_entries, n_labels, grad_basis.shape(0), n_monomials, "grad_entries");
    check_entries(hess_entries, n_labels * (n_labels + 1) / 2, hess_basis.shape(0), n_monomials,
                  "hess_entries");
    tables = {n_monomials,         grad_basis.shape(0),  grad_entries.shape(0),
              hess_basis.shape(0), hess_entries.shape(0), parent.data(),
              pair_monomial.data(), grad_basis.data(),    grad_entries.data(),
              hess_basis.data(),   hess_entries.data()};
    arrays = {parent, pair_monomial, grad_basis, grad_entries, hess_basis, hess_entries};
  }

  static void check_range(const py::array_t<std::int64_t>& a, std::int64_t lo, std::int64_t hi,
                          const char* name) {
    const std::int64_t* d = a.data();
    for (py::ssize_t i = 0; i < a.size(); ++i)
      if (d[i] < lo || d[i] >= hi)
        throw py::value_error(std::string(name) + " holds an index out of range");
  }

  static void check_entries(const py::array_t<std::int64_t>& e, index_t n_rows, index_t n_columns,
                            index_t n_monomials, const char* name) {
    for (index_t i = 0; i < e.shape(0); ++i)
      if (e.at(i, 0) < 0 || e.at(i, 0) >= n_rows || e.at(i, 1) < 0 || e.at(i, 1) >= n_columns ||
          e.at(i, 2) < 0 || e.at(i, 2) >= n_monomials)
        throw py::value_error(std::string(name) + " holds an index out of range");
  }
};

py::tuple fit(const py::handle& exponents_in, const py::handle& theta_t_in,
              const py::handle& s2_in, const py::handle& flux_in, const py::handle& ivar_in,
              const py::handle& initial_in, const py::handle& lower_in,
              const py::handle& upper_in, int max_iter, const py::handle& polynomial_in,
              int n_threads) {
  auto exponents = require<std::int32_t>(exponents_in, "exponents", {ANY, ANY});
  const index_t n_terms = exponents.shape(0), n_labels = exponents.shape(1);
  auto theta_t = require<double>(theta_t_in, "theta_t", {n_terms, ANY});
  const index_t n_pixels = theta_t.shape(1);
  auto s2 = require<double>(s2_in, "s2", {n_pixels});
  auto flux = require<double>(flux_in, "flux", {ANY, n_pixels});
  const index_t n_spectra = flux.shape(0);
  auto ivar = require<double>(ivar_in, "ivar", {n_spectra, n_pixels});
  auto initial = require<double>(initial_in, "initial", {n_spectra, ANY, n_labels});
  const index_t n_starts = initial.shape(1);
  if (n_starts < 1) throw py::value_error("initial must hold at least one starting point");
  auto lower = require_optional<double>(lower_in, "lower", {n_labels});
  auto upper = require_optional<double>(upper_in, "upper", {n_labels});
  if (max_iter < 1) throw py::value_error("max_iter must be >= 1");
  const Polynomial poly = bind::polynomial_from(exponents);
  std::optional<PolynomialArrays> polynomial;
  if (!polynomial_in.is_none()) {
    if (!py::isinstance<py::tuple>(polynomial_in))
      throw py::type_error("polynomial must be None or a tuple of arrays");
    polynomial.emplace(py::reinterpret_borrow<py::tuple>(polynomial_in), n_terms, n_labels);
  }

  bind::LMResultArrays result(n_spectra, n_labels);
  const LMOutputs out = result.outputs();
  LMOptions options;
  options.max_iter = max_iter;
  // The polynomial objective forms the theta-row products (the same for every batch) once per
  // batch, so large models want large batches, each thread getting at least one. Measured on
  // 1000 spectra, 8575 pixels, 2 threads, alternating:
  // - 17 labels (5985 monomials): 2.3-2.5 ms per spectrum in batches of 64 against 2.5-3.0 in
  //   batches of 32; 2.31-2.65 in batches of 256 against 2.65-3.19 in batches of 64 (4 pairs),
  //   for a peak memory of 567 against 339 MB (the per-spectrum gradient and Hessian matrices,
  //   364 KB each);
  // - 3 labels (35 monomials): 0.09-0.10 in batches of 32 against 0.11-0.12 ms in batches of 64.
  // Its results do not depend on the batch (see CannonPolynomialObjective::begin_batch), so
  // the thread count may set it.
  if (polynomial) {
    if (polynomial->tables.n_monomials > 1000) {
      const index_t threads = resolve_threads(n_threads);
      const index_t per_thread = (n_spectra + threads - 1) / threads;
      options.batch = std::clamp<index_t>(CannonPolynomialObjective::padded_rows(per_thread),
                                          CannonPolynomialObjective::product_rows, 256);
    } else {
      options.batch = 32;
    }
  }
  const double* lo = bind::data_or_null(lower);
  const double* hi = bind::data_or_null(upper);
  Interrupt interrupt = bind::python_interrupt();
  {
    py::gil_scoped_release release;
    if (polynomial) {
      const CannonPolynomialObjective objective(poly, polynomial->tables, theta_t.data(),
                                                flux.data(), ivar.data(), s2.data(), n_pixels,
                                                n_spectra);
      fit_lm(objective, initial.data(), n_starts, lo, hi, options, n_threads, out, &interrupt);
    } else {
      CannonSpectrumModel model{poly, theta_t.data(), n_pixels, {}, {}};
      model.gather_by_label();
      const PixelObjective<CannonSpectrumModel> objective{model, flux.data(), ivar.data(),
                                                          s2.data(), n_spectra};
      fit_lm(objective, initial.data(), n_starts, lo, hi, options, n_threads, out, &interrupt);
    }
  }
  bind::raise_if_interrupted(interrupt);
  return result.as_tuple();
}

}  // namespace

void bind_cannon(py::module_& m) {
  // pixels per training block: a block's arithmetic depends on which pixels share it, so
  // starlabel.distributed splits training on multiples of it
  m.attr("CANNON_TRAIN_PIXEL_BLOCK") = TrainOptions().pixel_block;
  m.def("cannon_train", &train, py::arg("design"), py::arg("monomials"), py::arg("gram_index"),
        py::arg("penalized"), py::arg("term_mask"), py::arg("flux"), py::arg("ivar"),
        py::arg("fixed_s2"), py::arg("regularization"), py::arg("n_threads"));
  m.def("cannon_predict", &predict, py::arg("exponents"), py::arg("theta_t"), py::arg("x"),
        py::arg("with_jacobian"), py::arg("n_threads"));
  m.def("cannon_fit", &fit, py::arg("exponents"), py::arg("theta_t"), py::arg("s2"),
        py::arg("flux"), py::arg("ivar"), py::arg("initial"), py::arg("lower"),
        py::arg("upper"), py::arg("max_iter"), py::arg("polynomial"), py::arg("n_threads"));
}
