"""PayneModel.train through its public API: the best-validation weights are the ones kept,
seeding makes training bit-reproducible, and AdamW's weight decay and per-pixel loss weights
reach the backends (fast and reference) and act as documented.

Small networks (3 -> 16 -> 16 -> 40) on small noiseless synthetic surveys: every training run
here takes a few milliseconds.
"""

import numpy as np
import pytest

from starlabel import PayneModel
from starlabel.datasets import synthetic_survey

N_PIXELS = 40
HIDDEN = (16, 16)


@pytest.fixture(scope="module")
def data():
    """200 training and 60 validation stars, 3 labels, 40 pixels, no noise."""
    return (synthetic_survey(200, n_pixels=N_PIXELS, snr=None, seed=1),
            synthetic_survey(60, n_pixels=N_PIXELS, snr=None, seed=2))


def weighted_loss(model, labels, flux, pixel_weights, loss):
    """The validation loss as documented, recomputed independently: the mean over stars and
    pixels of ``w_p |r|`` (l1) or ``w_p r^2`` (l2), r = model.predict(labels) - flux, in
    float64."""
    r = model.predict(labels, warn=False).astype(np.float64) - flux
    w = np.ones(flux.shape[1]) if pixel_weights is None else np.asarray(pixel_weights, float)
    return float(np.mean(w * (np.abs(r) if loss == "l1" else r * r)))


def parameters(model):
    return model.weights + model.biases


def max_difference(a, b):
    return max(float(np.abs(x.astype(float) - y).max())
               for x, y in zip(parameters(a), parameters(b)))


@pytest.mark.parametrize("loss", ["l1", "l2"])
def test_best_validation_weights_are_kept(data, loss):
    """Twelve epochs at a sensible learning rate (3e-3, Adam), then 300x that rate, which
    wrecks the fit: the validation loss is lowest at the end of the first phase and the last
    epoch is far worse (measured: l1 best 0.0549 at epoch 11, last 0.159, lowest after the
    jump 0.146; l2 best 0.00865 at epoch 11, last 0.536). The returned model's validation
    loss, recomputed from model.predict with the documented weighted mean (non-uniform pixel
    weights), must equal history["validation_loss"][best_epoch]; keeping the last epoch's
    weights (or any later epoch's) would give a loss >= 2x larger.

    Tolerance rtol=1e-6: the same forward pass on the same float32 inputs; the one
    difference is that train() stores pixel_weights in the network's dtype (float32, relative
    rounding <= 6e-8) while this recomputation uses the float64 weights. Measured relative
    differences 1.3e-8 (l1) and 2.0e-8 (l2)."""
    train, val = data
    pixel_weights = np.random.default_rng(5).uniform(0.5, 2.0, N_PIXELS)

    def schedule(epoch):
        return 1.0 if epoch < 12 else 300.0

    model = PayneModel(train.label_names, hidden=HIDDEN)
    model.train(train.labels, train.flux, validation=(val.labels, val.flux), epochs=25,
                batch_size=32, optimizer="adam", learning_rate=3e-3, lr_schedule=schedule,
                loss=loss, pixel_weights=pixel_weights, seed=0)
    history = model.history
    losses = np.array(history["validation_loss"])
    best = history["best_epoch"]
    assert len(losses) == 25
    np.testing.assert_allclose(history["learning_rate"],
                               [3e-3 * schedule(e) for e in range(25)], rtol=1e-12)
    assert best == int(np.argmin(losses)) and best < 12
    # after the jump in learning rate no epoch comes close to the best one
    assert losses[12:].min() > 2 * losses[best]

    recomputed = weighted_loss(model, val.labels, val.flux, pixel_weights, loss)
    np.testing.assert_allclose(recomputed, losses[best], rtol=1e-6)
    assert abs(recomputed - losses[-1]) > 0.5 * losses[-1]


def test_seed_makes_training_bit_reproducible(data):
    """The seed fixes the initial weights, the validation split and every epoch's shuffle:
    two runs with seed 7 give bit-identical weights, biases, scaling and history, whatever the
    state of NumPy's global random generator (set differently before each run); seed 8 gives
    different weights (measured: max |difference| per array 0.44 to 1.24, after 5 epochs).
    Bitwise equality is exact here: the same build runs the same operations on the same
    data."""
    train, _ = data

    def run(seed, global_seed):
        np.random.seed(global_seed)
        model = PayneModel(train.label_names, hidden=HIDDEN)
        return model.train(train.labels, train.flux, epochs=5, batch_size=32, optimizer="adam",
                           learning_rate=3e-3, seed=seed)

    first, again, other = run(7, 1), run(7, 2), run(8, 1)
    for a, b in zip(parameters(first), parameters(again)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(first.x_min, again.x_min)
    np.testing.assert_array_equal(first.x_max, again.x_max)
    assert first.history == again.history
    for a, b in zip(parameters(first), parameters(other)):
        assert np.abs(a - b).max() > 0.1
    assert first.history["validation_loss"] != other.history["validation_loss"]


def test_adamw_weight_decay_and_pixel_weights_reach_both_backends(data):
    """optimizer="adamw" with weight_decay and non-uniform pixel_weights, through
    PayneModel.train, float64, 10 epochs (70 steps, lr 3e-3):

    - decoupled decay shrinks the parameters: with weight_decay=2 every weight and bias array
      has a smaller norm than with weight_decay=0 (measured ratios 0.67 to 0.87);
    - the fast backend's run equals the reference backend's (measured max |difference|
      1.7e-16 in the parameters, relative 3.7e-16 in the validation losses). Tolerance 1e-10
      as in test_payne_model's backend test: float64 rounding differences (summation order,
      FMA), amplified by Adam's division by sqrt(v), stay many orders below it, while a
      dropped option would show far above it: AdamW vs Adam at the same decay differs by
      0.28, weight decay 2 vs 0 by 0.27, these pixel weights vs none by 0.12 (max |difference|
      over the parameters; asserted > 0.1, > 0.1, > 1e-3)."""
    train, val = data
    pixel_weights = np.random.default_rng(5).uniform(0.5, 2.0, N_PIXELS)

    def run(backend="fast", optimizer="adamw", weight_decay=2.0, weights=pixel_weights):
        model = PayneModel(train.label_names, hidden=HIDDEN, backend=backend, dtype="float64")
        return model.train(train.labels, train.flux, validation=(val.labels, val.flux),
                           epochs=10, batch_size=32, optimizer=optimizer, learning_rate=3e-3,
                           weight_decay=weight_decay, pixel_weights=weights, seed=4)

    fast, ref = run(), run("reference")
    for a, b in zip(parameters(fast), parameters(ref)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-10)
    np.testing.assert_allclose(fast.history["validation_loss"], ref.history["validation_loss"],
                               rtol=1e-10)
    assert fast.history["best_epoch"] == ref.history["best_epoch"]

    no_decay = run(weight_decay=0.0)
    for decayed, free in zip(parameters(fast), parameters(no_decay)):
        assert np.linalg.norm(decayed) < 0.95 * np.linalg.norm(free)
    assert max_difference(fast, no_decay) > 0.1
    assert max_difference(fast, run(optimizer="adam")) > 0.1
    assert max_difference(fast, run(weights=None)) > 1e-3


@pytest.mark.parametrize("loss", ["l1", "l2"])
@pytest.mark.parametrize("backend", ["fast", "reference"])
def test_zero_pixel_weight_ignores_those_pixels(data, backend, loss):
    """Ten of the 40 pixels get pixel weight 0 and, in a second run, their training and
    validation flux is replaced by garbage (normal, sigma 50). A zero weight makes those
    pixels' loss gradient exactly zero, and adding exact zeros changes no floating-point sum
    in any order, so the two runs must be bit-identical: all weights and biases and the whole
    history (train and validation loss, best epoch). Without the weights the garbage changes
    the fit of the clean pixels (measured max |difference| in their predictions 0.075 for
    l1, 0.59 for l2, both backends; asserted > 1e-3).

    The validation loss uses the weights: history's value at the best epoch equals the
    weighted mean recomputed from model.predict, for the garbled and the clean flux alike
    (measured difference 0.0; 0/1 weights are exact in float32; rtol=1e-6 as in the
    best-weights test). It is the mean over all 40 pixels, the ten masked ones contributing
    zero (l1: 0.0241, l2: 0.00386); the unweighted mean over the garbled flux is far larger
    (10.5 and 672; asserted > 10x)."""
    train, val = data
    rng = np.random.default_rng(9)
    masked = np.zeros(N_PIXELS, bool)
    masked[rng.choice(N_PIXELS, 10, replace=False)] = True
    pixel_weights = np.where(masked, 0.0, 1.0)

    def garble(flux):
        flux = flux.copy()
        flux[:, masked] = rng.normal(0.0, 50.0, (flux.shape[0], masked.sum()))
        return flux

    def run(flux, val_flux, weights):
        model = PayneModel(train.label_names, hidden=HIDDEN, backend=backend)
        return model.train(train.labels, flux, validation=(val.labels, val_flux), epochs=15,
                           batch_size=32, optimizer="adam", learning_rate=3e-3, loss=loss,
                           pixel_weights=weights, seed=4)

    bad_train, bad_val = garble(train.flux), garble(val.flux)
    clean = run(train.flux, val.flux, pixel_weights)
    garbled = run(bad_train, bad_val, pixel_weights)
    for a, b in zip(parameters(clean), parameters(garbled)):
        np.testing.assert_array_equal(a, b)
    assert clean.history == garbled.history

    unweighted = run(bad_train, bad_val, None)
    shift = np.abs(unweighted.predict(val.labels, warn=False)
                   - clean.predict(val.labels, warn=False))[:, ~masked]
    assert shift.max() > 1e-3

    best = garbled.history["validation_loss"][garbled.history["best_epoch"]]
    np.testing.assert_allclose(weighted_loss(garbled, val.labels, bad_val, pixel_weights, loss),
                               best, rtol=1e-6)
    np.testing.assert_allclose(weighted_loss(clean, val.labels, val.flux, pixel_weights, loss),
                               best, rtol=1e-6)
    assert weighted_loss(garbled, val.labels, bad_val, None, loss) > 10 * best
