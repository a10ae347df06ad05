"""The compiled core's packaging: instruction-set modules, configuration, threads, statuses."""

import io
import os
import subprocess
import sys

import pytest

import starlabel
from starlabel import _core
from starlabel.status import FitStatus, PixelStatus


def test_best_supported_level_is_loaded():
    assert _core.level == _core.supported_levels()[0]


@pytest.mark.parametrize("level", _core.supported_levels())
def test_every_supported_level_imports_and_agrees_on_statuses(level):
    module = _core.load(level)
    assert module.FIT_STATUS == {s.name: s.value for s in FitStatus}
    assert module.PIXEL_STATUS == {s.name: s.value for s in PixelStatus}
    assert module.__version__ == starlabel.__version__


def test_environment_variable_forces_a_level():
    level = _core.supported_levels()[-1]
    code = "import starlabel._core as c; print(c.level)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "STARLABEL_ISA": level})
    assert out.stdout.strip() == level


def test_unknown_forced_level_is_a_clear_import_error():
    out = subprocess.run([sys.executable, "-c", "import starlabel"], capture_output=True, text=True,
                         env={**os.environ, "STARLABEL_ISA": "sse9"})
    assert out.returncode != 0 and "STARLABEL_ISA='sse9' is not built" in out.stderr


def test_show_config_reports_build_facts():
    buffer = io.StringIO()
    starlabel.show_config(file=buffer)
    text = buffer.getvalue()
    for needle in (starlabel.__version__, f"loaded : {_core.level}", "OpenMP", "compiler",
                   "default threads"):
        assert needle in text
    rows = (line.split(" : ", 1) for line in text.splitlines()[1:])
    fields = {name.strip(): value.strip() for name, value in rows}
    built, runs = fields["levels built"].split(", "), fields["levels this CPU runs"].split(", ")
    assert built == list(_core._built_levels())   # every _core_<level> module, best first
    assert runs == list(_core.supported_levels())
    assert set(runs) <= set(built) <= set(_core.LEVELS)
    assert built == [lv for lv in _core.LEVELS if lv in built]
    assert fields["instruction set loaded"].split()[0] == _core.level and _core.level in runs
    assert fields["default threads"] == str(starlabel.get_num_threads())


def test_set_num_threads_round_trip():
    try:
        starlabel.set_num_threads(1)
        assert starlabel.get_num_threads() == 1
        with pytest.raises(ValueError, match="n_threads"):
            starlabel.set_num_threads(0)
        with pytest.raises(TypeError, match="n_threads"):
            starlabel.set_num_threads(1.5)
    finally:
        starlabel.set_num_threads(None)
    assert starlabel.get_num_threads() >= 1


def test_threadpoolctl_limits_the_default_thread_count():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    with threadpoolctl.threadpool_limits(1, user_api="openmp"):
        assert starlabel.get_num_threads() == 1
