// Bindings for fitting observed spectra (spectrum_fit.hpp): checks, output allocation, GIL
// release. No math. The emulator arrives as a dict {"kind": ..., arrays} built by
// starlabel.fast.fitting, every array float64 (the fit works in double whatever the model's
// storage dtype) but one: "perpixel" (w0, b0, w1, b1, and w2, b2 or None), "mlp" (weights,
// biases, activation, slope, and last_weights_f32: a float32 network's last layer as stored,
// for its Jacobian, or None) or "cannon" (exponents, theta_t).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "checks.hpp"
#include "starlabel/cannon_model.hpp"
#include "starlabel/jacobian_memory.hpp"
#include "starlabel/lm.hpp"
#include "starlabel/mlp.hpp"
#include "starlabel/perpixel_network.hpp"
#include "starlabel/polynomial.hpp"
#include "starlabel/spectrum_fit.hpp"

namespace py = pybind11;
using namespace starlabel;
using bind::ANY;
using bind::require;
using bind::require_optional;

namespace {

// Spectra per LM batch. A spectrum's arithmetic depends on which spectra share its batch (the
// emulator runs the batch as one matrix product), so starlabel.distributed cuts work on
// multiples of it to reproduce a local fit bit for bit: exported as FIT_SPECTRA_BATCH.
constexpr index_t FIT_SPECTRA_BATCH = 32;
// Outputs per tile of an emulator's last layer in a fit: the J tile (256 x 32 stars x n_labels
// floats) stays in L2.
constexpr index_t FIT_PIXEL_BLOCK = 256;

// An emulator for ShiftedSpectrumModel from a batched kernel called with one thread (the
// fit's own OpenMP loop owns the threads).
template <class Forward>
struct Emulator {
  Forward forward;
  index_t n_labels, n_pixels;
  void spectra(const double* x, index_t n, double* flux, double* jac) const { forward(x, n, flux, jac); }
};

template <class Forward>
Emulator<Forward> make_emulator(Forward f, index_t n_labels, index_t n_pixels) {
  return Emulator<Forward>{f, n_labels, n_pixels};
}

// An MLP, which in a fit updates each spectrum's last Jacobian where that is cheaper.
struct MLPEmulator {
  const MLP<double>& net;
  index_t n_labels, n_pixels;
  using Memory = JacobianMemory<double>;

  MLPBlocking blocking(index_t n) const {
    MLPBlocking b;
    b.jac_columns = n * n_labels;  // one star tile: the weights stream once per batch
    b.pixel_block = FIT_PIXEL_BLOCK;
    return b;
  }
  void spectra(const double* x, index_t n, double* flux, double* jac) const {
    mlp_forward(net, x, n, flux, jac, 1, blocking(n));
  }
  void spectra(const double* x, const index_t* keys, index_t n, double* flux, Memory& memory,
               EitherPrecision<double>* jac, bool defer) const {
    mlp_forward_remembered(net, x, keys, n, flux, jac, memory, blocking(n), defer);
  }
  void complete(Memory& memory, index_t row0, index_t row1, index_t* ready) const {
    complete_jacobians(net, memory, row0, row1, ready);
  }
};

py::object item(const py::dict& spec, const char* key) {
  if (!spec.contains(key)) throw py::value_error(std::string("emulator lacks '") + key + "'");
  return spec[key];
}

// Build the emulator described by `spec` and call visit(emulator). reused: it will be evaluated
// many times (an LM fit), so an MLP's last layer is packed for its products once, here.
template <class Visitor>
void with_emulator(const py::dict& spec, bool reused, Visitor&& visit) {
  const std::string kind = py::str(item(spec, "kind"));
  if (kind == "perpixel") {
    const bind::PerPixelArrays<double> arrays(item(spec, "w0"), item(spec, "b0"),
                                              item(spec, "w1"), item(spec, "b1"),
                                              item(spec, "w2"), item(spec, "b2"));
    const PerPixelNetwork<double> net = arrays.view();
    visit(make_emulator([net](const double* x, index_t n, double* f, double* j) {
      perpixel_forward(net, x, n, f, j, 1);
    }, net.n_labels, net.n_pixels));
  } else if (kind == "mlp") {
    const bind::NetworkArrays<double> arrays(item(spec, "weights"), item(spec, "biases"));
    MLP<double> net = arrays.view(bind::activation_from(item(spec, "activation").cast<int>()),
                                  item(spec, "slope").cast<double>());
    std::optional<py::array_t<float>> last_f32;  // a float32 network's last layer, as stored
    const py::object last = item(spec, "last_weights_f32");
    if (!last.is_none()) {
      const index_t L = net.n_layers();
      last_f32 = require<float>(last, "last_weights_f32", {net.sizes[L], net.sizes[L - 1]});
      net.last_weights_f32 = last_f32->data();
    }
    // 17 MB each for The Payne's network (the float32 one 8.7); kept by the calling thread,
    // as the core's other buffers, so that a call does not fault in fresh pages for them
    thread_local PackedMatrix<double, Eigen::RowMajor> packed;
    thread_local PackedMatrix<float, Eigen::RowMajor> packed_f32;
    thread_local std::vector<double> transposed;
    if (reused) {
      const index_t L = net.n_layers(), H = net.sizes[L - 1];
      py::gil_scoped_release release;
      packed.reset(net.n_out(), H, FIT_PIXEL_BLOCK, FIT_SPECTRA_BATCH);
      packed.pack(net.weights[L - 1], H);
      net.packed_last = &packed;
      if (net.last_weights_f32) {
        packed_f32.reset(net.n_out(), H, FIT_PIXEL_BLOCK, FIT_SPECTRA_BATCH);
        packed_f32.pack(net.last_weights_f32, H);
        net.packed_last_f32 = &packed_f32;
      }
      keep_transposed_last_layer(net, transposed);
    }
    visit(MLPEmulator{net, net.n_in(), net.n_out()});
  } else if (kind == "cannon") {
    auto exponents = require<std::int32_t>(item(spec, "exponents"), "exponents", {ANY, ANY});
    const index_t T = exponents.shape(0), L = exponents.shape(1);
    auto theta_t = require<double>(item(spec, "theta_t"), "theta_t", {T, ANY});
    const Polynomial poly = bind::polynomial_from(exponents);
    const CannonSpectrumModel model{poly, theta_t.data(), theta_t.shape(1), {}, {}};
    const CannonSpectrumModel* mp = &model;
    visit(make_emulator([mp](const double* x, index_t n, double* f, double* j) {
      cannon_predict(*mp, x, n, f, j, 1);
    }, L, theta_t.shape(1)));
  } else {
    throw py::value_error("emulator kind must be 'perpixel', 'mlp' or 'cannon', got '" + kind + "'");
  }
}

// The layout arrays, checked, and the FitLayout that points into them.
struct Layout {
  py::array_t<double> model_wave, obs_wave, coord;
  py::array_t<std::int32_t> segment;
  std::optional<py::array_t<double>> kernels;
  std::optional<py::array_t<std::int64_t>> kernel_segments;
  FitLayout view;

  Layout(const py::handle& mw, const py::handle& ow, const py::handle& seg, const py::handle& co,
         index_t n_segments, index_t n_coef, bool fit_rv, index_t n_labels,
         const py::handle& kern = py::none(), const py::handle& kseg = py::none(),
         index_t n_kernel_rows = 1, const py::handle& sigma = py::none(),
         const py::handle& vsini = py::none()) {
    model_wave = require<double>(mw, "model_wavelength", {ANY});
    obs_wave = require<double>(ow, "wavelength", {ANY});
    const index_t n_obs = obs_wave.shape(0), n_model = model_wave.shape(0);
    segment = require<std::int32_t>(seg, "segment_index", {n_obs});
    coord = require<double>(co, "segment_coord", {n_obs});
    if (n_segments < 0 || n_coef < 0) throw py::value_error("n_segments and n_coef must be >= 0");
    const std::int32_t* s = segment.data();
    for (index_t p = 0; p < n_obs; ++p)
      if (s[p] < -1 || s[p] >= n_segments)
        throw py::value_error("segment_index must lie in [-1, n_segments)");
    view = FitLayout{model_wave.data(), n_model, obs_wave.data(), n_obs, s,
                     coord.data(), n_segments, n_coef, fit_rv, n_labels};
    if (!sigma.is_none()) {  // (step km/s per model pixel, taps each side) of a fitted sigma
      const auto [step, half] = sigma.cast<std::pair<double, index_t>>();
      if (!(step > 0.0) || !std::isfinite(step) || half < 0 || half > 100000)
        throw py::value_error("fit_sigma must be (step > 0 km/s, 0 <= half-width <= 1e5 pixels)");
      view.fit_sigma = true;
      view.velocity_step = step;
      view.sigma_half = half;
    }
    if (!vsini.is_none()) {  // (step, taps each side, limb darkening) of a fitted vsini
      const auto [step, half, eps] = vsini.cast<std::tuple<double, index_t, double>>();
      if (!(step > 0.0) || !std::isfinite(step) || half < 0 || half > 100000 || !(eps >= 0.0) ||
          !(eps <= 1.0))
        throw py::value_error("fit_vsini must be (step > 0 km/s, 0 <= half-width <= 1e5 pixels, "
                              "0 <= limb darkening <= 1)");
      if (view.fit_sigma && step != view.velocity_step)
        throw py::value_error("fit_sigma and fit_vsini must have the same velocity step");
      view.fit_vsini = true;
      view.velocity_step = step;
      view.vsini_half = half;
      view.limb_darkening = eps;
    }
    kernels = require_optional<double>(kern, "kernels", {ANY, ANY});
    if (kernels || view.fits_broadening()) read_kernel_segments(kseg, n_model);
    if (!kernels) return;
    const index_t rows = kernels->shape(0), n_taps = kernels->shape(1);
    if (rows != 1 && rows != n_kernel_rows)
      throw py::value_error("kernels must have 1 or " + std::to_string(n_kernel_rows) + " rows");
    if (n_taps % 2 != 1) throw py::value_error("kernels must have an odd number of taps");
    const double* k = kernels->data();
    for (index_t r = 0; r < rows; ++r) {
      for (index_t t = 0; t < n_taps; ++t)
        if (!(k[r * n_taps + t] >= 0.0) || !std::isfinite(k[r * n_taps + t]))
          throw py::value_error("kernels must be finite and >= 0");
      if (!(k[r * n_taps + n_taps / 2] > 0.0))  // keeps every renormalization finite
        throw py::value_error("kernels must be > 0 at their centre tap");
    }
    view.kernels = k;
    view.n_taps = n_taps;
    view.kernel_stride = rows == 1 ? 0 : n_taps;
  }

 private:
  void read_kernel_segments(const py::handle& kseg, index_t n_model) {
    kernel_segments = require<std::int64_t>(kseg, "kernel_segments", {ANY, 2});
    const std::int64_t* g = kernel_segments->data();
    const index_t n_kseg = kernel_segments->shape(0);
    for (index_t i = 0; i < n_kseg; ++i)  // every model pixel in exactly one run, in order
      if (g[2 * i] != (i == 0 ? 0 : g[2 * i - 1]) || g[2 * i + 1] <= g[2 * i])
        throw py::value_error("kernel_segments must split [0, n_model) into consecutive runs");
    if (n_kseg == 0 || g[2 * n_kseg - 1] != n_model)
      throw py::value_error("kernel_segments must split [0, n_model) into consecutive runs");
    view.kernel_segments = g;
    view.n_kernel_segments = n_kseg;
  }
};

void check_emulator_grid(index_t n_pixels, const Layout& layout) {
  if (n_pixels != layout.view.n_model)
    throw py::value_error("model_wavelength has " + std::to_string(layout.view.n_model) +
                          " pixels, the emulator " + std::to_string(n_pixels));
}

py::object spectrum_model(const py::dict& spec, const py::handle& mw, const py::handle& ow,
                          const py::handle& seg, const py::handle& co, index_t n_segments,
                          index_t n_coef, bool fit_rv, const py::handle& params_in,
                          bool with_jacobian, const py::handle& kernels,
                          const py::handle& kernel_segments, const py::handle& fit_sigma,
                          const py::handle& fit_vsini, int n_threads) {
  py::object result;
  with_emulator(spec, false, [&](const auto& emu) {
    const index_t np = emu.n_labels + (fit_rv ? 1 : 0) + (fit_sigma.is_none() ? 0 : 1) +
                       (fit_vsini.is_none() ? 0 : 1) + n_segments * n_coef;
    auto params = require<double>(params_in, "params", {ANY, np});
    const index_t n = params.shape(0);
    const Layout layout(mw, ow, seg, co, n_segments, n_coef, fit_rv, emu.n_labels, kernels,
                        kernel_segments, n, fit_sigma, fit_vsini);
    check_emulator_grid(emu.n_pixels, layout);
    const ShiftedSpectrumModel<std::decay_t<decltype(emu)>> model(emu, layout.view);
    const index_t n_obs = layout.view.n_obs;
    py::array_t<double> flux({n, n_obs});
    py::array_t<double> jac = with_jacobian ? py::array_t<double>({n, n_obs, np}) : py::array_t<double>();
    Interrupt interrupt = bind::python_interrupt();
    {
      py::gil_scoped_release release;
      spectrum_model_evaluate(model, params.data(), n, flux.mutable_data(),
                              with_jacobian ? jac.mutable_data() : nullptr, n_threads, &interrupt);
    }
    bind::raise_if_interrupted(interrupt);
    result = with_jacobian ? py::object(py::make_tuple(flux, jac)) : py::object(flux);
  });
  return result;
}

py::tuple fit(const py::dict& spec, const py::handle& mw, const py::handle& ow,
              const py::handle& seg, const py::handle& co, index_t n_segments, index_t n_coef,
              bool fit_rv, const py::handle& flux_in, const py::handle& ivar_in,
              const py::handle& extra_in, const py::handle& initial_in,
              const py::handle& lower_in, const py::handle& upper_in, int max_iter,
              const py::handle& kernels, const py::handle& kernel_segments,
              const py::handle& fit_sigma, const py::handle& fit_vsini, int n_threads) {
  py::tuple result;
  with_emulator(spec, true, [&](const auto& emu) {
    auto flux = require<double>(flux_in, "flux", {ANY, ANY});
    const index_t n_spectra = flux.shape(0);
    const Layout layout(mw, ow, seg, co, n_segments, n_coef, fit_rv, emu.n_labels, kernels,
                        kernel_segments, n_spectra, fit_sigma, fit_vsini);
    check_emulator_grid(emu.n_pixels, layout);
    using Model = ShiftedSpectrumModel<std::decay_t<decltype(emu)>>;
    const Model model(emu, layout.view);
    const index_t np = model.n_params(), n_obs = layout.view.n_obs;
    flux = require<double>(flux_in, "flux", {n_spectra, n_obs});
    auto ivar = require<double>(ivar_in, "ivar", {n_spectra, n_obs});
    auto extra = require_optional<double>(extra_in, "extra_variance", {n_obs});
    auto initial = require<double>(initial_in, "initial", {n_spectra, ANY, np});
    const index_t n_starts = initial.shape(1);
    if (n_starts < 1) throw py::value_error("initial must hold at least one starting point");
    auto lower = require_optional<double>(lower_in, "lower", {np});
    auto upper = require_optional<double>(upper_in, "upper", {np});
    if (max_iter < 1) throw py::value_error("max_iter must be >= 1");

    bind::LMResultArrays arrays(n_spectra, np);
    const LMOutputs out = arrays.outputs();
    LMOptions options;
    options.max_iter = max_iter;
    // 32 spectra per batch: the emulator's last layer (8.7 MB for The Payne's network) is
    // streamed from memory once per batch and LM step, so more spectra per batch means less
    // traffic per spectrum (25-label fits: ~10% faster than 16 on 2 threads), while the
    // batch's model spectra and Jacobians (n_model * (n_labels + 1) doubles each) stay
    // ~50 MB per thread. The emulator's Jacobian costs n_labels times its spectrum:
    // trial steps are judged on the spectrum alone.
    options.batch = FIT_SPECTRA_BATCH;
    options.jacobian_after_accept = true;
    Interrupt interrupt = bind::python_interrupt();
    {
      py::gil_scoped_release release;
      const PixelObjective<Model> objective{model, flux.data(), ivar.data(),
                                            bind::data_or_null(extra), n_spectra};
      fit_lm(objective, initial.data(), n_starts, bind::data_or_null(lower),
             bind::data_or_null(upper), options, n_threads, out, &interrupt);
    }
    bind::raise_if_interrupted(interrupt);
    result = arrays.as_tuple();
  });
  return result;
}

py::tuple rv_grid(const py::handle& mw, const py::handle& ow, const py::handle& seg,
                  const py::handle& co, index_t n_segments, index_t n_coef,
                  const py::handle& templates_in, const py::handle& flux_in,
                  const py::handle& weight_in, const py::handle& velocities_in, int n_threads) {
  const Layout layout(mw, ow, seg, co, n_segments, n_coef, false, 0);
  const index_t n_obs = layout.view.n_obs, n_model = layout.view.n_model;
  auto flux = require<double>(flux_in, "flux", {ANY, n_obs});
  const index_t n_spectra = flux.shape(0);
  auto weight = require<double>(weight_in, "weight", {n_spectra, n_obs});
  auto templates = require<double>(templates_in, "templates", {n_spectra, ANY, n_model});
  const index_t n_templates = templates.shape(1);
  auto velocities = require<double>(velocities_in, "velocities", {ANY});
  const index_t n_v = velocities.shape(0), n_cc = n_segments * n_coef;
  py::array_t<double> chi2({n_spectra, n_templates, n_v});
  py::array_t<std::int64_t> best({n_spectra, n_templates});
  py::array_t<double> coef({n_spectra, n_templates, n_cc});
  Interrupt interrupt = bind::python_interrupt();
  {
    py::gil_scoped_release release;
    rv_chi2_grid(layout.view, templates.data(), n_spectra, n_templates, flux.data(), weight.data(),
                 velocities.data(), n_v, chi2.mutable_data(), best.mutable_data(),
                 coef.mutable_data(), n_threads, &interrupt);
  }
  bind::raise_if_interrupted(interrupt);
  return py::make_tuple(chi2, best, coef);
}

// The emulator along a sequence of calls as a fit makes them, one memory throughout (for
// tests: an updated Jacobian must equal the whole one, a kept spectrum the computed one).
//   x (n_calls, n, n_labels), keys (n_calls, n), jacobian (n_calls,) bools: whether a call
//   asks for Jacobians (else its jac is NaN) -> flux (n_calls, n, n_pixels),
//   jac (n_calls, n, n_pixels, n_labels), Jacobians computed whole, Jacobians updated
// deferred: calls for Jacobians leave their updates pending (as in a fit); every fourth one is
// completed pixel by pixel in a scattered order starting mid-spectrum, the others (when the
// next call asks for none: it would replace them) by the next call, before the Jacobians are
// copied.
py::tuple remembered(const py::dict& spec, const py::handle& x_in, const py::handle& keys_in,
                     const std::vector<bool>& jacobian, bool deferred) {
  py::tuple result;
  with_emulator(spec, true, [&](const auto& emu) {
    using E = std::decay_t<decltype(emu)>;
    if constexpr (!spectrum_detail::MemoryOf<E>::remembers) {
      throw py::value_error("only an MLP emulator remembers its Jacobians");
    } else {
      const index_t L = emu.n_labels, P = emu.n_pixels;
      auto x = require<double>(x_in, "x", {ANY, ANY, L});
      const index_t n_calls = x.shape(0), n = x.shape(1);
      auto keys = require<std::int64_t>(keys_in, "keys", {n_calls, n});
      if (index_t(jacobian.size()) != n_calls)
        throw py::value_error("jacobian must hold one bool per call");
      for (index_t c = 0; c < n_calls; ++c)
        for (index_t i = 0; i < n && jacobian[c]; ++i)
          for (index_t j = 0; j < i; ++j)
            if (keys.at(c, i) == keys.at(c, j))
              throw py::value_error("keys must be distinct within a call for Jacobians");
      py::array_t<double> flux({n_calls, n, P}), jac({n_calls, n, P, L});
      typename E::Memory memory;
      {
        py::gil_scoped_release release;
        std::vector<EitherPrecision<double>> jac_of(n);
        std::vector<index_t> call_keys(n);
        index_t unread = -1;  // a call whose Jacobians are copied after the next call
        auto copy_jacobians = [&](index_t c) {
          for (index_t i = 0; i < n; ++i) {
            double* dst = jac.mutable_data() + (c * n + i) * P * L;
            if (jac_of[i].values_f32)
              std::copy_n(jac_of[i].values_f32, P * L, dst);
            else
              std::copy_n(jac_of[i].values, P * L, dst);
          }
        };
        for (index_t c = 0; c < n_calls; ++c) {
          std::copy_n(keys.data() + c * n, n, call_keys.data());
          emu.spectra(x.data() + c * n * L, call_keys.data(), n, flux.mutable_data() + c * n * P,
                      memory, jacobian[c] ? jac_of.data() : nullptr, deferred);
          if (unread >= 0) copy_jacobians(unread);  // a call without Jacobians came between
          unread = -1;
          if (!jacobian[c]) {
            std::fill_n(jac.mutable_data() + c * n * P * L, n * P * L,
                        std::numeric_limits<double>::quiet_NaN());
          } else if (!deferred || c % 4 == 0 || c + 1 == n_calls || jacobian[c + 1]) {
            index_t ready[2] = {0, 0};
            for (index_t j = 0; j < P && deferred; ++j) {
              const index_t p = (P / 2 + j * 7919) % P;  // each pixel once: 7919 is prime
              if (p < ready[0] || p >= ready[1]) emu.complete(memory, p, p, ready);
            }
            copy_jacobians(c);
          } else {
            unread = c;
          }
        }
      }
      result = py::make_tuple(flux, jac, memory.n_whole, memory.n_updated);
    }
  });
  return result;
}

}  // namespace

void bind_fit(py::module_& m) {
  m.attr("FIT_SPECTRA_BATCH") = FIT_SPECTRA_BATCH;
  m.def("fit_spectrum_model", &spectrum_model, py::arg("emulator"), py::arg("model_wavelength"),
        py::arg("wavelength"), py::arg("segment_index"), py::arg("segment_coord"),
        py::arg("n_segments"), py::arg("n_coef"), py::arg("fit_rv"), py::arg("params"),
        py::arg("with_jacobian"), py::arg("kernels"), py::arg("kernel_segments"),
        py::arg("fit_sigma"), py::arg("fit_vsini"), py::arg("n_threads"));
  m.def("fit_spectra", &fit, py::arg("emulator"), py::arg("model_wavelength"),
        py::arg("wavelength"), py::arg("segment_index"), py::arg("segment_coord"),
        py::arg("n_segments"), py::arg("n_coef"), py::arg("fit_rv"), py::arg("flux"),
        py::arg("ivar"), py::arg("extra_variance"), py::arg("initial"), py::arg("lower"),
        py::arg("upper"), py::arg("max_iter"), py::arg("kernels"), py::arg("kernel_segments"),
        py::arg("fit_sigma"), py::arg("fit_vsini"), py::arg("n_threads"));
  m.def("fit_rv_grid", &rv_grid, py::arg("model_wavelength"), py::arg("wavelength"),
        py::arg("segment_index"), py::arg("segment_coord"), py::arg("n_segments"),
        py::arg("n_coef"), py::arg("templates"), py::arg("flux"), py::arg("weight"),
        py::arg("velocities"), py::arg("n_threads"));
  m.def("fit_emulator_remembered", &remembered, py::arg("emulator"), py::arg("x"),
        py::arg("keys"), py::arg("jacobian"), py::arg("deferred") = false);
}
