// Jacobians of a piecewise-linear network remembered from call to call, for label fitting.
//
// With ReLU or leaky-ReLU hidden layers an MLP (mlp.hpp) is piecewise linear in its inputs.
// Its Jacobian is
//     J = W_{L-1} M_{L-2},   M_l = D_l A_l,   A_l = W_l M_{l-1},   M_{-1} = I,
// with D_l = diag g'(z_l) a pattern of 1 and the slope, so J changes only where a hidden
// pre-activation changes sign. From one accepted LM step to the next (a 25 -> 300 -> 300 ->
// 7214 emulator fitting a spectrum: median one sign change per layer, 90% of steps <= 15)
// the change is of low rank. With F_l the units of layer l whose sign changed and Δd their
// change of g',
//     ΔM_l = D'_l W_l ΔM_{l-1} + E_{F_l} diag(Δd) A_l[F_l, :]
// (E_F: the unit columns of F; A_l the old value), so ΔM_l = U_l V_l with
//     U_l = [D'_l W_l U_{l-1} | E_{F_l}],   V_l = [V_{l-1}; diag(Δd) A_l[F_l, :]],
// and J' = J + W_{L-1} U V. The unit columns of the last hidden layer only select columns of
// W_{L-1}; each column carried from an earlier layer ("dense") costs a product with the
// whole last layer, n_out * H multiply-adds against n_out * H * n_in for J itself.
//
// The A_l follow the same way: A'_l = A_l + (W_l U_{l-1}) V_{l-1}.
//
// JacobianMemory keeps, per key (a spectrum of an LM fit), J and the A_l and D_l it was built
// from. mlp_forward_remembered updates a key's J this way when that is cheaper than computing
// it; a new key, or one with many sign changes, starts from the J of another input of the
// same call when one is near (an LM batch's first call: every spectrum at the same labels);
// the others are computed whole (as are all with a smooth activation, or when the caller
// gives no MLP::last_weights_t and packed last layer, MLP::packed_last or packed_last_f32:
// an LM fit does, a single evaluation need not). An updated J equals the whole one up to
// rounding: the update is exact, and only rounding accumulates (~1e-16 relative per update
// in double, ~1e-7 for a float32 network, MLP::last_weights_f32, whose J is kept and updated
// in float32).
// The updates run block by block of outputs; a fit defers each block until its pass over the
// pixels reads it (complete_jacobians), so that the updated rows are read from cache: one
// pass over each Jacobian in memory per LM step instead of two.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cstdint>
#include <vector>

#include "common.hpp"
#include "gemm.hpp"
#include "mlp.hpp"

namespace starlabel {

template <class T>
struct JacobianMemory {
  struct Entry {
    index_t key = -1;            // -1: none yet
    std::uint64_t last_use = 0;  // the call that last used it (least recently used is reused)
    std::vector<T> jac;          // (n_out, n_in), or (a float32 network) in jac_f32
    std::vector<float> jac_f32;
    std::vector<std::vector<T>> deriv;  // deriv[l] (sizes[l + 1],): D_l of hidden layer l
    std::vector<std::vector<T>> pre;    // pre[l] (sizes[l + 1], n_in): A_l (l >= 1; A_0 = W_0)
    // the input and spectrum of the key's last call without Jacobians (an LM trial step),
    // reused when the next call asks for the Jacobian at that input (the step was accepted)
    std::vector<T> x, flux;
  };
  // One item's change of J, U V (see above)
  struct Change {
    bool update = false;         // J is updated (else computed whole)
    index_t from = -1;           // updated from: -1 its own entry, else this call's item `from`
    index_t n_dense = 0;         // carried columns of U
    std::vector<T> dense;        // (H, n_dense) column-major
    std::vector<index_t> units;  // the last hidden layer's changed units: U's other columns
    std::vector<T> v;            // (n_dense + units, n_in) row-major
    std::vector<float> v_f32;    // v in float32, for a Jacobian kept in float32
  };

  std::vector<Entry> entries;
  std::uint64_t calls = 0;
  // Jacobians computed whole and by update since the memory was made (tests, benchmarks)
  std::int64_t n_whole = 0, n_updated = 0;

  // per call, kept so that a call allocates nothing once the first calls have sized them
  // (Dask workers: allocations that reach the top of the heap are trimmed and fault in again)
  std::vector<index_t> slot, whole, items, to_run, first_col;
  std::vector<char> known;
  std::vector<Entry> fresh;  // each item's new D_l and A_l
  std::vector<Change> changes;
  std::vector<T> act, z, m, raw, carried, dense, product, gathered;
  std::vector<float> dense_f32, product_f32, gathered_f32;
  index_t n_cols = 0;  // the updates' dense columns, all items
  // the last call's updates by block of outputs (1: not yet applied to the Jacobians)
  std::vector<char> pending;
  index_t n_pending = 0;
};

namespace jacobian_memory_detail {

// D_l of every hidden layer at input x, into e.deriv, as mlp_forward sets them (a NaN
// pre-activation takes the slope: J depends on the patterns alone, so a non-finite input's
// J, computed whole or updated, is the same).
template <class T>
void patterns(const MLP<T>& net, const T* x, typename JacobianMemory<T>::Entry& e,
              JacobianMemory<T>& memory) {
  using namespace mlp_detail;
  using Vector = Eigen::Matrix<T, Eigen::Dynamic, 1>;
  const int L = net.n_layers();
  e.deriv.resize(std::max(L - 1, 0));
  memory.act.assign(x, x + net.n_in());
  for (int l = 0; l + 1 < L; ++l) {
    const index_t wi = net.sizes[l], wo = net.sizes[l + 1];
    memory.z.resize(wo);
    Eigen::Map<Vector>(memory.z.data(), wo).noalias() =
        cmap(net.weights[l], wo, wi, wi) * Eigen::Map<const Vector>(memory.act.data(), wi);
    e.deriv[l].resize(wo);
    bias_activation(memory.z.data(), wo, 1, wo, net.biases[l], net.activation, net.slope,
                    e.deriv[l].data(), wo);
    memory.act.swap(memory.z);
  }
}

// e.pre: A_l = W_l D_{l-1} A_{l-1} (l >= 1, A_0 = W_0) from e.deriv.
template <class T>
void whole_pre(const MLP<T>& net, typename JacobianMemory<T>::Entry& e, std::vector<T>& m) {
  using namespace mlp_detail;
  const index_t n_in = net.n_in();
  e.pre.resize(e.deriv.size());
  for (std::size_t l = 1; l < e.deriv.size(); ++l) {
    const index_t wi = net.sizes[l], wo = net.sizes[l + 1];
    const T* prev = l == 1 ? net.weights[0] : e.pre[l - 1].data();
    m.assign(prev, prev + wi * n_in);
    for (index_t h = 0; h < wi; ++h)
      for (index_t k = 0; k < n_in; ++k) m[h * n_in + k] *= e.deriv[l - 1][h];
    e.pre[l].resize(wo * n_in);
    assign_product(map(e.pre[l].data(), wo, n_in, n_in), cmap(net.weights[l], wo, wi, wi),
                   cmap(m.data(), wi, n_in, n_in));
  }
}

// Whether updating J from `old`'s patterns to `now`'s is cheaper than computing it whole. In
// multiply-adds per output: H per dense column (one more column of the product with the last
// layer, as efficient as J's own) and 2 n_in per column of U (the small product U V in
// double), against H n_in.
template <class T>
bool cheap_change(const MLP<T>& net, const typename JacobianMemory<T>::Entry& old,
                  const typename JacobianMemory<T>::Entry& now) {
  const index_t n_in = net.n_in(), H = net.sizes[net.n_layers() - 1];
  index_t n_dense = 0, n_units = 0;
  for (std::size_t l = 0; l < now.deriv.size(); ++l) {
    n_dense += n_units;
    n_units = 0;
    for (std::size_t h = 0; h < now.deriv[l].size(); ++h)
      n_units += old.deriv[l][h] != now.deriv[l][h];
  }
  return double(H) * n_dense + 2.0 * double(n_dense + n_units) * n_in <= double(H) * n_in;
}

// The change U V from `old` to `now` (of the same network) into c, and now.pre from old.pre.
template <class T>
void low_rank_change(const MLP<T>& net, const typename JacobianMemory<T>::Entry& old,
                     typename JacobianMemory<T>::Entry& now, typename JacobianMemory<T>::Change& c,
                     JacobianMemory<T>& memory) {
  using namespace mlp_detail;
  const index_t n_in = net.n_in();
  std::vector<T>& raw = memory.raw;
  std::vector<T>& carried = memory.carried;
  c.n_dense = 0;
  c.dense.clear();
  c.units.clear();
  c.v.clear();
  now.pre.resize(now.deriv.size());
  index_t width = n_in;  // of the layer U's columns live in
  for (std::size_t l = 0; l < now.deriv.size(); ++l) {
    const index_t wo = net.sizes[l + 1];
    const T* d_new = now.deriv[l].data();
    const T* d_old = old.deriv[l].data();
    // W_l U (wo, n_cols) column-major: every column, unit ones included, becomes dense
    const index_t n_cols = c.n_dense + static_cast<index_t>(c.units.size());
    raw.resize(wo * n_cols);
    for (index_t h = 0; h < wo; ++h) {
      const T* w = net.weights[l] + h * width;
      for (index_t j = 0; j < c.n_dense; ++j) {
        T s = T(0);
        for (index_t k = 0; k < width; ++k) s += w[k] * c.dense[j * width + k];
        raw[j * wo + h] = s;
      }
      for (std::size_t j = 0; j < c.units.size(); ++j)
        raw[(c.n_dense + j) * wo + h] = w[c.units[j]];
    }
    if (l > 0) {  // A'_l = A_l + (W_l U) V
      now.pre[l] = old.pre[l];
      if (n_cols > 0)
        add_product(map(now.pre[l].data(), wo, n_in, n_in),
                    Eigen::Map<const Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>>(
                        raw.data(), wo, n_cols),
                    cmap(c.v.data(), n_cols, n_in, n_in));
    }
    carried.resize(wo * n_cols);  // D'_l W_l U
    for (index_t j = 0; j < n_cols; ++j)
      for (index_t h = 0; h < wo; ++h) carried[j * wo + h] = d_new[h] * raw[j * wo + h];
    c.dense.swap(carried);
    c.n_dense = n_cols;
    c.units.clear();
    // this layer's sign changes: unit columns of U, rows diag(Δd) A_l[F, :] of V
    const T* a_old = l == 0 ? net.weights[0] : old.pre[l].data();
    for (index_t h = 0; h < wo; ++h) {
      if (d_new[h] == d_old[h]) continue;
      c.units.push_back(h);
      for (index_t k = 0; k < n_in; ++k) c.v.push_back((d_new[h] - d_old[h]) * a_old[h * n_in + k]);
    }
    width = wo;
  }
}

}  // namespace jacobian_memory_detail

// For a caller that fits with mlp_forward_remembered: the last layer's weights transposed
// into `storage`, (H, n_out) row-major, and net.last_weights_t pointing at them (without them,
// or without the packed last layer, every Jacobian is computed whole).
template <class T>
void keep_transposed_last_layer(MLP<T>& net, std::vector<T>& storage) {
  using Rows = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const index_t H = net.sizes[net.n_layers() - 1], n_out = net.n_out();
  storage.resize(H * n_out);
  Eigen::Map<Rows>(storage.data(), H, n_out) =
      Eigen::Map<const Rows>(net.weights[net.n_layers() - 1], n_out, H).transpose();
  net.last_weights_t = storage.data();
}

namespace jacobian_memory_detail {

// Outputs per block of the updates: the packed last layer's (only read when there are updates)
template <class T>
index_t update_block(const MLP<T>& net) {
  return net.last_weights_f32 ? net.packed_last_f32->block() : net.packed_last->block();
}

// The last call's updates of outputs [p0, p0 + block): P^T = (W_{L-1} [every item's dense
// columns])^T in one product, then J_i += [P_i | W_{L-1}[:, units_i]] V_i item by item.
template <class T>
void apply_update_block(const MLP<T>& net, JacobianMemory<T>& memory, index_t p0) {
  using namespace mlp_detail;
  const index_t n_in = net.n_in(), n_out = net.n_out(), H = net.sizes[net.n_layers() - 1];
  const index_t n_cols = memory.n_cols, nb = std::min(update_block(net), n_out - p0);
  const bool f32 = net.last_weights_f32 != nullptr;
  // P^T (n_cols, nb) row-major, in float32 with the float32 last layer, from the layer as
  // the caller packed it once: Eigen's product packs the block of the layer on every call,
  // which costs about as much as the product itself when n_cols is a few tens
  auto product_into = [&](auto& product, const auto& packed, const auto& x) {
    product.assign(n_cols * nb, 0);
    packed.add_product(product.data(), nb, x.data(), H, n_cols, p0);
  };
  if (n_cols > 0 && f32)
    product_into(memory.product_f32, *net.packed_last_f32, memory.dense_f32);
  else if (n_cols > 0)
    product_into(memory.product, *net.packed_last, memory.dense);
  // J_i's block += G V_i, G = [P_i | W_{L-1}[:, units_i]] (nb, r) row-major, in J's precision
  auto update = [&](auto* jac, auto& gathered, const auto& product, const auto* v,
                    const auto& c, index_t first_col) {
    const index_t r = c.n_dense + static_cast<index_t>(c.units.size());
    gathered.resize(nb * r);
    auto* g = gathered.data();
    auto put = [&](index_t col, const auto* values) {  // values (nb,): g's column col
      for (index_t p = 0; p < nb; ++p) g[p * r + col] = values[p];
    };
    for (index_t j = 0; j < c.n_dense; ++j) put(j, product.data() + (first_col + j) * nb);
    for (std::size_t j = 0; j < c.units.size(); ++j)  // columns of W_{L-1}, read whole
      put(c.n_dense + j, net.last_weights_t + c.units[j] * n_out + p0);
    add_product(map(jac + p0 * n_in, nb, n_in, n_in), cmap(g, nb, r, r), cmap(v, r, n_in, n_in));
  };
  for (index_t i : memory.items) {
    const auto& c = memory.changes[i];
    if (c.n_dense + c.units.size() == 0) continue;  // no sign changed: J is unchanged
    auto& entry = memory.entries[memory.slot[i]];
    if (f32) {
      update(entry.jac_f32.data(), memory.gathered_f32, memory.product_f32, c.v_f32.data(), c,
             memory.first_col[i]);
    } else {
      update(entry.jac.data(), memory.gathered, memory.product, c.v.data(), c,
             memory.first_col[i]);
    }
  }
}

}  // namespace jacobian_memory_detail

// Completes the Jacobians of the last call to mlp_forward_remembered with `defer` on outputs
// [row0, row1] (rows outside [0, n_out) are clamped): applies the updates of the blocks of
// outputs that hold them. ready (or null): [ready[0], ready[1]) the run of outputs around
// them that are complete. Blocks are independent, so any order gives the same Jacobians.
template <class T>
void complete_jacobians(const MLP<T>& net, JacobianMemory<T>& memory, index_t row0,
                        index_t row1, index_t* ready = nullptr) {
  using namespace jacobian_memory_detail;
  const index_t n_out = net.n_out();
  if (memory.n_pending == 0) {
    if (ready) ready[0] = 0, ready[1] = n_out;
    return;
  }
  std::vector<char>& pending = memory.pending;
  const index_t pb = update_block(net), n_blocks = static_cast<index_t>(pending.size());
  auto block_of = [&](index_t row) { return std::clamp<index_t>(row, 0, n_out - 1) / pb; };
  const index_t k0 = std::min(block_of(row0), block_of(row1));
  const index_t k1 = std::max(block_of(row0), block_of(row1));
  for (index_t k = k0; k <= k1; ++k) {
    if (!pending[k]) continue;
    apply_update_block(net, memory, k * pb);
    pending[k] = 0;
    --memory.n_pending;
  }
  if (!ready) return;
  index_t a = k0, b = k1 + 1;
  while (a > 0 && !pending[a - 1]) --a;
  while (b < n_blocks && !pending[b]) ++b;
  ready[0] = a * pb;
  ready[1] = std::min(b * pb, n_out);
}

// mlp_forward for n inputs, each with a key, and each input's Jacobian kept in the memory.
//   x        (n, n_in)
//   keys     (n,)  >= 0; a key seen before names an input near its last one; distinct
//            within a call that asks for Jacobians (a negative key: nothing remembered)
//   out      (n, n_out)
//   jac      (n,) filled with pointers to each input's Jacobian (n_out, n_in) row-major,
//            valid until the next call with this memory; or null: the spectra only, kept
//            for a next call at the same inputs (with distinct keys). A float32 network's
//            (net.last_weights_f32) are kept in float32: computed whole they are float32
//            products, and each update adds ~1e-7 relative rounding either way; half the
//            bytes to update and read per LM step
//   defer    leave the Jacobians' updates to complete_jacobians (block by block of outputs,
//            when the caller reads them: an LM fit's pass over the pixels, which then finds
//            each block in cache instead of reading every Jacobian from memory once more);
//            the next call completes whatever is left first
// Runs on the calling thread (each thread of an LM fit owns a memory).
template <class T>
void mlp_forward_remembered(const MLP<T>& net, const T* x, const index_t* keys, index_t n,
                            T* out, EitherPrecision<T>* jac, JacobianMemory<T>& memory,
                            const MLPBlocking& blocking, bool defer = false) {
  using namespace mlp_detail;
  using namespace jacobian_memory_detail;
  using Entry = typename JacobianMemory<T>::Entry;
  using Change = typename JacobianMemory<T>::Change;
  complete_jacobians(net, memory, 0, net.n_out() - 1);
  if (n <= 0) return;
  const int L = net.n_layers();
  const index_t n_in = net.n_in(), n_out = net.n_out(), H = net.sizes[L - 1];
  std::vector<Entry>& entries = memory.entries;
  if (!jac) {
    mlp_forward(net, x, n, out, static_cast<T*>(nullptr), 1, blocking);
    for (index_t i = 0; i < n; ++i)
      for (index_t j = 0; j < i; ++j)
        if (keys[i] == keys[j]) return;  // several inputs of one key (LM's starts): none kept
    for (index_t i = 0; i < n; ++i)
      for (Entry& e : entries)
        if (e.key == keys[i] && keys[i] >= 0) {
          e.x.assign(x + i * n_in, x + (i + 1) * n_in);
          e.flux.assign(out + i * n_out, out + (i + 1) * n_out);
        }
    return;
  }
  const bool updates = (net.activation == ACT_LEAKY_RELU || net.activation == ACT_RELU) &&
                       net.last_weights_t != nullptr &&
                       (net.last_weights_f32 ? net.packed_last_f32 != nullptr
                                             : net.packed_last != nullptr);
  const std::uint64_t call = ++memory.calls;
  std::vector<Entry>& fresh = memory.fresh;
  std::vector<index_t>& slot = memory.slot;
  std::vector<Change>& changes = memory.changes;
  if (fresh.size() < std::size_t(n)) fresh.resize(n);
  if (changes.size() < std::size_t(n)) changes.resize(n);

  // an entry per item: its key's, or else the least recently used one not taken by this call
  slot.assign(n, -1);
  std::vector<char>& known = memory.known;
  known.assign(n, 0);
  for (index_t i = 0; i < n; ++i) {
    for (std::size_t e = 0; e < entries.size() && slot[i] < 0; ++e)
      if (entries[e].key == keys[i] && keys[i] >= 0 && entries[e].last_use != call)
        slot[i] = index_t(e);
    if (slot[i] >= 0) {
      entries[slot[i]].last_use = call;
      known[i] = 1;
    }
  }
  for (index_t i = 0; i < n; ++i) {
    if (slot[i] >= 0) continue;
    for (std::size_t e = 0; e < entries.size(); ++e)
      if (entries[e].last_use != call &&
          (slot[i] < 0 || entries[e].last_use < entries[slot[i]].last_use))
        slot[i] = index_t(e);
    if (slot[i] < 0) {
      slot[i] = index_t(entries.size());
      entries.emplace_back();
    }
    entries[slot[i]].key = keys[i];
    entries[slot[i]].last_use = call;
    entries[slot[i]].x.clear();
  }

  // how each item gets its J: updated from its own last one, else from an earlier item of
  // this call computed whole ("whole" items hold the J the others start from), else whole
  std::vector<index_t>& whole = memory.whole;
  whole.clear();
  for (index_t i = 0; i < n; ++i) {
    Change& c = changes[i];
    patterns(net, x + i * n_in, fresh[i], memory);
    c.update = updates && known[i] && cheap_change(net, entries[slot[i]], fresh[i]);
    c.from = -1;
    for (std::size_t j = 0; j < whole.size() && !c.update && updates; ++j)
      if (cheap_change(net, fresh[whole[j]], fresh[i])) {
        c.update = true;
        c.from = whole[j];
      }
    if (c.update) continue;
    whole.push_back(i);
    whole_pre(net, fresh[i], memory.m);
  }
  memory.n_whole += static_cast<index_t>(whole.size());
  memory.n_updated += n - static_cast<index_t>(whole.size());

  // the spectra, and the whole Jacobians (the caller's blocking, one star tile for all n
  // items, covers any subset); scratch kept by the thread, its contents meaningless between
  // calls
  thread_local std::vector<T> x_sub, flux_sub, jac_sub;
  std::vector<index_t>& items = memory.items;
  std::vector<index_t>& to_run = memory.to_run;
  for (const bool with_jac : {true, false}) {
    items.clear();
    to_run.clear();
    for (index_t i = 0; i < n; ++i) {
      if (changes[i].update == with_jac) continue;
      items.push_back(i);
      const Entry& e = entries[slot[i]];  // the spectrum of the trial step being accepted
      const bool kept = e.x.size() == std::size_t(n_in) &&
                        std::equal(e.x.begin(), e.x.end(), x + i * n_in);
      if (!with_jac && kept)
        std::copy(e.flux.begin(), e.flux.end(), out + i * n_out);
      else
        to_run.push_back(i);
    }
    const index_t m = static_cast<index_t>(to_run.size());
    if (m == 0) continue;
    x_sub.resize(m * n_in);
    flux_sub.resize(m * n_out);
    if (with_jac) jac_sub.resize(m * n_out * n_in);
    for (index_t j = 0; j < m; ++j)
      std::copy_n(x + to_run[j] * n_in, n_in, x_sub.data() + j * n_in);
    mlp_forward(net, x_sub.data(), m, flux_sub.data(), with_jac ? jac_sub.data() : nullptr, 1,
                blocking);
    for (index_t j = 0; j < m; ++j) {
      std::copy_n(flux_sub.data() + j * n_out, n_out, out + to_run[j] * n_out);
      if (!with_jac) continue;
      Entry& e = entries[slot[to_run[j]]];
      const T* whole_jac = jac_sub.data() + j * n_out * n_in;
      if (net.last_weights_f32)
        e.jac_f32.assign(whole_jac, whole_jac + n_out * n_in);  // exact: float32 products
      else
        e.jac.assign(whole_jac, whole_jac + n_out * n_in);
    }
  }

  // the updates (`items` now lists them): their changes, then per block of outputs P =
  // W_{L-1} [every item's dense columns] in one product and J_i += [P_i | W_{L-1}[:, units_i]] V_i
  std::vector<index_t>& first_col = memory.first_col;
  first_col.assign(n, 0);
  index_t n_cols = 0;
  for (index_t i : items) {
    Change& c = changes[i];
    const Entry& from = c.from < 0 ? entries[slot[i]] : fresh[c.from];
    low_rank_change(net, from, fresh[i], c, memory);
    if (net.last_weights_f32) c.v_f32.assign(c.v.begin(), c.v.end());  // once, not per block
    if (c.from >= 0 && net.last_weights_f32)
      entries[slot[i]].jac_f32 = entries[slot[c.from]].jac_f32;
    else if (c.from >= 0)
      entries[slot[i]].jac = entries[slot[c.from]].jac;
    first_col[i] = n_cols;
    n_cols += c.n_dense;
  }
  memory.n_cols = n_cols;
  // dense (n_cols, H) row-major: every item's dense columns, as rows
  std::vector<T>& dense = memory.dense;
  dense.resize(n_cols * H);
  for (index_t i : items)
    std::copy_n(changes[i].dense.data(), changes[i].n_dense * H, dense.data() + first_col[i] * H);
  if (net.last_weights_f32) memory.dense_f32.assign(dense.begin(), dense.end());
  if (!items.empty()) {
    const index_t pb = update_block(net);
    memory.pending.assign((n_out + pb - 1) / pb, 1);
    memory.n_pending = static_cast<index_t>(memory.pending.size());
  }
  for (index_t i = 0; i < n; ++i) {
    Entry& e = entries[slot[i]];
    e.deriv.swap(memory.fresh[i].deriv);
    e.pre.swap(memory.fresh[i].pre);
    jac[i] = {};
    if (net.last_weights_f32)
      jac[i].values_f32 = e.jac_f32.data();
    else
      jac[i].values = e.jac.data();
  }
  if (!defer) complete_jacobians(net, memory, 0, n_out - 1);
}

}  // namespace starlabel
