"""Load the compiled core built for the best instruction-set level this CPU supports.

The core is built as one extension module per x86-64 level (``_core_baseline``,
``_core_avx2``, ``_core_avx512``; ``_core_native`` on other architectures). The
environment variable ``STARLABEL_ISA`` forces a level (``baseline``, ``avx2``, ``avx512``).
"""

import importlib
import importlib.util
import os

LEVELS = ("avx512", "avx2", "baseline", "native")  # best first


def _built_levels():
    spec = importlib.util.find_spec
    return tuple(lv for lv in LEVELS if spec(f"starlabel._core_{lv}") is not None)


def _import_level(level):
    return importlib.import_module(f"starlabel._core_{level}")


def load(level=None):
    """Import and return the core module for ``level`` (default: STARLABEL_ISA or the best).

    Raises ImportError if no core is built, or if the forced level is not built or not
    supported by this CPU.
    """
    built = _built_levels()
    if not built:
        raise ImportError("starlabel's compiled core is not built; reinstall with `pip install .`")
    # The lowest level runs anywhere, so it can tell which others this CPU supports.
    probe = _import_level(built[-1])
    supported = tuple(lv for lv in built if probe.cpu_supports(lv))
    forced = level or os.environ.get("STARLABEL_ISA", "").strip().lower() or None
    if forced is not None:
        if forced not in built:
            raise ImportError(f"STARLABEL_ISA={forced!r} is not built; built levels: {built}")
        if forced not in supported:
            raise ImportError(f"STARLABEL_ISA={forced!r} is not supported by this CPU; "
                              f"supported levels: {supported}")
        return _import_level(forced)
    return _import_level(supported[0])


def supported_levels():
    """Levels that are both built and runnable on this CPU, best first."""
    built = _built_levels()
    if not built:
        return ()
    probe = _import_level(built[-1])
    return tuple(lv for lv in built if probe.cpu_supports(lv))


core = load()
level = core.__name__.rsplit("_core_", 1)[1]
