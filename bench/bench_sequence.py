"""Benchmark the Phase 3 sequence models: training windows per second (and per CPU-second), prediction windows per
second, and the memory a fit + predict adds, per model, on CPU at each thread count asked for and on a GPU when one
is available (device auto), printing a table.

    .venv/bin/python bench/bench_sequence.py                       # default config's models, CPU 1 thread (+ GPU)
    .venv/bin/python bench/bench_sequence.py --threads 1,2         # compare thread counts
    .venv/bin/python bench/bench_sequence.py --windows 2048 --quick   # a fast look

Inputs are random (throughput does not depend on the values): `--rows` rows x `--features` features (default 61,
Phase 1's N + 11), 10 symbols, windows of `--lookback` bars, the architectures of configs/models/*.yaml. Each
model trains 2 epochs of `--windows` windows (the first includes warm-up) without validation, then predicts
`--predict` windows. On a shared machine wall time depends on the neighbours: windows per CPU-second (all threads)
is what a quiet core would give per thread, and the load average is printed. Memory: the peak resident-set growth
during fit + predict (sampled every 5 ms, after a small warm-up fit of every model so that one-time library and
allocator growth is not counted), beside the size of the feature array and of what materialising every window
would take: the growth is the batch's activations, independent of the number of windows. Not a test: exit
status 0 always.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pipeline_lib.core.config  # noqa: E402,F401  first: sets OMP_WAIT_POLICY=PASSIVE before any OpenMP runtime starts
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from pipeline_lib.models.sequence import fit_sequence_model, predict_windows, window_ends  # noqa: E402
from pipeline_lib.models.sequence_nets import MODELS, model_config  # noqa: E402


def _rss() -> int:
    with open('/proc/self/statm') as f: return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


class PeakRSS:
    "Peak resident-set growth over the `with` block, sampled every 5 ms."
    def __enter__(self):
        gc.collect()
        self.base, self.peak, self._stop = _rss(), 0, False
        self._t = threading.Thread(target=self._run, daemon=True); self._t.start()
        return self

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, _rss() - self.base); time.sleep(0.005)

    def __exit__(self, *exc):
        self._stop = True; self._t.join()
        self.peak = max(self.peak, _rss() - self.base)


def panel(rows: int, features: int, n_sym: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((rows, features)).astype(np.float32)
    y = rng.standard_normal(rows) * 1e-3
    sym = np.repeat([f'S{i}' for i in range(n_sym)], -(-rows // n_sym))[:rows]
    return X, y, sym


def bench(name: str, X, y, sym, L: int, windows: int, n_pred: int, device: str, threads: int) -> dict:
    ends = window_ends(sym, L, np.full(len(X), 'train'), y)['train']
    mc = model_config(name)
    train = {'max_epochs': 2, 'max_train_windows': windows, 'device': device, 'num_threads': threads,
             'batch_size': 256, 'patience': None, 'seed': 0}
    with PeakRSS() as mem:
        c0 = time.process_time()
        f = fit_sequence_model(name, X, y, ends, [], L, arch=mc['arch'], train=train, progress=False)
        fit_cpu = time.process_time() - c0
        pe = ends[np.linspace(0, len(ends) - 1, min(n_pred, len(ends))).astype(np.int64)]
        if device != 'cpu' and torch.cuda.is_available(): torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        predict_windows(f.model, X, pe, L, 512, f.device)
        if device != 'cpu' and torch.cuda.is_available(): torch.cuda.synchronize()
        pw, pc = time.perf_counter() - t0, time.process_time() - c0
    n_trained = f.windows_per_epoch * f.epochs_run
    return {'model': name, 'device': f.device, 'threads': f.num_threads if f.device == 'cpu' else None,
            'parameters': f.n_parameters, 'train windows/s': round(f.windows_per_second),
            'train windows/CPU-s': round(n_trained / max(fit_cpu, 1e-9)),
            'predict windows/s': round(len(pe) / pw), 'predict windows/CPU-s': round(len(pe) / max(pc, 1e-9)),
            'peak extra MiB': round(mem.peak / 2**20, 1)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--rows', type=int, default=100_000)
    ap.add_argument('--features', type=int, default=61)
    ap.add_argument('--lookback', type=int, default=32)
    ap.add_argument('--windows', type=int, default=8192, help='training windows per epoch (2 epochs)')
    ap.add_argument('--predict', type=int, default=16384, help='windows predicted')
    ap.add_argument('--threads', default='1', help='CPU thread counts, comma-separated')
    ap.add_argument('--models', default=','.join(MODELS))
    ap.add_argument('--no-gpu', action='store_true', help='skip the GPU even when one is available')
    ap.add_argument('--quick', action='store_true', help='--rows 20000 --windows 2048 --predict 4096')
    a = ap.parse_args(argv)
    if a.quick: a.rows, a.windows, a.predict = 20_000, 2048, 4096
    X, y, sym = panel(a.rows, a.features)
    print(f'{a.rows:,} rows x {a.features} features ({X.nbytes / 2**20:.1f} MiB), lookback {a.lookback}: materialising every '
          f'window would take {a.rows * a.lookback * a.features * 4 / 2**20:,.0f} MiB. torch {torch.__version__}, '
          f'{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; CUDA: '
          f'{torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"}', flush=True)
    runs = [('cpu', int(t)) for t in a.threads.split(',')]
    if torch.cuda.is_available() and not a.no_gpu: runs.append(('auto', None))
    rows = []
    for device, threads in runs:
        for name in a.models.split(','):   # warm-up: load kernels and grow allocator pools outside the measurement
            bench(name, X[:20_000], y[:20_000], sym[:20_000], a.lookback, 512, 1024, device, threads)
        for name in a.models.split(','):
            r = bench(name, X, y, sym, a.lookback, a.windows, a.predict, device, threads)
            rows.append(r)
            print(f'  {r["model"]:12s} {r["device"]:5s} threads {r["threads"]}: train {r["train windows/s"]:,} w/s '
                  f'({r["train windows/CPU-s"]:,} per CPU-s), predict {r["predict windows/s"]:,} w/s, '
                  f'peak +{r["peak extra MiB"]} MiB', flush=True)
    print()
    print(pd.DataFrame(rows).set_index(['model', 'device', 'threads']).to_string())
    print(f'\nload average after: {os.getloadavg()[0]:.1f}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
