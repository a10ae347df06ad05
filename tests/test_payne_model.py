"""PayneModel / PerPixelPayneModel: training on a synthetic survey, persistence, the published
file layouts (real BinSpec networks), and bad input."""

import numpy as np
import pytest

import starlabel
from starlabel import OutsideTrainingRangeWarning, PayneModel, fast, reference
from starlabel.datasets import synthetic_survey


@pytest.fixture(scope="module")
def surveys():
    train = synthetic_survey(500, n_pixels=120, snr=None, seed=1)
    test = synthetic_survey(100, n_pixels=120, snr=None, seed=2)
    return train, test


@pytest.fixture(scope="module")
def trained(surveys):
    train, _ = surveys
    model = PayneModel(train.label_names, hidden=(64, 64))
    return model.train(train.labels, train.flux, epochs=300, batch_size=64, optimizer="adam",
                       learning_rate=3e-3, lr_schedule="cosine", loss="l2", seed=0)


def test_emulation_error_on_held_out_spectra(surveys, trained):
    """Stated result: a 3 -> 64 -> 64 -> 120 float32 emulator trained for 300 epochs (Adam,
    cosine schedule, L2) on 500 noiseless synthetic stars reproduces 100 held-out spectra (all
    inside the training box) to a median |error| of 0.0024 and a 99th percentile of 0.037 in
    normalized flux (the spectra's mean line depth is 0.048). Bounds: ~1.5x the measured values
    (the result is bit-reproducible for one build; the margin covers other ISA levels/BLAS)."""
    _, test = surveys
    inside = np.all((test.labels >= trained.x_min) & (test.labels <= trained.x_max), axis=1)
    err = np.abs(trained.predict(test.labels[inside]) - test.flux[inside])
    assert inside.sum() > 80
    assert np.median(err) < 0.0035
    assert np.percentile(err, 99) < 0.055
    history = trained.history
    assert len(history["train_loss"]) == 300 and history["best_epoch"] is not None
    assert history["validation_loss"][history["best_epoch"]] == min(history["validation_loss"])
    assert history["train_loss"][-1] < history["train_loss"][0] / 10


def test_model_jacobian_is_in_physical_units(trained, surveys):
    labels = surveys[1].labels[:3]
    flux, jac = trained.predict_with_jacobian(labels)
    assert jac.shape == (3, 120, 3) and flux.dtype == np.float32
    step = 1e-3 * (trained.x_max - trained.x_min)
    for k in range(3):
        d = np.zeros(3)
        d[k] = step[k]
        fd = (trained.predict(labels + d).astype(float) - trained.predict(labels - d)) / (2 * step[k])
        # float32 flux differences over a step of 1e-3 of the range: ~1e-7 / 2e-3 relative noise
        np.testing.assert_allclose(jac[:, :, k], fd, rtol=0,
                                   atol=2e-3 * np.abs(jac[:, :, k]).max() + 1e-4 / step[k])


def test_write_read_round_trip(trained, tmp_path, surveys):
    path = tmp_path / "payne.npz"
    trained.write(path)
    for backend in ("fast", "reference"):
        again = PayneModel.read(path, backend=backend)
        assert again.label_names == trained.label_names and again.hidden == (64, 64)
        # reference vs fast prediction: float32, width 64 -> a few ulp of O(1) flux
        np.testing.assert_allclose(again.predict(surveys[1].labels), trained.predict(surveys[1].labels),
                                   rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="found format .starlabel.payne."):
        starlabel.CannonModel.read(path)


def test_payne_published_layout_round_trip(trained, tmp_path, surveys):
    path = tmp_path / "NN_normalized_spectra.npz"
    starlabel.write_payne_npz(trained, path)
    with np.load(path) as data:
        assert sorted(data.files) == sorted(["w_array_0", "w_array_1", "w_array_2", "b_array_0",
                                             "b_array_1", "b_array_2", "x_min", "x_max"])
        assert data["w_array_0"].shape == (64, 3)  # out x in, as The Payne
    again = starlabel.read_payne_npz(path, label_names=trained.label_names)
    np.testing.assert_array_equal(again.predict(surveys[1].labels), trained.predict(surveys[1].labels))
    silu = PayneModel(["A", "B"], hidden=(4,), activation="silu")
    silu._set_network(*silu.initialize(3), np.zeros(2), np.ones(2))
    with pytest.raises(ValueError, match="leaky ReLU"):
        starlabel.write_payne_npz(silu, tmp_path / "x.npz")


def test_backends_train_identically_for_a_few_epochs(surveys):
    train, _ = surveys
    models = [PayneModel(train.label_names, hidden=(16,), backend=b, dtype="float64").train(
        train.labels[:100], train.flux[:100], epochs=3, batch_size=32, seed=3) for b in ("fast", "reference")]
    # float64, 9 RAdam steps: both backends agree to ~1e-13 (see test_mlp_parity)
    for a, b in zip(models[0].weights + models[0].biases, models[1].weights + models[1].biases):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-10)
    np.testing.assert_allclose(models[0].history["validation_loss"], models[1].history["validation_loss"], rtol=1e-9)


def test_early_stopping_and_given_validation(surveys):
    train, test = surveys
    model = PayneModel(train.label_names, hidden=(8,))
    model.train(train.labels, train.flux, validation=(test.labels, test.flux), epochs=200,
                batch_size=250, learning_rate=1e-5, patience=2, seed=0,
                lr_schedule=lambda epoch: 1.0 if epoch < 3 else 0.0)
    # learning rate 0 from epoch 3: the validation loss stops improving; 2 stale epochs later it stops
    assert len(model.history["train_loss"]) == 5
    assert model.history["best_epoch"] == 2


def test_labels_outside_training_range_are_reported(trained):
    labels = np.array([trained.x_max + 1.0])
    with pytest.warns(OutsideTrainingRangeWarning, match="outside the training range"):
        flux = trained.predict(labels)
    assert np.all(np.isfinite(flux))
    trained.predict(labels, warn=False)  # silenced


def test_progress_bar_is_optional(surveys):
    train, _ = surveys
    model = PayneModel(train.label_names, hidden=(4,))
    try:
        import tqdm  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="tqdm"):
            model.train(train.labels, train.flux, epochs=1, progress=True)
    else:
        model.train(train.labels, train.flux, epochs=1, progress=True)


# -- BinSpec's real per-pixel networks ----------------------------------------------------

SUN_LIKE = {5: [5777.0, 4.44, 0.0, 0.0, 6.0], 4: [5777.0, 4.44, 0.0, 0.0]}


@pytest.mark.parametrize("name", ["NN_normalized_spectra.npz", "NN_unnormalized_spectra.npz"])
def test_binspec_networks_load_and_evaluate(shared_data, name):
    path = shared_data / "the_payne" / "binspec_2018" / name
    wave = np.load(shared_data / "the_payne" / "apogee_wavelength.npz")["wavelength"]
    models = {b: starlabel.read_binspec_npz(path, wavelength=wave, backend=b) for b in ("fast", "reference")}
    model = models["fast"]
    assert model.n_pixels == 7214 and model.dtype == np.float32
    labels = np.array([SUN_LIKE[model.n_labels],
                       0.5 * (model.x_min + model.x_max),
                       model.x_min + 0.2 * (model.x_max - model.x_min)])
    flux, jac = model.predict_with_jacobian(labels)
    flux_r, jac_r = models["reference"].predict_with_jacobian(labels)
    # float32, 5 hidden units per pixel: agreement to a few ulp of the flux scale
    np.testing.assert_allclose(flux, flux_r, rtol=0, atol=1e-6 * np.abs(flux_r).max())
    np.testing.assert_allclose(jac, jac_r, rtol=0, atol=1e-5 * np.abs(jac_r).max())
    assert np.all(np.isfinite(flux)) and np.all(np.isfinite(jac))
    if name == "NN_normalized_spectra.npz":
        # a normalized solar-type dwarf spectrum: continuum near 1, absorption lines below it
        assert 0.95 < np.percentile(flux[0], 90) < 1.05
        assert 0.3 < flux[0].min() < 0.95 and flux[0].max() < 1.2
        # hotter -> weaker lines overall (the mean line depth drops with Teff)
        assert jac[0, :, 0].mean() > 0
    else:
        # 10^6 H_nu: about 8 (8e-6 erg/s/cm^2/Hz/sr) for the Sun at 1.6 micron, rising with Teff
        assert 3 < np.median(flux[0]) < 20
        assert np.median(jac[0, :, 0]) > 0


def paper_era_arrays(n_pixels=300, n_hidden=10, n_labels=3, seed=4):
    """A network in the Payne paper era's published layout (w_array_0..2, b_array_0..2):
    per pixel a * sigmoid(v . sigmoid(U x + c) + d) + e, with a < 0 so that the flux dips."""
    rng = np.random.default_rng(seed)
    return {"w_array_0": rng.normal(0, 2, (n_pixels, n_hidden, n_labels)),
            "b_array_0": rng.normal(0, 1, (n_pixels, n_hidden)),
            "w_array_1": rng.normal(0, 1, (n_pixels, n_hidden)),
            "b_array_1": rng.normal(0, 1, n_pixels),
            "w_array_2": -rng.uniform(0.1, 0.6, n_pixels), "b_array_2": np.ones(n_pixels),
            "x_min": np.array([4000.0, 1.0, -1.0]), "x_max": np.array([5500.0, 3.5, 0.4])}


def test_paper_era_network_reads_evaluates_and_round_trips(tmp_path):
    arrays = paper_era_arrays()
    np.savez(tmp_path / "paper.npz", **arrays)
    model = starlabel.read_binspec_npz(tmp_path / "paper.npz", label_names=["T", "G", "M"])
    assert model.w2 is not None and "paper-era" in repr(model)
    labels = np.array([[4500.0, 2.0, -0.3], [5200.0, 3.1, 0.2]])
    # Oracle: the formula of SOURCE.md on the file's arrays, with scipy's logistic function
    from scipy.special import expit

    x = (labels - arrays["x_min"]) / (arrays["x_max"] - arrays["x_min"]) - 0.5
    hidden = expit(np.einsum("phk,sk->sph", arrays["w_array_0"], x) + arrays["b_array_0"])
    inner = np.einsum("ph,sph->sp", arrays["w_array_1"], hidden) + arrays["b_array_1"]
    expected = arrays["w_array_2"] * expit(inner) + arrays["b_array_2"]
    for backend in ("fast", "reference"):
        model.backend = backend
        np.testing.assert_allclose(model.predict(labels), expected, rtol=1e-13)
    model.backend = "fast"
    # our own format and the published layout give the same model back
    model.write(tmp_path / "own.npz")
    starlabel.write_payne_npz(model, tmp_path / "published.npz")
    for loaded in (starlabel.PerPixelPayneModel.read(tmp_path / "own.npz"),
                   starlabel.read_binspec_npz(tmp_path / "published.npz")):
        np.testing.assert_array_equal(loaded.predict(labels), model.predict(labels))
        np.testing.assert_array_equal(loaded.jacobian(labels), model.jacobian(labels))
    with np.load(tmp_path / "published.npz") as data:
        assert sorted(data.files) == sorted(arrays)


def test_paper_era_network_fits_spectra():
    """fit_spectra through the outer sigmoid: noiseless spectra give back their labels, and the
    backends agree."""
    arrays = paper_era_arrays(n_pixels=600)
    wave = 15200.0 * 10 ** (6e-6 * np.arange(600))
    model = starlabel.PerPixelPayneModel(
        ["T", "G", "M"], *(arrays[k] for k in ("w_array_0", "b_array_0", "w_array_1",
                                               "b_array_1", "x_min", "x_max")),
        w2=arrays["w_array_2"], b2=arrays["b_array_2"], wavelength=wave)
    truth = np.array([[4300.0, 1.8, -0.6], [5100.0, 2.9, 0.1]])
    flux = model.predict(truth)
    ivar = np.full_like(flux, 1e4)
    fits = {b: starlabel.fit_spectra(model, flux, ivar, fit_rv=False, backend=b)
            for b in ("fast", "reference")}
    assert np.all(fits["fast"].converged)
    np.testing.assert_allclose(fits["fast"].labels, truth, rtol=0,
                               atol=1e-3 * (arrays["x_max"] - arrays["x_min"]).max())
    np.testing.assert_allclose(fits["fast"].labels, fits["reference"].labels, rtol=1e-9)


def test_binspec_network_round_trips_through_both_formats(tmp_path, shared_data):
    path = shared_data / "the_payne" / "binspec_2018" / "NN_normalized_spectra.npz"
    model = starlabel.read_binspec_npz(path, dtype="float64")
    assert model.dtype == np.float64 and model.w2 is None
    model.write(tmp_path / "own.npz")
    starlabel.write_payne_npz(model, tmp_path / "published.npz")
    labels = 0.5 * (model.x_min + model.x_max)
    for loaded in (starlabel.PerPixelPayneModel.read(tmp_path / "own.npz"),
                   starlabel.read_binspec_npz(tmp_path / "published.npz")):
        assert loaded.w2 is None and loaded.label_names == model.label_names
        np.testing.assert_array_equal(loaded.predict(labels), model.predict(labels))
    with np.load(path) as original, np.load(tmp_path / "published.npz") as written:
        assert sorted(original.files) == sorted(written.files)
        for key in original.files:
            np.testing.assert_array_equal(written[key], original[key].astype(written[key].dtype))


def test_paper_era_bad_input_is_named(tmp_path):
    arrays = paper_era_arrays(n_pixels=20)
    np.savez(tmp_path / "half.npz", **{k: v for k, v in arrays.items() if k != "b_array_2"})
    with pytest.raises(ValueError, match="one of w_array_2 and b_array_2, not both"):
        starlabel.read_binspec_npz(tmp_path / "half.npz")
    np.savez(tmp_path / "short.npz", **dict(arrays, w_array_2=arrays["w_array_2"][:5]))
    with pytest.raises(ValueError, match=r"w_array_2 must have shape \(20,\)"):
        starlabel.read_binspec_npz(tmp_path / "short.npz")
    net = [arrays[k] for k in ("w_array_0", "b_array_0", "w_array_1", "b_array_1")]
    x = np.zeros((1, 3))
    for backend in (fast, reference):
        with pytest.raises(ValueError, match="give both w2 and b2"):
            backend.perpixel_forward(*net, x, w2=arrays["w_array_2"])
        with pytest.raises(ValueError, match="b2 contains NaN"):
            backend.perpixel_forward(*net, x, w2=arrays["w_array_2"],
                                     b2=np.full(20, np.nan))


def test_binspec_reader_rejects_mismatched_files(tmp_path, shared_data):
    with np.load(shared_data / "the_payne" / "binspec_2018" / "NN_normalized_spectra.npz") as data:
        arrays = {k: data[k] for k in data.files}
    bad = dict(arrays, b_array_0=arrays["b_array_0"][:, :4])
    np.savez(tmp_path / "bad.npz", **bad)
    with pytest.raises(ValueError, match="b_array_0 must have shape"):
        starlabel.read_binspec_npz(tmp_path / "bad.npz")
    np.savez(tmp_path / "nox.npz", **{k: v for k, v in arrays.items() if k != "x_max"})
    with pytest.raises(ValueError, match="lacks 'x_max'"):
        starlabel.read_binspec_npz(tmp_path / "nox.npz")
    with pytest.raises(ValueError, match="use read_binspec_npz"):
        starlabel.read_payne_npz(shared_data / "the_payne" / "binspec_2018" / "NN_normalized_spectra.npz")
    with pytest.raises(ValueError, match="label_names has 2 names"):
        starlabel.read_binspec_npz(shared_data / "the_payne" / "binspec_2018" / "NN_normalized_spectra.npz",
                                   label_names=["A", "B"])


def test_payne_reader_rejects_mismatched_files(tmp_path):
    rng = np.random.default_rng(0)
    arrays = dict(w_array_0=rng.normal(size=(6, 3)).astype(np.float32), b_array_0=np.zeros(6, np.float32),
                  w_array_1=rng.normal(size=(10, 5)).astype(np.float32), b_array_1=np.zeros(10, np.float32),
                  x_min=np.zeros(3), x_max=np.ones(3))
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match="weights\\[1\\] has 5 inputs"):
        starlabel.read_payne_npz(tmp_path / "bad.npz")
    np.savez(tmp_path / "nob.npz", **{k: v for k, v in arrays.items() if k != "b_array_1"})
    with pytest.raises(ValueError, match="lacks b_array_1"):
        starlabel.read_payne_npz(tmp_path / "nob.npz")
    with pytest.raises(FileNotFoundError):
        starlabel.read_payne_npz(tmp_path / "missing.npz")


# -- bad input: the same exception from both backends --------------------------------------

RNG = np.random.default_rng(1)
W = [RNG.normal(size=(5, 2)), RNG.normal(size=(3, 5))]
B = [np.zeros(5), np.zeros(3)]
X = RNG.normal(size=(4, 2))


def one_bad(array, index, value):
    """A copy of array with one element replaced."""
    array = array.copy()
    array[index] = value
    return array


CASES = {
    "NaN input": (dict(x=np.array([[np.nan, 0.0]])), ValueError, "x contains NaN"),
    "wrong input width": (dict(x=np.zeros((4, 3))), ValueError, "x must have 2 columns"),
    "layer mismatch": (dict(weights=[W[0], W[1][:, :4]]), ValueError, "weights\\[1\\] has 4 inputs"),
    "bias mismatch": (dict(biases=[np.zeros(4), B[1]]), ValueError, "biases\\[0\\] must have shape"),
    "mixed dtypes": (dict(weights=[W[0], W[1].astype(np.float32)]), TypeError, "share one dtype"),
    "integer weights": (dict(weights=[np.ones((5, 2), int), W[1]]), TypeError, "float32 or float64"),
    "NaN weight": (dict(weights=[np.full((5, 2), np.nan), W[1]]), ValueError, "weights\\[0\\] contains NaN"),
    # the fast backend checks the network only when its forward pass meets a non-finite value:
    # one bad parameter anywhere, also where a saturating activation hides it
    "one inf weight, sigmoid": (dict(weights=[W[0], one_bad(W[1], (2, 4), np.inf)], activation="sigmoid"),
                                ValueError, "weights\\[1\\] contains NaN or inf"),
    "one -inf hidden weight, tanh": (dict(weights=[one_bad(W[0], (1, 1), -np.inf), W[1]], activation="tanh"),
                                     ValueError, "weights\\[0\\] contains NaN or inf"),
    "NaN output bias": (dict(biases=[B[0], one_bad(B[1], (2,), np.nan)]), ValueError, "biases\\[1\\] contains NaN"),
    "inf hidden bias, sigmoid": (dict(biases=[one_bad(B[0], (3,), np.inf), B[1]], activation="sigmoid"),
                                 ValueError, "biases\\[0\\] contains NaN or inf"),
    "unknown activation": (dict(activation="gelu"), ValueError, "activation must be one of"),
    "layer count": (dict(biases=[B[0]]), ValueError, "weights has 2 layers but biases has 1"),
    "no layers": (dict(weights=[], biases=[]), ValueError, "at least one layer"),
    "threads 0": (dict(n_threads=0), ValueError, "n_threads"),
    "string input": (dict(x=np.full((4, 2), "a")), TypeError, "x must hold real numbers"),
}


@pytest.mark.parametrize("backend", [fast, reference], ids=["fast", "reference"])
@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_forward_rejects_bad_input(backend, case):
    changes, error, message = CASES[case]
    args = dict(weights=W, biases=B, x=X)
    args.update(changes)
    with pytest.raises(error, match=message):
        backend.mlp_forward(args.pop("weights"), args.pop("biases"), args.pop("x"), **args)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("n_stars", [10, 600], ids=["weights packed per block", "packed ahead"])
@pytest.mark.parametrize("row", [0, 52], ids=["whole panel", "last partial panel"])
def test_forward_reports_one_bad_output_weight(isa_core, n_stars, row, dtype):
    """The output layer's kernel checks its outputs as they leave its registers: one inf weight
    there, in a whole panel of 48 / 24 / 12 outputs or in the partial last one, makes the fast
    backend look at the network and name it."""
    rng = np.random.default_rng(7)
    weights = [rng.normal(size=(5, 2)).astype(dtype),
               one_bad(rng.normal(size=(53, 5)), (row, 3), np.inf).astype(dtype)]
    biases = [np.zeros(5, dtype), np.zeros(53, dtype)]
    x = rng.uniform(-0.5, 0.5, (n_stars, 2))
    with pytest.raises(ValueError, match="weights\\[1\\] contains NaN or inf"):
        fast.mlp_forward(weights, biases, x)


def test_forward_overflow_of_a_finite_network_is_not_an_error():
    """A finite network whose outputs overflow float32 gives inf, as NumPy does, and no
    false complaint about its parameters (the fast backend looks at them only then)."""
    weights = [w.astype(np.float32) * 1e25 for w in W]
    biases = [b.astype(np.float32) for b in B]
    with np.errstate(over="ignore", invalid="ignore"):
        expected = reference.mlp_forward(weights, biases, X)
    assert not np.all(np.isfinite(expected))
    np.testing.assert_array_equal(np.isfinite(fast.mlp_forward(weights, biases, X)),
                                  np.isfinite(expected))


TRAIN_CASES = {
    "not a permutation": (dict(order=np.zeros(4, int)), ValueError, "permutation"),
    "float order": (dict(order=np.arange(4.0)), TypeError, "order must hold integers"),
    "target shape": (dict(target=np.zeros((4, 2))), ValueError, "target must have shape"),
    "NaN target": (dict(target=np.full((4, 3), np.nan)), ValueError, "target contains NaN"),
    "unknown optimizer": (dict(optimizer="sgd"), ValueError, "optimizer must be one of"),
    "unknown loss": (dict(loss="huber"), ValueError, "loss must be one of"),
    "negative pixel weights": (dict(pixel_weights=-np.ones(3)), ValueError, "pixel_weights must be >= 0"),
    "batch size 0": (dict(batch_size=0), ValueError, "batch_size"),
    "learning rate per batch": (dict(learning_rate=[1e-3, 1e-3]), ValueError, "one per batch"),
    "read-only weights": (dict(weights="readonly"), TypeError, "writeable"),
    "bad state": (dict(state={}), ValueError, "state lacks"),
}


@pytest.mark.parametrize("backend", [fast, reference], ids=["fast", "reference"])
@pytest.mark.parametrize("case", TRAIN_CASES, ids=list(TRAIN_CASES))
def test_training_rejects_bad_input(backend, case):
    changes, error, message = TRAIN_CASES[case]
    weights, biases = [w.copy() for w in W], [b.copy() for b in B]
    if changes.get("weights") == "readonly":
        weights[0].flags.writeable = False
        changes = {}
    args = dict(state=backend.new_optimizer_state(weights, biases), x=X,
                target=np.zeros((4, 3)), order=np.arange(4))
    args.update(changes)
    before = [w.copy() for w in weights]
    with pytest.raises(error, match=message):
        backend.mlp_train_epoch(weights, biases, args.pop("state"), args.pop("x"), args.pop("target"),
                                args.pop("order"), **args)
    for a, b in zip(weights, before):
        np.testing.assert_array_equal(a, b)


def test_model_level_errors():
    with pytest.raises(ValueError, match="activation must be one of"):
        PayneModel(["A"], activation="gelu")
    with pytest.raises(ValueError, match="dtype must be one of"):
        PayneModel(["A"], dtype="float16")
    with pytest.raises(ValueError, match="backend must be one of"):
        PayneModel(["A"], backend="gpu")
    model = PayneModel(["A", "B"], hidden=(4,))
    with pytest.raises(RuntimeError, match="not trained"):
        model.predict([[0.0, 0.0]])
    labels = np.column_stack([np.linspace(0, 1, 20), np.ones(20)])
    with pytest.raises(ValueError, match=r"\['B'\] are constant"):
        model.train(labels, np.ones((20, 3)))
    with pytest.raises(ValueError, match="labels contains NaN"):
        model.train(np.full((20, 2), np.nan), np.ones((20, 3)))
    with pytest.raises(ValueError, match="stars"):
        model.train(labels, np.ones((19, 3)))
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        model.train(labels + np.arange(20)[:, None], np.ones((20, 3)), lr_schedule="warm")
