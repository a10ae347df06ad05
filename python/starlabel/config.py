"""Build facts, instruction-set level and thread count."""

import operator
import os

from . import _core

_n_threads = None


def set_num_threads(n_threads):
    """Set the default number of threads of every compiled call (None: back to OpenMP's default).

    OpenMP's default is all cores, or ``OMP_NUM_THREADS``, or a threadpoolctl limit.
    """
    global _n_threads
    if n_threads is not None:
        n_threads = _check_threads(n_threads)
    _n_threads = n_threads


def get_num_threads():
    """Threads a compiled call uses when its ``n_threads`` is None."""
    return _n_threads if _n_threads is not None else _core.core.default_threads()


def _check_threads(n_threads):
    if isinstance(n_threads, bool):
        raise TypeError("n_threads must be an int or None, got bool")
    try:
        n_threads = operator.index(n_threads)
    except TypeError:
        raise TypeError(f"n_threads must be an int or None, got {type(n_threads).__name__}") from None
    if n_threads < 1:
        raise ValueError(f"n_threads must be >= 1, got {n_threads}")
    return n_threads


def resolve_threads(n_threads):
    """The thread count to pass to the core: 0 means OpenMP's default."""
    if n_threads is None:
        return _n_threads or 0
    return _check_threads(n_threads)


def show_config(file=None):
    """Print the version, instruction-set levels, OpenMP, compiler and default threads."""
    from . import __version__

    core = _core.core
    lines = [
        f"starlabel {__version__}",
        f"  instruction set loaded : {_core.level}"
        + (f" (forced by STARLABEL_ISA={os.environ['STARLABEL_ISA']})" if os.environ.get("STARLABEL_ISA") else ""),
        f"  levels built           : {', '.join(_core._built_levels())}",
        f"  levels this CPU runs   : {', '.join(_core.supported_levels())}",
        f"  OpenMP                 : {core.openmp or 'no'}",
        f"  compiler               : {core.compiler}",
        f"  default threads        : {get_num_threads()}",
    ]
    print("\n".join(lines), file=file)
