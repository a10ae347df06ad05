"""Bad input raises the same clear exception from both backends and never crashes."""

import numpy as np
import pytest

from starlabel import CannonModel, fast, reference
from starlabel.vectorizer import PolynomialVectorizer

BACKENDS = [fast, reference]
EXPONENTS = PolynomialVectorizer(["A", "B"], 2).exponents


def good_training(n_stars=30, n_pixels=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (n_stars, 2))
    flux = 1 + 0.1 * x[:, :1] + rng.normal(0, 0.01, (n_stars, n_pixels))
    return x, flux, np.full((n_stars, n_pixels), 1e4)


def with_value(array, index, value):
    array = array.copy()
    array[index] = value
    return array


x, flux, ivar = good_training()
TRAINING_CASES = {
    "NaN flux where ivar > 0": (dict(flux=with_value(flux, (0, 0), np.nan)), ValueError, "flux is NaN"),
    "inf flux where ivar > 0": (dict(flux=with_value(flux, (3, 1), np.inf)), ValueError, "flux is NaN or inf"),
    "negative ivar": (dict(ivar=with_value(ivar, (0, 0), -1.0)), ValueError, "ivar contains negative"),
    "NaN ivar": (dict(ivar=with_value(ivar, (0, 0), np.nan)), ValueError, "ivar contains NaN"),
    "flux/ivar shape mismatch": (dict(ivar=ivar[:, :3]), ValueError, "same shape"),
    "labels/flux star mismatch": (dict(x=x[:-1]), ValueError, "stars"),
    "wrong label count": (dict(x=x[:, :1]), ValueError, "columns"),
    "empty flux": (dict(flux=flux[:, :0], ivar=ivar[:, :0]), ValueError, "empty"),
    "no training stars": (dict(x=x[:0], flux=flux[:0], ivar=ivar[:0]), ValueError,
                          r"x is empty \(shape \(0, 2\)\)"),
    "NaN label": (dict(x=with_value(x, (2, 1), np.nan)), ValueError, "x contains NaN"),
    "string flux": (dict(flux=np.full(flux.shape, "a")), TypeError, "flux must hold real numbers"),
    "complex ivar": (dict(ivar=ivar.astype(complex)), TypeError, "ivar must hold real numbers"),
    "3-D flux": (dict(flux=flux[None], ivar=ivar[None]), ValueError, "dimension"),
    "negative regularization": (dict(regularization=-1.0), ValueError, "regularization"),
    "NaN regularization": (dict(regularization=np.nan), ValueError, "regularization"),
    "non-boolean term mask": (dict(term_mask=np.ones((4, 6))), TypeError, "term_mask"),
    "censored constant term": (dict(term_mask=np.zeros((4, 6), bool)), ValueError, "constant term"),
    "negative fixed s2": (dict(s2=-1.0), ValueError, "s2"),
    "float exponents": (dict(exponents=EXPONENTS.astype(float)), TypeError, "exponents"),
    "threads = 0": (dict(n_threads=0), ValueError, "n_threads"),
}


@pytest.mark.parametrize("backend", BACKENDS, ids=["fast", "reference"])
@pytest.mark.parametrize("case", TRAINING_CASES, ids=list(TRAINING_CASES))
def test_training_rejects_bad_input(backend, case):
    changes, error, message = TRAINING_CASES[case]
    args = dict(exponents=EXPONENTS, x=x, flux=flux, ivar=ivar)
    args.update(changes)
    passed = {k: v for k, v in args.items() if isinstance(v, np.ndarray)}
    before = {k: v.copy() for k, v in passed.items()}
    positional = [args.pop(k) for k in ("exponents", "x", "flux", "ivar")]
    with pytest.raises(error, match=message):
        backend.cannon_train(*positional, **args)
    for name, value in passed.items():  # nothing the caller passed is modified
        np.testing.assert_array_equal(value, before[name])


@pytest.mark.parametrize("backend", BACKENDS, ids=["fast", "reference"])
def test_nan_flux_where_ivar_is_zero_is_fine(backend):
    theta, _, status = backend.cannon_train(EXPONENTS, x, with_value(flux, (0, 0), np.nan),
                                            with_value(ivar, (0, 0), 0.0))
    assert np.all(np.isfinite(theta)) and np.all(status == 0)


theta, s2, _ = fast.cannon_train(EXPONENTS, x, flux, ivar)
FIT_CASES = {
    "theta columns": (dict(theta=theta[:, :5]), ValueError, "theta must have 6 columns"),
    "s2 length": (dict(s2=s2[:2]), ValueError, "s2 must have shape"),
    "negative s2": (dict(s2=with_value(s2, 0, -1.0)), ValueError, "s2 must be >= 0"),
    "flux pixels": (dict(flux=flux[:, :3], ivar=ivar[:, :3]), ValueError, "pixels"),
    "initial labels": (dict(initial=np.zeros(3)), ValueError, "initial"),
    "NaN initial": (dict(initial=np.array([np.nan, 0.0])), ValueError, "initial contains NaN"),
    "lower above upper": (dict(lower=np.ones(2), upper=np.zeros(2)), ValueError, "lower must be <= upper"),
    "bounds shape": (dict(lower=np.zeros(3)), ValueError, "lower"),
    "max_iter 0": (dict(max_iter=0), ValueError, "max_iter"),
    "max_iter float": (dict(max_iter=2.5), TypeError, "max_iter"),
    "NaN flux where ivar > 0": (dict(flux=with_value(flux, (1, 1), np.nan)), ValueError, "flux is NaN"),
    "no spectra": (dict(flux=flux[:0], ivar=ivar[:0]), ValueError,
                   r"flux is empty \(shape \(0, 4\)\)"),
    "no spectra in ivar": (dict(ivar=ivar[:0]), ValueError, r"ivar is empty \(shape \(0, 4\)\)"),
}


@pytest.mark.parametrize("backend", BACKENDS, ids=["fast", "reference"])
@pytest.mark.parametrize("case", FIT_CASES, ids=list(FIT_CASES))
def test_fit_rejects_bad_input(backend, case):
    changes, error, message = FIT_CASES[case]
    args = dict(exponents=EXPONENTS, theta=theta, s2=s2, flux=flux, ivar=ivar, initial=np.zeros(2))
    args.update(changes)
    positional = [args.pop(k) for k in ("exponents", "theta", "s2", "flux", "ivar", "initial")]
    with pytest.raises(error, match=message):
        backend.cannon_fit(*positional, **args)


def test_core_bindings_check_arrays_themselves():
    """The bindings name the argument even when called directly, past the Python checks."""
    from starlabel._core import core

    exps = EXPONENTS
    with pytest.raises(TypeError, match="theta_t must have dtype float64"):
        core.cannon_predict(exps, np.zeros((6, 4), np.float32), np.zeros((1, 2)), False, 0)
    with pytest.raises(TypeError, match="x must be C-contiguous"):
        core.cannon_predict(exps, np.zeros((6, 4)), np.zeros((2, 4))[:, ::2], False, 0)
    with pytest.raises(ValueError, match="x has size 3 along axis 1"):
        core.cannon_predict(exps, np.zeros((6, 4)), np.zeros((1, 3)), False, 0)
    with pytest.raises(ValueError, match="exponents must be >= 0"):
        core.cannon_predict(-np.ones((6, 2), np.int32), np.zeros((6, 4)), np.zeros((1, 2)), False, 0)
    with pytest.raises(ValueError, match="gram_index"):
        core.cannon_train(np.ones((3, 1)), np.ones((3, 1)), np.full((1, 1), 5, np.int64),
                          np.zeros(1, np.uint8), None, np.ones((3, 2)), np.ones((3, 2)), None, 0.0, 0)


@pytest.mark.parametrize("backend", ["fast", "reference"])
def test_model_level_errors(backend):
    model = CannonModel(["A", "B"], backend=backend)
    labels = np.random.default_rng(0).uniform(0, 1, (30, 2))
    with pytest.raises(RuntimeError, match="not trained"):
        model.predict(labels)
    with pytest.raises(ValueError, match="fewer than the 6 terms"):
        model.train(labels[:5], flux[:5], ivar[:5])
    with pytest.raises(ValueError, match=r"\['B'\] are constant"):
        model.train(np.column_stack([labels[:, 0], np.ones(30)]), flux, ivar)
    with pytest.raises(ValueError, match="order must be 1, 2 or 3"):
        CannonModel(["A"], order=4, backend=backend)
    with pytest.raises(ValueError, match="backend must be one of"):
        CannonModel(["A"], backend="gpu")
    with pytest.raises(ValueError, match="duplicates"):
        CannonModel(["A", "A"], backend=backend)
    with pytest.raises(ValueError, match="cannot read 'C\\^2'"):
        CannonModel(["A", "B"], terms=["A", "C^2"], backend=backend)
    with pytest.raises(ValueError, match="censors"):
        CannonModel(["A", "B"], censors={"C": np.ones(4, bool)}, backend=backend)
    model.train(labels, flux, ivar)
    with pytest.raises(ValueError, match="bounds must be one of"):
        model.fit_labels(flux, ivar, bounds="everything")


@pytest.mark.parametrize("backend", ["fast", "reference"])
def test_model_rejects_empty_arrays(backend):
    """Zero training stars or zero spectra to fit: a ValueError naming the empty argument."""
    model = CannonModel(["A", "B"], backend=backend)
    with pytest.raises(ValueError, match=r"^labels is empty \(shape \(0, 2\)\)$"):
        model.train(np.empty((0, 2)), np.empty((0, 4)), np.empty((0, 4)))
    with pytest.raises(ValueError, match=r"^flux is empty \(shape \(0, 4\)\)$"):
        model.train(x, flux[:0], ivar[:0])
    assert not model.is_trained
    model.train(x, flux, ivar)
    with pytest.raises(ValueError, match=r"^flux is empty \(shape \(0, 4\)\)$"):
        model.fit_labels(np.empty((0, 4)), np.empty((0, 4)))
    with pytest.raises(ValueError, match=r"^ivar is empty \(shape \(0, 4\)\)$"):
        model.fit_labels(flux[:1], np.empty((0, 4)))
    with pytest.raises(ValueError, match=r"^initial is empty"):
        model.fit_labels(flux[:2], ivar[:2], initial=np.empty((2, 0, 2)))
    assert model.fit_labels(flux[:1], ivar[:1]).labels.shape == (1, 2)   # still usable
