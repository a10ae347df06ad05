"""The pure-NumPy backend: the same functions as starlabel.fast, written for clarity.

It never imports the compiled core. It is slow, and it is the oracle the compiled core is
tested against (and is itself tested against independent solvers). ``n_threads`` is
accepted for a common signature and ignored.
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
