"""Benchmark `build_features` against its budget (DESIGN section 6): 1,000,000 rows (20 symbols), ~421 features,
<= 30 s and peak memory <= 3x the output; also times the data fingerprint and a verified feature-cache hit.

    .venv/bin/python bench/bench_features.py                 # full size, median of 3 builds
    .venv/bin/python bench/bench_features.py --quick         # one build
    .venv/bin/python bench/bench_features.py --rows 200000   # smaller, while developing

Wall time is what the budget counts; the CPU time printed beside it (and the load average) tells whether other
processes inflated it on a shared machine. Peak memory is measured in a separate, untimed build under tracemalloc (numpy buffers and Python objects; the
figure the verdict uses) and, as a cross-check, as the peak resident-set growth sampled every 5 ms during the
first timed build. Exit status: 0 when within budget, 1 when over (the figures are printed either way).
"""
from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import sys
import threading
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'tests'))  # the synthetic bars live in tests/synthetic.py

from synthetic import realistic_bars  # noqa: E402

from pipeline_lib.features import store as fc  # noqa: E402
from pipeline_lib import features as F  # noqa: E402
from pipeline_lib.core.config import scratch_root  # noqa: E402

BUDGET_S, BUDGET_MEM_X = 30.0, 3.0


def _rss() -> int:
    with open('/proc/self/statm') as f: return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


class RssPeak:
    "Peak resident-set size growth over a block, sampled every `every` seconds by a thread."
    def __init__(self, every=0.005): self.every, self.peak = every, 0
    def __enter__(self):
        self.base, self.peak, self._stop = _rss(), _rss(), threading.Event()
        def run():
            while not self._stop.is_set():
                self.peak = max(self.peak, _rss()); time.sleep(self.every)
        self._t = threading.Thread(target=run, daemon=True); self._t.start()
        return self
    def __exit__(self, *exc):
        self._stop.set(); self._t.join(); self.peak = max(self.peak, _rss())
    @property
    def growth(self): return self.peak - self.base


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--rows', type=int, default=1_000_000, help='total rows (default 1,000,000)')
    ap.add_argument('--symbols', type=int, default=20, help='symbols (default 20)')
    ap.add_argument('--repeat', type=int, default=3, help='timed builds; the median is reported (default 3)')
    ap.add_argument('--quick', action='store_true', help='one timed build (same as --repeat 1)')
    ap.add_argument('--no-memory', action='store_true', help='skip the tracemalloc build')
    ap.add_argument('--no-cache', action='store_true', help='skip the cache store/hit timing')
    ap.add_argument('--seed', type=int, default=0)
    a = ap.parse_args(argv)
    repeat = 1 if a.quick else max(1, a.repeat)
    per_symbol = a.rows // a.symbols

    t = time.perf_counter()
    bars = realistic_bars(a.symbols, per_symbol, seed=a.seed)
    gen_s = time.perf_counter() - t
    print(f'bars: {len(bars):,} rows, {a.symbols} symbols x {per_symbol:,} one-minute bars '
          f'({bars["timestamp"].dt.normalize().nunique()} days), generated in {gen_s:.1f} s', flush=True)
    print(f'feature library {F.FEATURE_LIBRARY_VERSION}, {len(F.feature_names())} features declared', flush=True)

    times, cpus, out, rss = [], [], None, None
    for i in range(repeat):
        del out; out = None; gc.collect()
        with RssPeak() as peak:
            t, c = time.perf_counter(), time.process_time()
            out = F.build_features(bars)
            times.append(time.perf_counter() - t); cpus.append(time.process_time() - c)
        if rss is None: rss = peak.growth
        print(f'  build {i + 1}/{repeat}: {times[-1]:.2f} s wall, {cpus[-1]:.2f} s CPU', flush=True)
    build_s, build_cpu = statistics.median(times), statistics.median(cpus)
    out_bytes = int(out.memory_usage(index=False, deep=True).sum())
    assert len(out) == len(bars) and out.index.equals(bars.index), 'features are not aligned with bars'
    dtypes = sorted({str(d) for d in out.dtypes})

    traced = None
    if not a.no_memory:
        keep = out; out = None; gc.collect()
        tracemalloc.start()
        t = time.perf_counter(); again = F.build_features(bars); traced_s = time.perf_counter() - t
        traced = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        del again; out = keep; gc.collect()

    t = time.perf_counter(); fp = fc.data_fingerprint(bars); fp_s = time.perf_counter() - t
    cache = None
    if not a.no_cache:
        cache_dir = scratch_root('bench_features')
        shutil.rmtree(fc.feature_cache_dir(cache_dir), ignore_errors=True)
        key = fc.cache_key(bars, fingerprint=fp)
        path = fc.store_dir(key, cache_dir) / fc.partition_name(0, len(out))
        t = time.perf_counter(); info = fc.write_partition(out, path, lo=0, hi=len(out)); store_s = time.perf_counter() - t
        fc.build_store(bars, cache_dir=cache_dir, partition_rows=len(bars), fingerprint=fp, progress=False)  # keeps the partition, writes the manifest
        hits, hit_cpu = [], []
        for _ in range(2):
            gc.collect()
            t, c = time.perf_counter(), time.process_time()
            hit = fc.cached_features(bars, cache_dir=cache_dir, progress=False)
            hits.append(time.perf_counter() - t); hit_cpu.append(time.process_time() - c)
            same = hit.shape == out.shape and list(hit.columns) == list(out.columns)
            del hit
        cache = dict(bytes=info['bytes'], store_s=store_s, hit_s=min(hits), hit_cpu=hit_cpu[hits.index(min(hits))], same=same)
        shutil.rmtree(fc.feature_cache_dir(cache_dir), ignore_errors=True)

    mib = 2**20
    print()
    print(f'output:       {out.shape[0]:,} rows x {out.shape[1]} columns {dtypes}, {out_bytes / mib:,.0f} MiB')
    print(f'build:        median {build_s:.2f} s wall of {repeat} ({", ".join(f"{x:.2f}" for x in times)}), '
          f'{build_cpu:.2f} s CPU = {build_s / len(bars) * 1e6:.2f} us/row; load average {os.getloadavg()[0]:.1f} '
          f'on {os.cpu_count()} cores')
    if traced is not None:
        print(f'peak memory:  {traced / mib:,.0f} MiB traced (tracemalloc, build took {traced_s:.1f} s) '
              f'= {traced / out_bytes:.2f}x output; RSS growth {rss / mib:,.0f} MiB = {rss / out_bytes:.2f}x')
    else:
        print(f'peak memory:  RSS growth {rss / mib:,.0f} MiB = {rss / out_bytes:.2f}x output (tracemalloc skipped)')
    print(f'fingerprint:  {fp_s:.3f} s')
    if cache:
        print(f'cache:        entry {cache["bytes"] / mib:,.0f} MiB, store {cache["store_s"]:.2f} s, '
              f'verified hit {cache["hit_s"]:.2f} s wall, {cache["hit_cpu"]:.2f} s CPU '
              f'({build_s / cache["hit_s"]:.1f}x faster than a build)'
              + ('' if cache['same'] else '  MISMATCH'))
    scale = 1_000_000 / len(bars)
    mem_x = (traced if traced is not None else rss) / out_bytes
    time_ok, mem_ok = build_s * scale <= BUDGET_S, mem_x <= BUDGET_MEM_X
    note = '' if scale == 1 else f' (scaled linearly x{scale:.1f} to 1M rows: {build_s * scale:.1f} s)'
    print(f'budget:       build <= {BUDGET_S:.0f} s at 1M rows{note}: {"PASS" if time_ok else "OVER"}; '
          f'peak <= {BUDGET_MEM_X:.0f}x output: {mem_x:.2f}x {"PASS" if mem_ok else "OVER"}')
    verdict = 'PASS' if time_ok and mem_ok and (cache is None or cache['same']) else 'OVER'
    print(f'verdict:      {verdict}')
    return 0 if verdict == 'PASS' else 1


if __name__ == '__main__':
    sys.exit(main())
