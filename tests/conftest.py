import os
import pathlib

import numpy as np
import pytest

import starlabel
from starlabel import _core
from starlabel.datasets import synthetic_survey

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(params=_core.supported_levels())
def isa_core(request, monkeypatch):
    """Run the test once per instruction-set level this CPU supports, through starlabel.fast."""
    module = _core.load(request.param)
    for name in dir(starlabel.fast):
        area = getattr(starlabel.fast, name)
        if getattr(area, "core", None) is _core.core:
            monkeypatch.setattr(area, "core", module)
    return module


@pytest.fixture(scope="session")
def survey():
    """A small noisy synthetic survey: 300 training stars, 3 labels, 120 pixels."""
    return synthetic_survey(300, n_pixels=120, snr=80.0, seed=11)


@pytest.fixture(scope="session")
def non_convex_pixels():
    """Pixels whose s2 profile objective has a local minimum at s2 = 0 and a lower one far out.

    A straight line in one label (exponents (n_terms, 1)), 12 stars: two very precise ones fix
    the line exactly (flux 1), ten with ivar 1 scatter around it. Pixel 0: +-3, global minimum
    at s2 = 6.17, between the largest r^2 (9) and the check's next grid point, so the restart
    lands above it. Pixel 1: less precise anchors (ivar 1e3) and uneven scatter (2-4): the
    restart lands below the minimum. Pixel 2: +-1.5, where s2 = 0 is the global minimum.
    Returns (exponents, x, flux, ivar) with flux, ivar (12, 3).
    """
    jitter = 1 + np.random.default_rng(0).random(10)
    alternating = (-1.0) ** np.arange(10)
    scatter = np.column_stack([3 * alternating, 2 * alternating * jitter, 1.5 * alternating])
    flux = np.vstack([np.ones((2, 3)), 1 + scatter])
    ivar = np.vstack([[[1e6, 1e3, 1e6]] * 2, np.ones((10, 3))])
    x = np.r_[-1.0, 1.0, np.linspace(-1, 1, 10)][:, None]
    return np.array([[0], [1]], np.int32), x, flux, ivar


@pytest.fixture(scope="session")
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (it sits beside the checkout in CI)")
    return SHARED_DATA


def pytest_report_header(config):
    return [f"starlabel core: {_core.level} (levels run by this CPU: {_core.supported_levels()}), "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"]
