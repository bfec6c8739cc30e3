__version__ = "0.2.0"

import os as _os

# OpenMP threads (LightGBM, torch, BLAS) spin while waiting by default; on a busy 2-core machine that made fits
# 15-40x slower. Set before any submodule can import those libraries (pipeline_lib.config repeats it for safety).
_os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
