"""Session-wide test setup. The synthetic bars every test builds live in tests/synthetic.py (`from synthetic import ...`)."""
from __future__ import annotations

import os

os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')  # before LightGBM/OpenMP load: spinning threads starve 2 cores
