"""The compiled backend: the same functions as starlabel.reference, run by the C++ core.

Functions take and return plain NumPy arrays; ``n_threads=None`` uses the default thread
count (``starlabel.set_num_threads``). The GIL is released while the core works.
"""

from .cannon import cannon_fit, cannon_predict, cannon_train
from .payne import (mlp_forward, mlp_gradients, mlp_train_epoch, new_optimizer_state,
                    perpixel_forward)
from .spectra import convolve, resample, running_quantile
from .fitting import rv_chi2_grid, spectrum_fit, spectrum_model

__all__ = ["cannon_train", "cannon_predict", "cannon_fit"]
__all__ += ["resample", "convolve", "running_quantile"]
__all__ += ["mlp_forward", "mlp_gradients", "mlp_train_epoch", "new_optimizer_state",
            "perpixel_forward"]
__all__ += ["spectrum_model", "spectrum_fit", "rv_chi2_grid"]
