#!/usr/bin/env bash
# Create the optional benchmark environments, each in its own venv, with pinned versions.
# Nothing here touches the interpreter that runs pytest: the peers are driven through
# subprocesses (benchmarks/peers/run_*.py) and torch is imported only in its own venv.
#
#   bash benchmarks/peers/setup.sh [PREFIX]        # default PREFIX=/tmp
#
# then run the suite with the printed environment variables (or --peer-python NAME=PATH).
set -euo pipefail
PREFIX="${1:-/tmp}"
PY="${PYTHON:-python3}"

# annieslasso (import name thecannon), Casey et al. 2016. Its train() breaks on NumPy 2.4,
# so it gets NumPy 2.3.x; it imports scipy and six at run time.
"$PY" -m venv "$PREFIX/peer-annieslasso"
"$PREFIX/peer-annieslasso/bin/pip" install -q "numpy==2.3.*" scipy six "annieslasso==0.2.96"

# TheCannon (import name TheCannon), Ho et al. 2017. It declares no dependencies; it imports
# numpy, scipy, matplotlib and astropy at module level.
"$PY" -m venv "$PREFIX/peer-thecannon"
"$PREFIX/peer-thecannon/bin/pip" install -q numpy scipy matplotlib astropy "TheCannon==0.7.3"

# PyTorch on CPU. --system-site-packages so the installed starlabel (and pytest,
# pytest-benchmark) are importable there: the torch benchmarks run pytest with this python.
"$PY" -m venv --system-site-packages "$PREFIX/venv-torch"
"$PREFIX/venv-torch/bin/pip" install -q "torch==2.13.0"

cat <<MSG
Done. Run the peer and torch benchmarks with:
  export STARLABEL_PEER_ANNIESLASSO=$PREFIX/peer-annieslasso/bin/python
  export STARLABEL_PEER_THECANNON=$PREFIX/peer-thecannon/bin/python
  $PREFIX/venv-torch/bin/python -m pytest benchmarks ...
MSG
