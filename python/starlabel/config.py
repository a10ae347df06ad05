"""Build facts, instruction-set level and thread count."""

import os

from . import _core
from . import _validation as check

_n_threads = None


def set_num_threads(n_threads):
    """Set the default number of threads of every compiled call (None: back to OpenMP's default).

    OpenMP's default is all cores, or ``OMP_NUM_THREADS``, or a threadpoolctl limit.
    """
    global _n_threads
    if n_threads is not None:
        n_threads = check.thread_count(n_threads)
    _n_threads = n_threads


def get_num_threads():
    """Threads a compiled call uses when its ``n_threads`` is None."""
    return _n_threads if _n_threads is not None else _core.core.default_threads()


def resolve_threads(n_threads):
    """The thread count to pass to the core: 0 means OpenMP's default."""
    if n_threads is None:
        return _n_threads or 0
    return check.thread_count(n_threads)


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
