"""How the whole workflow's cost grows with the data: features, Phase 1, Phase 2 and Phase 3 on embedded markets of
about 0.16M, 1M, 4M and 10M rows, each stage in its own process (as each phase runs in its own kernel), with its wall
time, the peak resident memory of its process tree (the stage and any worker processes it starts, summed; also
its anonymous part, without the file pages of memory-mapped stores that the kernel can drop), the disk
its stores use, and the best model's test IC as a fraction of the oracle's.

    .venv/bin/python bench/bench_scale.py                          # 10x40, 50x50, 100x100, 250x100 (symbols x days)
    .venv/bin/python bench/bench_scale.py --sizes 10x40,50x50      # the small ones, while developing
    .venv/bin/python bench/bench_scale.py --sizes 500x100 --stages features,phase1,phase2   # 19.5M rows, no Phase 3
    .venv/bin/python bench/bench_scale.py --sizes 250x100 --set phase3.max_eval_predictions=200000   # a declared cap
    .venv/bin/python bench/bench_scale.py --sizes 500x100 --files --stages features,phase1,phase2   # 19.5M rows from files
    .venv/bin/python bench/bench_scale.py --sizes 50x50 --scheduler local:2     # the same through a LocalCluster

`--files` reads each size from parquet files, as a researcher's own data comes (`--data-dir`), instead of the
embedded market: the market is simulated in blocks of 100 symbols, each with its own seed, and written one file per
block. The embedded simulator holds every symbol's paths at once (about 540 bytes a row: 10.5 GB at 500x100, 26 GB
at 49M rows, 500x252), which would add to the features stage's peak. There is no oracle for files, so no fraction of the
oracle at such a size.

`--scheduler local:N` (or a scheduler's address) runs the same stages with Dask: the feature partitions are built on
the cluster's workers and Phase 2 trains its LightGBM and the baseline with `phase2.engine: dask` (unless `--set
phase2.engine=local`). A `local:N` cluster is started by this script, so its worker processes and its scheduler
(in this process) are counted in each stage's peak: the memory a cluster on one machine costs, beside the time.
Workers of a remote scheduler are not counted.

Targets (DESIGN section 6; this 2-core, 24 GB machine): 10M rows end to end in <= 40 min, whole-run peak RSS
<= 8 GB, time per row at 10M within 1.5x of that at 1M, the all-features baseline included. The growth exponent of
time against rows is fitted between the sizes of 1M rows and up. Each size's stores live under
`.cache/bench_scale/<size>/` and are deleted after it (`--keep` keeps them). Exit status 0 when the 10M targets
hold (or the 10M size was not run), 1 otherwise; every figure is printed either way.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ('features', 'phase1', 'phase2', 'phase3')
TARGET_S, TARGET_RSS, TARGET_PER_ROW_X = 40 * 60, 8 * 2**30, 1.5

# One stage, run as `python -c STAGE_SCRIPT <stage> <n_symbols> <n_days> <root> <overrides as JSON> <data dir or ''>`:
# the data (cached features on a hit), then the phase, writing metrics.json under <root>/reports.
STAGE_SCRIPT = r'''
import sys, json
from pathlib import Path
from pipeline_lib.core.config import deep_merge, load_config
from pipeline_lib.phases.run_data import prepare_run_data
stage, n_sym, n_days, root = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
cfg = load_config(overrides=deep_merge(json.loads(sys.argv[5]), {'data': {'market': {'n_symbols': n_sym, 'n_days': n_days}}}))
rd = prepare_run_data(cfg, data_dir=sys.argv[6] or None, cache_dir=root / 'cache')
kw = dict(artifact_root=root / 'artifacts', reports_dir=root / 'reports', run_data=rd)
if stage == 'phase1':
    from pipeline_lib.phases.phase1 import run_phase1; run_phase1(cfg, **kw)
elif stage == 'phase2':
    from pipeline_lib.phases.phase2 import run_phase2; run_phase2(cfg, **kw)
elif stage == 'phase3':
    from pipeline_lib.phases.phase3 import run_phase3; run_phase3(cfg, **kw)
'''


def tree_rss(pid: int) -> tuple[int, int]:
    """(resident bytes, of them anonymous) of process `pid` and all its descendants, from /proc (0 for a process that
    has gone). The rest is file pages (memory-mapped stores, libraries): the kernel can drop them under pressure."""
    total, anon, todo = 0, 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f'/proc/{p}/status') as f:
                fields = dict(line.split(':', 1) for line in f if ':' in line)
            total += int(fields['VmRSS'].split()[0]) * 1024
            anon += int(fields['RssAnon'].split()[0]) * 1024
            for task in os.listdir(f'/proc/{p}/task'):
                with open(f'/proc/{p}/task/{task}/children') as f: todo += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError, KeyError): continue
    return total, anon


# The market of `--files`: blocks of 100 symbols, each simulated with its own seed, one parquet file per block.
FILES_SCRIPT = r'''
import sys
from pathlib import Path
from pipeline_lib.data.market import make_market
n_sym, n_days, out, block = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), 100
out.mkdir(parents=True, exist_ok=True)
for k, lo in enumerate(range(0, n_sym, block)):
    bars, _ = make_market(seed=1000 + k, n_symbols=min(block, n_sym - lo), n_days=n_days)
    bars['symbol'] = f'B{k:02d}_' + bars['symbol'].astype(str)
    bars.to_parquet(out / f'block{k:02d}.parquet', index=False)
'''


def run_stage(stage: str, n_sym: int, n_days: int, root: Path, log, overrides: dict | None = None,
              data_dir: Path | None = None, scheduler: str | None = None, watch_self: bool = False) -> dict:
    """Wall seconds and the peak tree RSS of one stage, its output appended to `log`. `scheduler`: the address its
    process sends work to; `watch_self`: count this process's whole tree (a LocalCluster started here), not only the
    stage's."""
    t0 = time.perf_counter()
    env = {**os.environ, 'OMP_WAIT_POLICY': os.environ.get('OMP_WAIT_POLICY', 'PASSIVE'), 'IN_TEST': '1',
           'PIPELINE_SCHEDULER': scheduler or 'none'}
    args = ([sys.executable, '-c', FILES_SCRIPT, str(n_sym), str(n_days), str(data_dir)] if stage == 'files' else
            [sys.executable, '-c', STAGE_SCRIPT, stage, str(n_sym), str(n_days), str(root), json.dumps(overrides or {}),
             str(data_dir or '')])
    proc = subprocess.Popen(args,
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    peak, stop = [0, 0], threading.Event()
    def sample():
        while not stop.is_set():
            rss, anon = tree_rss(os.getpid() if watch_self else proc.pid)
            peak[0], peak[1] = max(peak[0], rss), max(peak[1], anon); time.sleep(0.2)
    t = threading.Thread(target=sample, daemon=True); t.start()
    rc = proc.wait(); stop.set(); t.join()
    return {'stage': stage, 'seconds': time.perf_counter() - t0, 'peak_rss': peak[0], 'peak_anon': peak[1], 'rc': rc}


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob('*') if f.is_file()) if path.exists() else 0


def best_vs_oracle(metrics: dict) -> tuple[str | None, float | None, float | None]:
    "(best model by test IC, its test IC, the oracle's test IC) of the primary target."
    target = metrics.get('run', {}).get('primary_target') or 'fwd_ret_5m'
    ics = {}
    for phase in ('phase2', 'phase3'):
        for model, by_target in (metrics.get(phase, {}).get('models') or {}).items():
            ic = (((by_target or {}).get(target) or {}).get('test') or {}).get('ic')
            if ic is not None: ics[model] = ic
    oracle = (((metrics.get('oracle') or {}).get(target) or {}).get('test') or {}).get('ic')
    if not ics: return None, None, oracle
    best = max(ics, key=ics.get)
    return best, ics[best], oracle


def gb(b: float) -> str: return f'{b / 2**30:.2f} GB'


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--sizes', default='10x40,50x50,100x100,250x100', help='symbols x days, comma-separated')
    ap.add_argument('--stages', default=','.join(STAGES), help=f'a subset of {",".join(STAGES)}, in order')
    ap.add_argument('--keep', action='store_true', help="keep each size's stores and artifacts")
    ap.add_argument('--json', type=Path, help='also write the figures to this JSON file')
    ap.add_argument('--files', action='store_true', help='read each size from parquet files (blocks of 100 symbols), not the embedded market')
    ap.add_argument('--set', dest='sets', action='append', default=[], metavar='KEY=VALUE',
                    help='override one config key at every size, as run_notebooks.py --set does (repeatable)')
    ap.add_argument('--scheduler', metavar='ADDRESS', help='local:N or a Dask scheduler address: features and Phase 2\'s '
                    'LightGBM on the cluster (phase2.engine: dask unless --set says otherwise)')
    a = ap.parse_args(argv)
    from pipeline_lib.core.config import deep_merge
    from pipeline_lib.driver.schema import nest, parse_assignment
    overrides = {}
    if a.scheduler: overrides = {'phase2': {'engine': 'dask'}}
    for text in a.sets: overrides = deep_merge(overrides, nest(*parse_assignment(text)))
    if not a.scheduler: return measure(a, overrides, None)
    from pipeline_lib.core.cluster import dask_client, parse_scheduler
    local = parse_scheduler(a.scheduler)[0] == 'local'
    with dask_client(a.scheduler) as client:
        print(f'Dask scheduler {client.scheduler.address} ({a.scheduler}), {len(client.scheduler_info()["workers"])} '
              f'worker(s)' + ('; its workers and scheduler are counted in every stage\'s peak RSS' if local else ''))
        return measure(a, overrides, client.scheduler.address, watch_self=local)


def measure(a, overrides: dict, scheduler: str | None, watch_self: bool = False) -> int:
    "Every size and stage of `a` (the parsed flags); prints the figures and returns the exit status."
    sizes = [tuple(int(v) for v in s.split('x')) for s in a.sizes.split(',')]
    stages = [s for s in a.stages.split(',') if s]
    if bad := [s for s in stages if s not in STAGES]: ap.error(f'unknown stages {bad}')
    print(f'bench_scale: sizes {a.sizes}, stages {",".join(stages)}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}'
          + (f', overrides {json.dumps(overrides)}' if overrides else ''))
    results = []
    for n_sym, n_days in sizes:
        root = ROOT / '.cache' / 'bench_scale' / f'{n_sym}x{n_days}'
        shutil.rmtree(root, ignore_errors=True); root.mkdir(parents=True)
        rows = None
        data_dir = root / 'data' if a.files else None
        with open(root.with_suffix('.log'), 'w') as log:
            stage_res = []
            if data_dir is not None:   # written before the stages, and not counted in them
                r = run_stage('files', n_sym, n_days, root, log, data_dir=data_dir)
                print(f'  {n_sym}x{n_days} market files: {r["seconds"]:.1f} s, peak RSS {gb(r["peak_rss"])}, '
                      f'{gb(disk_bytes(data_dir))} on disk' + ('' if r['rc'] == 0 else f'  FAILED rc={r["rc"]}'), flush=True)
            for st in stages:
                r = run_stage(st, n_sym, n_days, root, log, overrides, data_dir, scheduler, watch_self); stage_res.append(r)
                print(f'  {n_sym}x{n_days} {st:8s} {r["seconds"]:8.1f} s  peak RSS {gb(r["peak_rss"])} (anonymous {gb(r["peak_anon"])})' + ('' if r['rc'] == 0 else f'  FAILED rc={r["rc"]} (see {root.with_suffix(".log")})'), flush=True)
                if r['rc'] != 0: break
        mpath = root / 'reports' / 'metrics.json'
        metrics = json.loads(mpath.read_text()) if mpath.exists() else {}
        rows = sum((metrics.get('phase1') or {}).get('rows', {}).values()) if metrics.get('phase1') else None
        best, ic, oracle = best_vs_oracle(metrics)
        res = {'size': f'{n_sym}x{n_days}', 'symbols': n_sym, 'days': n_days, 'overrides': overrides, 'files': a.files,
               'scheduler': a.scheduler, 'rows': rows or n_sym * n_days * 390,
               'stages': stage_res, 'seconds': sum(r['seconds'] for r in stage_res),
               'peak_rss': max(r['peak_rss'] for r in stage_res), 'ok': all(r['rc'] == 0 for r in stage_res),
               'store_bytes': disk_bytes(root / 'cache' / 'features'),
               'compact_bytes': disk_bytes(root / 'cache' / 'compact'), 'artifact_bytes': disk_bytes(root / 'artifacts'),
               'best_model': best, 'best_ic': ic, 'oracle_ic': oracle,
               'ic_of_oracle': (ic / oracle) if ic is not None and oracle else None,
               'phase1_rows': ((metrics.get('phase1') or {}).get('fit_sample') or {}).get('rows')}
        results.append(res)
        mrows = res['rows'] / 1e6
        print(f'{res["size"]}: {res["rows"]:,} rows, {res["seconds"]:.0f} s ({1e6 * res["seconds"] / res["rows"]:.1f} s per M rows), '
              f'peak RSS {gb(res["peak_rss"])}, feature store {gb(res["store_bytes"])} ({gb(res["store_bytes"] / max(mrows, 1e-9))} per M rows), '
              f'compact store {gb(res["compact_bytes"])}, artifacts {gb(res["artifact_bytes"])}; best {best} test IC {ic if ic is None else round(ic, 4)} '
              f'= {res["ic_of_oracle"] if res["ic_of_oracle"] is None else round(res["ic_of_oracle"], 3)} of the oracle '
              f'({oracle if oracle is None else round(oracle, 4)})', flush=True)
        if not a.keep: shutil.rmtree(root, ignore_errors=True)
    big = [r for r in results if r['rows'] >= 0.9e6 and r['ok']]
    verdict = 0
    if len(big) >= 2:
        x = [math.log(r['rows']) for r in big]; y = [math.log(r['seconds']) for r in big]
        mx, my = sum(x) / len(x), sum(y) / len(y)
        slope = sum((u - mx) * (v - my) for u, v in zip(x, y)) / sum((u - mx) ** 2 for u in x)
        lo, hi = big[0], big[-1]
        per_row_x = (hi['seconds'] / hi['rows']) / (lo['seconds'] / lo['rows'])
        print(f'growth: time ~ rows^{slope:.2f} from {lo["rows"]:,} to {hi["rows"]:,} rows; time per row at the largest '
              f'is {per_row_x:.2f}x that at the smallest (target <= {TARGET_PER_ROW_X}x)')
        if hi['rows'] >= 9e6 and per_row_x > TARGET_PER_ROW_X: verdict = 1
    fracs = [(r['rows'], r['ic_of_oracle']) for r in results if r['ic_of_oracle'] is not None]
    if len(fracs) >= 2:
        trend = 'moves toward' if fracs[-1][1] > fracs[0][1] else 'does not move toward'
        print('best test IC / oracle by rows: ' + ', '.join(f'{n / 1e6:.2f}M {f:.3f}' for n, f in fracs) + f': more data {trend} the oracle')
    for r in results:
        if r['rows'] >= 9e6:
            ok = r['ok'] and r['seconds'] <= TARGET_S and r['peak_rss'] <= TARGET_RSS
            print(f'10M target ({r["size"]}): {r["seconds"] / 60:.1f} min (<= 40), peak RSS {gb(r["peak_rss"])} (<= 8 GB): {"PASS" if ok else "FAIL"}')
            verdict = verdict or (0 if ok else 1)
    if a.json: a.json.write_text(json.dumps(results, indent=1))
    return verdict


if __name__ == '__main__':
    sys.exit(main())
