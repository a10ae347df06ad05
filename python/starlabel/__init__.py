"""starlabel: stellar labels from spectra with The Cannon and The Payne, on a fast compiled core.

- ``CannonModel``: train, predict, fit labels, save and load.
- ``PayneModel`` (labels -> flux) and ``LabelRegressor`` (flux -> labels): dense MLPs.
- ``starlabel.fast`` / ``starlabel.reference``: the same kernels, compiled or in NumPy.
- ``starlabel.datasets.synthetic_survey``: a seeded synthetic survey for demos and tests.
- ``show_config()``, ``set_num_threads()``.
"""

__version__ = "0.1.0"

from . import datasets, fast, reference
from .cannon import CannonModel
from .config import get_num_threads, set_num_threads, show_config
from .payne import OutsideTrainingRangeWarning, PayneModel, PerPixelPayneModel
from .payne_io import read_binspec_npz, read_payne_npz, write_payne_npz
from .result import FitResult
from .status import FitStatus, PixelStatus
from .vectorizer import PolynomialVectorizer
from . import io, preprocess
from .augment import Augmented, augment
from .gap import SyntheticGap, synthetic_gap
from .io import (read_apstar, read_apstars, read_apvisit, read_fits_spectra, read_fits_spectrum,
                 read_labels, read_results, write_results)
from .fitting import SpectrumFitResult, fit_spectra, start_grid
from .regressor import LabelRegressor

__all__ = [
    "CannonModel", "FitResult", "FitStatus", "PixelStatus", "PolynomialVectorizer",
    "datasets", "fast", "reference", "get_num_threads", "set_num_threads", "show_config",
]
__all__ += ["PayneModel", "PerPixelPayneModel", "OutsideTrainingRangeWarning",
            "read_payne_npz", "write_payne_npz", "read_binspec_npz"]
__all__ += ["io", "preprocess", "augment", "Augmented", "read_apstar", "read_apstars",
            "read_apvisit", "read_fits_spectrum", "read_fits_spectra", "read_labels",
            "read_results", "write_results"]
__all__ += ["synthetic_gap", "SyntheticGap"]
__all__ += ["fit_spectra", "SpectrumFitResult", "start_grid"]
__all__ += ["LabelRegressor"]
