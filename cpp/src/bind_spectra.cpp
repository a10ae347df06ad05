// Bindings for the spectrum kernels (resampling): checks, output allocation, GIL release.
// No math.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include "checks.hpp"
#include "starlabel/convolve.hpp"
#include "starlabel/resample.hpp"
#include "starlabel/running_quantile.hpp"

namespace py = pybind11;
using namespace starlabel;
using bind::ANY;
using bind::require;

namespace {

// segments (n_segments, 2): increasing, disjoint pixel ranges [start, stop) inside the spectrum.
void check_segments(const std::int64_t* seg, index_t n_segments, index_t n_pixels) {
  for (index_t g = 0; g < n_segments; ++g)
    if (seg[2 * g] < 0 || seg[2 * g] > seg[2 * g + 1] || seg[2 * g + 1] > n_pixels ||
        (g > 0 && seg[2 * g] < seg[2 * g - 1]))
      throw py::value_error("segments must be increasing, disjoint ranges inside [0, n_pixels]");
}

py::tuple resample(const py::handle& in_lo_in, const py::handle& in_hi_in,
                   const py::handle& flux_in, const py::handle& ivar_in,
                   const py::handle& out_lo_in, const py::handle& out_hi_in,
                   double min_coverage, int n_threads) {
  auto flux = require<double>(flux_in, "flux", {ANY, ANY});
  const index_t n_spectra = flux.shape(0), n_in = flux.shape(1);
  auto ivar = require<double>(ivar_in, "ivar", {n_spectra, n_in});
  auto in_lo = require<double>(in_lo_in, "in_lo", {ANY, n_in});
  const index_t n_rows = in_lo.shape(0);
  if (n_rows != 1 && n_rows != n_spectra)
    throw py::value_error("in_lo must have 1 or n_spectra rows");
  auto in_hi = require<double>(in_hi_in, "in_hi", {n_rows, n_in});
  auto out_lo = require<double>(out_lo_in, "out_lo", {ANY});
  const index_t n_out = out_lo.shape(0);
  auto out_hi = require<double>(out_hi_in, "out_hi", {n_out});
  if (!(min_coverage > 0.0 && min_coverage <= 1.0))
    throw py::value_error("min_coverage must be in (0, 1]");
  py::array_t<double> flux_out({n_spectra, n_out});
  py::array_t<double> ivar_out({n_spectra, n_out});
  const ResampleGrid out{out_lo.data(), out_hi.data(), n_out};
  {
    py::gil_scoped_release release;
    resample_spectra(in_lo.data(), in_hi.data(), n_rows == 1 ? 0 : n_in, n_in, flux.data(),
                     ivar.data(), n_spectra, out, min_coverage, n_threads,
                     flux_out.mutable_data(), ivar_out.mutable_data());
  }
  return py::make_tuple(flux_out, ivar_out);
}

py::tuple convolve(const py::handle& flux_in, const py::handle& ivar_in,
                   const py::handle& kernels_in, const py::handle& segments_in, double min_weight,
                   int n_threads) {
  auto flux = require<double>(flux_in, "flux", {ANY, ANY});
  const index_t n_spectra = flux.shape(0), n_pixels = flux.shape(1);
  auto ivar = require<double>(ivar_in, "ivar", {n_spectra, n_pixels});
  auto kernels = require<double>(kernels_in, "kernels", {ANY, ANY});
  const index_t n_rows = kernels.shape(0), n_taps = kernels.shape(1);
  if (n_rows != 1 && n_rows != n_spectra)
    throw py::value_error("kernels must have 1 or n_spectra rows");
  if (n_taps < 1 || n_taps % 2 == 0)
    throw py::value_error("kernels must have an odd number of taps");
  auto segments = require<std::int64_t>(segments_in, "segments", {ANY, 2});
  const index_t n_segments = segments.shape(0);
  const std::int64_t* seg = segments.data();
  check_segments(seg, n_segments, n_pixels);
  if (!(min_weight > 0.0 && min_weight <= 1.0))
    throw py::value_error("min_weight must be in (0, 1]");
  py::array_t<double> flux_out({n_spectra, n_pixels});
  py::array_t<double> ivar_out({n_spectra, n_pixels});
  {
    py::gil_scoped_release release;
    convolve_spectra(flux.data(), ivar.data(), n_spectra, n_pixels, kernels.data(),
                     n_rows == 1 ? 0 : n_taps, n_taps, seg, n_segments, min_weight, n_threads,
                     flux_out.mutable_data(), ivar_out.mutable_data());
  }
  return py::make_tuple(flux_out, ivar_out);
}

py::array_t<double> quantile(const py::handle& flux_in, const py::handle& ivar_in,
                             const py::handle& segments_in, index_t half, double q,
                             int n_threads) {
  auto flux = require<double>(flux_in, "flux", {ANY, ANY});
  const index_t n_spectra = flux.shape(0), n_pixels = flux.shape(1);
  auto ivar = require<double>(ivar_in, "ivar", {n_spectra, n_pixels});
  auto segments = require<std::int64_t>(segments_in, "segments", {ANY, 2});
  const index_t n_segments = segments.shape(0);
  const std::int64_t* seg = segments.data();
  check_segments(seg, n_segments, n_pixels);
  if (half < 0) throw py::value_error("half must be >= 0");
  if (!(q >= 0.0 && q <= 1.0)) throw py::value_error("quantile must be in [0, 1]");
  py::array_t<double> out({n_spectra, n_pixels});
  bool ok;
  {
    py::gil_scoped_release release;
    ok = running_quantile(flux.data(), ivar.data(), n_spectra, n_pixels, seg, n_segments, half,
                          q, n_threads, out.mutable_data());
  }
  if (!ok) throw std::bad_alloc();
  return out;
}

}  // namespace

void bind_spectra(py::module_& m) {
  m.def("resample", &resample, py::arg("in_lo"), py::arg("in_hi"), py::arg("flux"),
        py::arg("ivar"), py::arg("out_lo"), py::arg("out_hi"), py::arg("min_coverage"),
        py::arg("n_threads"));
  m.def("convolve", &convolve, py::arg("flux"), py::arg("ivar"), py::arg("kernels"),
        py::arg("segments"), py::arg("min_weight"), py::arg("n_threads"));
  m.def("running_quantile", &quantile, py::arg("flux"), py::arg("ivar"), py::arg("segments"),
        py::arg("half"), py::arg("quantile"), py::arg("n_threads"));
}
