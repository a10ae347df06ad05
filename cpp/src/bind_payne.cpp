// Bindings for The Payne's kernels (dense MLP, per-pixel networks, training): checks, output
// allocation, GIL release. No math. The dtype of the first weight matrix (float32 or float64)
// selects the kernel; every other array must have the same dtype.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "checks.hpp"
#include "starlabel/mlp.hpp"
#include "starlabel/perpixel_network.hpp"

namespace py = pybind11;
using namespace starlabel;
using bind::ANY;
using bind::require;
using bind::require_optional;

namespace {

bool is_float32(const py::handle& obj, const char* name) {
  if (!py::isinstance<py::array>(obj)) throw py::type_error(std::string(name) + " must be a numpy array");
  auto dt = py::reinterpret_borrow<py::array>(obj).dtype();
  if (dt.is(py::dtype::of<float>())) return true;
  if (dt.is(py::dtype::of<double>())) return false;
  throw py::type_error(std::string(name) + " must have dtype float32 or float64, got " +
                       std::string(py::str(dt)));
}

// Arrays shaped like the network's parameters (gradients, optimizer moments).
template <class T>
MLPGradients<T> like_network(const bind::NetworkArrays<T>& net, const py::list& w,
                             const py::list& b, const char* name,
                             std::vector<py::array_t<T>>& keep) {
  if (w.size() != net.weights.size() || b.size() != net.biases.size())
    throw py::value_error(std::string(name) + " must have one array per layer");
  MLPGradients<T> out;
  for (std::size_t l = 0; l < w.size(); ++l) {
    const std::string wn = std::string(name) + "_weights[" + std::to_string(l) + "]";
    const std::string bn = std::string(name) + "_biases[" + std::to_string(l) + "]";
    keep.push_back(require<T>(w[l], wn.c_str(), {net.sizes[l + 1], net.sizes[l]}));
    out.weights.push_back(keep.back().mutable_data());
    keep.push_back(require<T>(b[l], bn.c_str(), {net.sizes[l + 1]}));
    out.biases.push_back(keep.back().mutable_data());
  }
  return out;
}

// Returns (out, jac or None, whether every pre-activation and output is finite).
template <class T>
py::tuple forward_t(const py::list& w, const py::list& b, const py::handle& x_in, int activation,
                     double slope, bool with_jacobian, int n_threads) {
  bind::NetworkArrays<T> arrays(w, b);
  const MLP<T> net = arrays.view(bind::activation_from(activation), slope);
  auto x = require<T>(x_in, "x", {ANY, net.n_in()});
  const index_t n_stars = x.shape(0), n_out = net.n_out(), n_in = net.n_in();
  py::array_t<T> out({n_stars, n_out});
  py::array_t<T> jac = with_jacobian ? py::array_t<T>({n_stars, n_out, n_in}) : py::array_t<T>();
  Interrupt interrupt = bind::python_interrupt();
  bool finite;
  {
    py::gil_scoped_release release;
    finite = mlp_forward(net, x.data(), n_stars, out.mutable_data(),
                         with_jacobian ? jac.mutable_data() : nullptr, n_threads, MLPBlocking(),
                         &interrupt);
  }
  bind::raise_if_interrupted(interrupt);
  return py::make_tuple(out, with_jacobian ? py::object(jac) : py::none(), finite);
}

py::tuple forward(const py::list& w, const py::list& b, const py::handle& x, int activation,
                   double slope, bool with_jacobian, int n_threads) {
  if (w.size() == 0) throw py::value_error("weights must hold at least one layer");
  if (is_float32(w[0], "weights[0]"))
    return forward_t<float>(w, b, x, activation, slope, with_jacobian, n_threads);
  return forward_t<double>(w, b, x, activation, slope, with_jacobian, n_threads);
}

Loss loss_from(int code) {
  if (code != LOSS_L1 && code != LOSS_L2) throw py::value_error("loss code out of range");
  return static_cast<Loss>(code);
}

template <class T>
py::tuple gradients_t(const py::list& w, const py::list& b, const py::handle& x_in,
                      const py::handle& target_in, const py::handle& pw_in, int activation,
                      double slope, int loss, int n_threads) {
  bind::NetworkArrays<T> arrays(w, b);
  MLPParams<T> net = arrays.mutable_view(bind::activation_from(activation), slope);
  const index_t n_in = arrays.sizes.front(), n_out = arrays.sizes.back();
  auto x = require<T>(x_in, "x", {ANY, n_in});
  const index_t n = x.shape(0);
  if (n < 1) throw py::value_error("x must hold at least one row");
  auto target = require<T>(target_in, "target", {n, n_out});
  auto pw = require_optional<T>(pw_in, "pixel_weights", {n_out});
  py::list gw, gb;
  MLPGradients<T> grads;
  for (std::size_t l = 0; l < arrays.weights.size(); ++l) {
    py::array_t<T> a({arrays.sizes[l + 1], arrays.sizes[l]});
    py::array_t<T> c(arrays.sizes[l + 1]);
    grads.weights.push_back(a.mutable_data());
    grads.biases.push_back(c.mutable_data());
    gw.append(a);
    gb.append(c);
  }
  const Loss lo = loss_from(loss);
  double value;
  Interrupt interrupt = bind::python_interrupt();
  {
    py::gil_scoped_release release;
    value = mlp_loss_gradients(net, x.data(), target.data(), n, bind::data_or_null(pw), lo, grads,
                               n_threads, TrainBlocking(), &interrupt);
  }
  bind::raise_if_interrupted(interrupt);
  return py::make_tuple(value, gw, gb);
}

py::tuple gradients(const py::list& w, const py::list& b, const py::handle& x,
                    const py::handle& target, const py::handle& pw, int activation, double slope,
                    int loss, int n_threads) {
  if (w.size() == 0) throw py::value_error("weights must hold at least one layer");
  if (is_float32(w[0], "weights[0]"))
    return gradients_t<float>(w, b, x, target, pw, activation, slope, loss, n_threads);
  return gradients_t<double>(w, b, x, target, pw, activation, slope, loss, n_threads);
}

template <class T>
py::tuple train_epoch_t(const py::list& w, const py::list& b, const py::list& mw,
                        const py::list& mb, const py::list& vw, const py::list& vb,
                        std::int64_t step, const py::handle& x_in, const py::handle& target_in,
                        const py::handle& order_in, index_t batch_size, const py::handle& pw_in,
                        int activation, double slope, int loss, int optimizer,
                        const py::handle& lr_in, double beta1, double beta2, double eps,
                        double weight_decay, int n_threads) {
  bind::NetworkArrays<T> arrays(w, b);
  MLPParams<T> net = arrays.mutable_view(bind::activation_from(activation), slope);
  std::vector<py::array_t<T>> keep;
  const MLPGradients<T> m = like_network(arrays, mw, mb, "m", keep);
  const MLPGradients<T> v = like_network(arrays, vw, vb, "v", keep);
  const index_t n_in = arrays.sizes.front(), n_out = arrays.sizes.back();
  auto x = require<T>(x_in, "x", {ANY, n_in});
  const index_t n = x.shape(0);
  if (n < 1) throw py::value_error("x must hold at least one row");
  auto target = require<T>(target_in, "target", {n, n_out});
  auto order = require<std::int64_t>(order_in, "order", {n});
  if (batch_size < 1) throw py::value_error("batch_size must be >= 1");
  const index_t n_batches = (n + batch_size - 1) / batch_size;
  auto lr = require<double>(lr_in, "learning_rate", {n_batches});
  auto pw = require_optional<T>(pw_in, "pixel_weights", {n_out});
  if (optimizer < 0 || optimizer > OPT_RADAM) throw py::value_error("optimizer code out of range");
  if (step < 0) throw py::value_error("step must be >= 0");
  {  // order must be a permutation: every row index in range and used once
    std::vector<char> seen(n, 0);
    const std::int64_t* o = order.data();
    for (index_t i = 0; i < n; ++i) {
      if (o[i] < 0 || o[i] >= n || seen[o[i]])
        throw py::value_error("order must be a permutation of range(n)");
      seen[o[i]] = 1;
    }
  }
  OptimizerOptions opt;
  opt.kind = static_cast<Optimizer>(optimizer);
  opt.beta1 = beta1;
  opt.beta2 = beta2;
  opt.eps = eps;
  opt.weight_decay = weight_decay;
  const Loss lo = loss_from(loss);
  py::array_t<double> losses(n_batches);
  Interrupt interrupt = bind::python_interrupt();
  {
    py::gil_scoped_release release;
    mlp_train_epoch(net, m, v, step, x.data(), target.data(), order.data(), n, batch_size,
                    bind::data_or_null(pw), lo, opt, lr.data(), losses.mutable_data(), n_threads,
                    TrainBlocking(), &interrupt);
  }
  // The weights and moments hold the last completed step; the caller's step count is not
  // updated (it is returned only on success), as after any exception mid-epoch.
  bind::raise_if_interrupted(interrupt);
  return py::make_tuple(losses, step);
}

py::tuple train_epoch(const py::list& w, const py::list& b, const py::list& mw,
                      const py::list& mb, const py::list& vw, const py::list& vb,
                      std::int64_t step, const py::handle& x, const py::handle& target,
                      const py::handle& order, index_t batch_size, const py::handle& pw,
                      int activation, double slope, int loss, int optimizer,
                      const py::handle& lr, double beta1, double beta2, double eps,
                      double weight_decay, int n_threads) {
  if (w.size() == 0) throw py::value_error("weights must hold at least one layer");
  if (is_float32(w[0], "weights[0]"))
    return train_epoch_t<float>(w, b, mw, mb, vw, vb, step, x, target, order, batch_size, pw,
                                activation, slope, loss, optimizer, lr, beta1, beta2, eps,
                                weight_decay, n_threads);
  return train_epoch_t<double>(w, b, mw, mb, vw, vb, step, x, target, order, batch_size, pw,
                               activation, slope, loss, optimizer, lr, beta1, beta2, eps,
                               weight_decay, n_threads);
}

template <class T>
py::object perpixel_t(const py::handle& w0, const py::handle& b0, const py::handle& w1,
                      const py::handle& b1, const py::handle& w2, const py::handle& b2,
                      const py::handle& x_in, bool with_jacobian, int n_threads) {
  const bind::PerPixelArrays<T> arrays(w0, b0, w1, b1, w2, b2);
  const PerPixelNetwork<T> net = arrays.view();
  auto x = require<T>(x_in, "x", {ANY, net.n_labels});
  const index_t n_stars = x.shape(0), P = net.n_pixels, K = net.n_labels;
  py::array_t<T> out({n_stars, P});
  py::array_t<T> jac = with_jacobian ? py::array_t<T>({n_stars, P, K}) : py::array_t<T>();
  Interrupt interrupt = bind::python_interrupt();
  {
    py::gil_scoped_release release;
    perpixel_forward(net, x.data(), n_stars, out.mutable_data(),
                     with_jacobian ? jac.mutable_data() : nullptr, n_threads, &interrupt);
  }
  bind::raise_if_interrupted(interrupt);
  if (with_jacobian) return py::make_tuple(out, jac);
  return std::move(out);
}

py::object perpixel(const py::handle& w0, const py::handle& b0, const py::handle& w1,
                    const py::handle& b1, const py::handle& w2, const py::handle& b2,
                    const py::handle& x, bool with_jacobian, int n_threads) {
  if (is_float32(w0, "w0"))
    return perpixel_t<float>(w0, b0, w1, b1, w2, b2, x, with_jacobian, n_threads);
  return perpixel_t<double>(w0, b0, w1, b1, w2, b2, x, with_jacobian, n_threads);
}

}  // namespace

void bind_payne(py::module_& m) {
  m.def("mlp_forward", &forward, py::arg("weights"), py::arg("biases"), py::arg("x"),
        py::arg("activation"), py::arg("slope"), py::arg("with_jacobian"), py::arg("n_threads"));
  m.def("mlp_loss_gradients", &gradients, py::arg("weights"), py::arg("biases"), py::arg("x"),
        py::arg("target"), py::arg("pixel_weights"), py::arg("activation"), py::arg("slope"),
        py::arg("loss"), py::arg("n_threads"));
  m.def("mlp_train_epoch", &train_epoch, py::arg("weights"), py::arg("biases"),
        py::arg("m_weights"), py::arg("m_biases"), py::arg("v_weights"), py::arg("v_biases"),
        py::arg("step"), py::arg("x"), py::arg("target"), py::arg("order"),
        py::arg("batch_size"), py::arg("pixel_weights"), py::arg("activation"),
        py::arg("slope"), py::arg("loss"), py::arg("optimizer"), py::arg("learning_rate"),
        py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"),
        py::arg("n_threads"));
  m.def("perpixel_forward", &perpixel, py::arg("w0"), py::arg("b0"), py::arg("w1"), py::arg("b1"),
        py::arg("w2"), py::arg("b2"), py::arg("x"), py::arg("with_jacobian"),
        py::arg("n_threads"));
  m.attr("MLP_ACTIVATIONS") = py::dict(
      py::arg("leaky_relu") = int(ACT_LEAKY_RELU), py::arg("relu") = int(ACT_RELU),
      py::arg("sigmoid") = int(ACT_SIGMOID), py::arg("tanh") = int(ACT_TANH),
      py::arg("softplus") = int(ACT_SOFTPLUS), py::arg("silu") = int(ACT_SILU));
}
