// Argument checks shared by the binding files: every array's dtype, contiguity and shape,
// with errors that name the argument. No math here.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <optional>
#include <string>
#include <vector>

#include "starlabel/common.hpp"
#include "starlabel/lm.hpp"
#include "starlabel/mlp.hpp"
#include "starlabel/perpixel_network.hpp"
#include "starlabel/polynomial.hpp"

namespace starlabel::bind {

namespace py = pybind11;

// A dimension that any size satisfies (it is then read back from the array).
constexpr index_t ANY = -1;

// Check that `array` is a C-contiguous array of T with the given shape (ANY matches any size)
// and return it typed. Raises TypeError (dtype, layout) or ValueError (shape).
template <class T>
py::array_t<T> require(const py::handle& obj, const char* name, std::vector<index_t> shape) {
  if (!py::isinstance<py::array>(obj))
    throw py::type_error(std::string(name) + " must be a numpy array");
  auto array = py::reinterpret_borrow<py::array>(obj);
  // equivalence, not identity: an array unpickled (e.g. sent to a Dask worker) carries its own
  // dtype object
  if (!py::array_t<T>::check_(array))
    throw py::type_error(std::string(name) + " must have dtype " +
                         std::string(py::str(py::dtype::of<T>())) + ", got " +
                         std::string(py::str(array.dtype())));
  if (!(array.flags() & py::array::c_style))
    throw py::type_error(std::string(name) + " must be C-contiguous");
  if (array.ndim() != static_cast<py::ssize_t>(shape.size()))
    throw py::value_error(std::string(name) + " must have " + std::to_string(shape.size()) +
                          " dimensions, got " + std::to_string(array.ndim()));
  for (std::size_t i = 0; i < shape.size(); ++i)
    if (shape[i] != ANY && array.shape(i) != shape[i])
      throw py::value_error(std::string(name) + " has size " + std::to_string(array.shape(i)) +
                            " along axis " + std::to_string(i) + ", expected " +
                            std::to_string(shape[i]));
  return py::array_t<T>(array);
}

// Same as require() for an optional argument: None gives no array (a null data pointer).
template <class T>
std::optional<py::array_t<T>> require_optional(const py::handle& obj, const char* name,
                                               std::vector<index_t> shape) {
  if (obj.is_none()) return std::nullopt;
  return require<T>(obj, name, std::move(shape));
}

template <class T>
const T* data_or_null(const std::optional<py::array_t<T>>& array) {
  return array ? array->data() : nullptr;
}

inline Activation activation_from(int code) {
  if (code < 0 || code >= ACT_COUNT) throw py::value_error("activation code out of range");
  return static_cast<Activation>(code);
}

// The checked arrays of a per-pixel network; w2 and b2 (the paper-era outer sigmoid) may be
// None, together. They must outlive the view.
template <class T>
struct PerPixelArrays {
  py::array_t<T> w0, b0, w1, b1;
  std::optional<py::array_t<T>> w2, b2;

  PerPixelArrays(const py::handle& w0_in, const py::handle& b0_in, const py::handle& w1_in,
                 const py::handle& b1_in, const py::handle& w2_in, const py::handle& b2_in)
      : w0(require<T>(w0_in, "w0", {ANY, ANY, ANY})) {
    const index_t P = w0.shape(0), H = w0.shape(1);
    b0 = require<T>(b0_in, "b0", {P, H});
    w1 = require<T>(w1_in, "w1", {P, H});
    b1 = require<T>(b1_in, "b1", {P});
    if (w2_in.is_none() != b2_in.is_none())
      throw py::value_error("give both w2 and b2, or neither");
    w2 = require_optional<T>(w2_in, "w2", {P});
    b2 = require_optional<T>(b2_in, "b2", {P});
  }

  PerPixelNetwork<T> view() const {
    PerPixelNetwork<T> net{w0.data(), b0.data(), w1.data(), b1.data(),
                           w0.shape(0), w0.shape(1), w0.shape(2)};
    net.w2 = data_or_null(w2);
    net.b2 = data_or_null(b2);
    return net;
  }
};

// The network's arrays, checked: weights[l] (sizes[l+1], sizes[l]), biases[l] (sizes[l+1],).
template <class T>
struct NetworkArrays {
  std::vector<py::array_t<T>> weights, biases;
  std::vector<index_t> sizes;

  NetworkArrays(const py::list& w, const py::list& b) {
    if (w.size() == 0) throw py::value_error("weights must hold at least one layer");
    if (w.size() != b.size())
      throw py::value_error("weights and biases must have the same number of layers");
    for (std::size_t l = 0; l < w.size(); ++l) {
      const std::string wn = "weights[" + std::to_string(l) + "]";
      const std::string bn = "biases[" + std::to_string(l) + "]";
      const index_t n_in = l == 0 ? ANY : sizes.back();
      weights.push_back(require<T>(w[l], wn.c_str(), {ANY, n_in}));
      if (l == 0) sizes.push_back(weights[0].shape(1));
      sizes.push_back(weights[l].shape(0));
      biases.push_back(require<T>(b[l], bn.c_str(), {sizes.back()}));
    }
    for (index_t s : sizes)
      if (s < 1) throw py::value_error("every layer must have at least one unit");
  }

  MLP<T> view(Activation act, double slope) const {
    MLP<T> net;
    for (std::size_t l = 0; l < weights.size(); ++l) {
      net.weights.push_back(weights[l].data());
      net.biases.push_back(biases[l].data());
    }
    net.sizes = sizes;
    net.activation = act;
    net.slope = T(slope);
    return net;
  }

  MLPParams<T> mutable_view(Activation act, double slope) {
    MLPParams<T> net;
    for (std::size_t l = 0; l < weights.size(); ++l) {
      net.weights.push_back(weights[l].mutable_data());
      net.biases.push_back(biases[l].mutable_data());
    }
    net.sizes = sizes;
    net.activation = act;
    net.slope = T(slope);
    return net;
  }
};

// Largest power of a label in a term (as starlabel._validation.MAX_EXPONENT): the polynomial
// tabulates every power up to the largest, so an absurd exponent would be an absurd allocation.
constexpr std::int32_t MAX_EXPONENT = 64;

// The Cannon polynomial of an (n_terms, n_labels) exponent array, checked.
inline Polynomial polynomial_from(const py::array_t<std::int32_t>& exponents) {
  const std::int32_t* e = exponents.data();
  for (py::ssize_t i = 0; i < exponents.size(); ++i) {
    if (e[i] < 0) throw py::value_error("exponents must be >= 0");
    if (e[i] > MAX_EXPONENT)
      throw py::value_error("exponents must be <= " + std::to_string(MAX_EXPONENT));
  }
  return Polynomial(e, exponents.shape(0), exponents.shape(1));
}

// Ctrl-C during a kernel. Construct on the calling thread while holding the GIL, pass its
// address to the kernel inside the GIL-released scope, then call raise_if_interrupted() once
// the GIL is back:
//
//   Interrupt interrupt = bind::python_interrupt();
//   { py::gil_scoped_release release; kernel(..., &interrupt); }
//   bind::raise_if_interrupted(interrupt);
//
// The poll briefly takes the GIL and runs Python's signal handlers (only the main thread
// runs them; elsewhere it never fires). A handler that raises (the default SIGINT handler
// raises KeyboardInterrupt) stops the kernel and its exception is re-raised here; a handler
// that does not raise lets the kernel go on.
inline Interrupt python_interrupt() {
  return Interrupt([] {
    py::gil_scoped_acquire gil;
    return PyErr_CheckSignals() != 0;
  });
}

inline void raise_if_interrupted(const Interrupt& interrupt) {
  if (!interrupt.requested()) return;
  if (!PyErr_Occurred()) PyErr_SetNone(PyExc_KeyboardInterrupt);
  throw py::error_already_set();
}


// The output arrays of a Levenberg-Marquardt fit (see LMOutputs), for every binding that
// runs fit_lm: allocated here, filled by the kernel, returned as one tuple.
struct LMResultArrays {
  py::array_t<double> params, covariance, chi2;
  py::array_t<std::int64_t> n_used;
  py::array_t<std::int32_t> n_iter;
  py::array_t<std::int8_t> status;

  LMResultArrays(index_t n_spectra, index_t n_params)
      : params({n_spectra, n_params}), covariance({n_spectra, n_params, n_params}),
        chi2(n_spectra), n_used(n_spectra), n_iter(n_spectra), status(n_spectra) {}

  LMOutputs outputs() {
    return {params.mutable_data(), covariance.mutable_data(), chi2.mutable_data(),
            n_used.mutable_data(), n_iter.mutable_data(), status.mutable_data()};
  }

  py::tuple as_tuple() const { return py::make_tuple(params, covariance, chi2, n_used, n_iter, status); }
};

}  // namespace starlabel::bind
