import os
import pathlib

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
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (it sits beside the checkout in CI)")
    return SHARED_DATA


def pytest_report_header(config):
    return [f"starlabel core: {_core.level} (levels run by this CPU: {_core.supported_levels()}), "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"]
