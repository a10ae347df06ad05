"""Status codes returned per spectrum (label fits) and per pixel (Cannon training).

The compiled core uses the same numbers (``starlabel/common.hpp``); a test checks they agree.
"""

from enum import IntEnum


class FitStatus(IntEnum):
    """Outcome of one spectrum's label fit."""

    CONVERGED = 0   #: chi2 decrease or step below tolerance
    MAX_ITER = 1    #: iteration limit reached; labels are the best point found
    NO_PIXELS = 2   #: fewer usable pixels than labels; labels are the starting point
    NON_FINITE = 3  #: model or chi2 not finite at the starting point


class PixelStatus(IntEnum):
    """Outcome of training one Cannon pixel."""

    OK = 0             #: theta and s2 found to full precision
    TOO_FEW_STARS = 1  #: fewer stars with ivar > 0 than free terms; theta NaN, s2 inf
    SINGULAR = 2       #: normal equations singular; theta NaN, s2 inf
    NOT_CONVERGED = 3  #: s2 or L1 iterations hit their limit; theta, s2 usable, not final
