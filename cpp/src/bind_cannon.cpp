// Bindings for The Cannon's kernels: checks, output allocation, GIL release. No math.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

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

py::tuple fit(const py::handle& exponents_in, const py::handle& theta_t_in,
              const py::handle& s2_in, const py::handle& flux_in, const py::handle& ivar_in,
              const py::handle& initial_in, const py::handle& lower_in,
              const py::handle& upper_in, int max_iter, bool quadratic_form, int n_threads) {
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

  bind::LMResultArrays result(n_spectra, n_labels);
  const LMOutputs out = result.outputs();
  LMOptions options;
  options.max_iter = max_iter;
  // The Gram objective forms theta-row products once per batch for all its spectra: more
  // spectra share them (17 labels, 1 thread: 16 -> 32 spectra, 12.8 -> 9.4 ms per spectrum).
  // Its results do not depend on the batch (see CannonQuadraticObjective::begin_batch).
  if (quadratic_form) options.batch = 32;
  const double* lo = bind::data_or_null(lower);
  const double* hi = bind::data_or_null(upper);
  Interrupt interrupt = bind::python_interrupt();
  {
    py::gil_scoped_release release;
    if (quadratic_form) {
      const CannonQuadraticObjective objective{poly, theta_t.data(), flux.data(), ivar.data(),
                                               s2.data(), n_pixels, n_spectra};
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
        py::arg("upper"), py::arg("max_iter"), py::arg("quadratic_form"), py::arg("n_threads"));
}
