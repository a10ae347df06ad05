// The compiled core: one module per instruction-set level, all with the same contents.
// Build facts and threads here; each area's functions in its own bind_<area>.cpp.
#include <pybind11/pybind11.h>

#include "starlabel/common.hpp"

namespace py = pybind11;

void bind_cannon(py::module_& m);
void bind_payne(py::module_& m);
void bind_spectra(py::module_& m);
void bind_fit(py::module_& m);

namespace {

bool cpu_supports(const std::string& level) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (level == "baseline") return true;
  if (level == "avx2")
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("bmi2");
  if (level == "avx512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vl");
  return false;
#else
  return level == "native";
#endif
}

std::string compiler() {
#if defined(__clang__)
  return "clang " __clang_version__;
#elif defined(__GNUC__)
  return "gcc " __VERSION__;
#else
  return "unknown";
#endif
}

}  // namespace

PYBIND11_MODULE(STARLABEL_MODULE_NAME, m) {
  m.doc() = "starlabel's compiled core (private; use starlabel.fast)";
  m.attr("__version__") = STARLABEL_VERSION;
  m.attr("compiler") = compiler();
#ifdef _OPENMP
  m.attr("openmp") = _OPENMP;
#else
  m.attr("openmp") = 0;
#endif
  m.def("cpu_supports", &cpu_supports, py::arg("level"),
        "Whether this CPU can run the extension built for `level`.");
  m.def("default_threads", [] { return starlabel::resolve_threads(0); },
        "Threads a kernel uses when n_threads is not given.");
  m.attr("FIT_STATUS") = py::dict(
      py::arg("CONVERGED") = int(starlabel::FIT_CONVERGED),
      py::arg("MAX_ITER") = int(starlabel::FIT_MAX_ITER),
      py::arg("NO_PIXELS") = int(starlabel::FIT_NO_PIXELS),
      py::arg("NON_FINITE") = int(starlabel::FIT_NON_FINITE));
  m.attr("PIXEL_STATUS") = py::dict(
      py::arg("OK") = int(starlabel::PIXEL_OK),
      py::arg("TOO_FEW_STARS") = int(starlabel::PIXEL_TOO_FEW_STARS),
      py::arg("SINGULAR") = int(starlabel::PIXEL_SINGULAR),
      py::arg("NOT_CONVERGED") = int(starlabel::PIXEL_NOT_CONVERGED));
  bind_cannon(m);
  bind_payne(m);
  bind_spectra(m);
  bind_fit(m);
}
