"""Benchmark the live use of `pipeline_lib.inference`: `--last-only` on 100 symbols, after loading the run.

Budget (issue 9): the latest bar of 100 symbols with a day of history answers in under 5 s on 2 cores, load excluded.

    .venv/bin/python bench/bench_inference.py                     # trains a quick run under .cache/ once, then times
    .venv/bin/python bench/bench_inference.py --run NAME          # an existing run (reports/<NAME>)
    .venv/bin/python bench/bench_inference.py --days 1 5 --models ensemble lightgbm

For each history length (in sessions of 390 one-minute bars, bars from `make_market` with the run's market settings
but 100 symbols) it prints the median wall time of `run.predict(bars, models, last_only=True)` over `--repeat` calls,
the slice it built features on, and how many of the 100 latest bars lacked the declared warm-up (NaN). A day of
history (390 bars) is shorter than the warm-up of many features (e.g. `ema_120`, `trix_60`, `vtod_*`), so with one day
most models answer NaN, correctly; the longer history shows the same path when every bar is scored.
Exit status: 0 when every timing is within budget, 1 otherwise.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
ROOT = Path(__file__).resolve().parents[1]
os.chdir(ROOT)

from pipeline_lib.core.config import load_config, scratch_root  # noqa: E402
from pipeline_lib.inference import load_run, register_run  # noqa: E402
from pipeline_lib.data.market import make_market  # noqa: E402

BUDGET_S = 5.0


def quick_run() -> Path:
    "A quick Phase 1 + 2 run under .cache/bench_inference (trained once, reused)."
    root = scratch_root('bench_inference')
    rep = root/'reports'/'bench'
    try:
        load_run(rep)
        return rep
    except Exception:
        pass
    from pipeline_lib.phases.phase1 import run_phase1
    from pipeline_lib.phases.phase2 import run_phase2
    cfg = load_config('configs/quick.yaml', {'phase2': {'multitask': {'epochs': 5}}})
    print('training a quick run (Phase 1 + 2) once into', root, flush=True)
    p1 = run_phase1(cfg, artifact_root=root, reports_dir=rep, progress=False)
    run_phase2(cfg, artifact_root=root, reports_dir=rep, run_name='bench', run_data=p1.data, progress=False)
    register_run(rep, cfg, root, name='bench')
    return rep


def _nan(run) -> str:
    "Rows left NaN per model (one number when all agree)."
    per = {c.split('__')[0]: n for c, n in run.short_history_.items()}
    return str(next(iter(per.values()))) if len(set(per.values())) == 1 else str(per)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--run', default=None, help='run name or reports/<run> path (default: a quick run under .cache/)')
    ap.add_argument('--symbols', type=int, default=100)
    ap.add_argument('--days', type=int, nargs='+', default=[1, 5, 12], help='sessions of history per symbol')
    ap.add_argument('--models', nargs='+', default=None, help='models (default: all the run has, then ensemble alone)')
    ap.add_argument('--repeat', type=int, default=3)
    args = ap.parse_args(argv)

    rep = args.run or quick_run()
    t0 = time.perf_counter()
    run = load_run(rep)
    print(f'run {run.name}: loaded and verified in {time.perf_counter() - t0:.2f} s; models {list(run.outputs())}; '
          f'required history {({m: run.required_history(m) for m in run.outputs()})} bars; '
          f'{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}')
    choices = [args.models] if args.models else [None, ['ensemble']]
    ok = True
    market = dict(run.config['data']['market'])
    for days in args.days:
        bars, _ = make_market(**{**market, 'n_symbols': args.symbols, 'n_days': days},
                              horizon=int(run.config['targets']['horizons'][0]))
        for models in choices:
            try: run.columns(models)
            except Exception as e: print(f'  skip {models}: {e}'); continue
            times, cpu = [], []
            for _ in range(args.repeat):
                c0, w0 = time.process_time(), time.perf_counter()
                P = run.predict(bars, models, last_only=True)
                times.append(time.perf_counter() - w0); cpu.append(time.process_time() - c0)
            med = statistics.median(times)
            ok &= med <= BUDGET_S
            need = max(run.required_history(m) for m in dict.fromkeys(c.split('__')[0] for c in P.columns))
            print(f'{args.symbols} symbols x {days} day(s) ({len(bars):,} bars), models {models or "all"}: '
                  f'--last-only {med:.2f} s median (min {min(times):.2f}, CPU {statistics.median(cpu):.2f} s), '
                  f'{len(P)} rows x {P.shape[1]} columns; features on the last {min(need + 1, len(bars) // args.symbols)} '
                  f'bars per symbol; NaN for lack of history: {_nan(run)} of {len(P)} rows '
                  f'-> {"OK" if med <= BUDGET_S else "OVER"} (budget {BUDGET_S:.0f} s)', flush=True)
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
