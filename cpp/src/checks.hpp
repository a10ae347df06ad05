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
  if (!array.dtype().is(py::dtype::of<T>()))
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
