"""Does Phase 1's selection cost test IC? The N-feature LightGBM against the all-features baseline over market seeds.

One run's verdict compares the two models on one market: its paired day-block standard error covers the test
days' noise, not the luck of that market's draw. This bench repeats the comparison on several embedded markets
(`data.market.seed`), each through the production path (`run_phase1`, then `run_phase2` with the `lightgbm` and
`baseline_all_features` models only), and summarises the paired test-IC differences across seeds.

    .venv/bin/python bench/bench_selection.py                       # seeds 1-6, the default config
    .venv/bin/python bench/bench_selection.py --seeds 1 2 3 7 --config configs/quick.yaml

Per seed it prints both test ICs, the difference with its paired jackknife s.e. and t, the wall-time ratio, and
whether the run's own checks held (difference within one s.e. of zero or above; at least 3x faster). On the
embedded market it also prints the causal oracle's test IC and each model's test IC as a fraction of it (the
figure behind the Phase 2 verdict's "at least 60% of the oracle"). Then the mean difference over seeds with a
Student-t 95% interval (seeds are independent markets) and the verdict: **not worse** means that interval
includes zero or lies above it (its upper end is >= 0); it needs at least two seeds; and the mean oracle IC and
oracle fractions over seeds, with their 95% intervals. Artifacts go to a scratch folder under .cache/.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
ROOT = Path(__file__).resolve().parents[1]
os.chdir(ROOT)

from pipeline_lib.core.config import deep_merge, load_config, scratch_root  # noqa: E402
from pipeline_lib.models.tabular import mean_ci  # noqa: E402
from pipeline_lib.phases.phase1 import run_phase1  # noqa: E402
from pipeline_lib.phases.phase2 import run_phase2  # noqa: E402


MODELS = {'n': 'lightgbm', 'all': 'baseline_all_features'}


def oracle_fractions(metrics: dict) -> dict:
    """From a Phase 2 `metrics` dict: the oracle's test IC and each model's test IC over it (the ICs the verdict's
    oracle fraction uses); None where there is no oracle (real data, a path target) or its IC is not positive."""
    checks = metrics['checks']
    o_ic = checks.get('oracle_test_ic')
    test_ic = lambda m: ((metrics['models'].get(m, {}).get(checks['primary_target'], {}).get('test')) or {}).get('ic')
    ok = o_ic is not None and o_ic > 0
    return {'oracle_ic': o_ic, **{f'frac_{k}': (test_ic(m) / o_ic if ok and test_ic(m) is not None else None)
                                  for k, m in MODELS.items()}}


def one_seed(base_cfg: dict, seed: int, root: Path) -> dict:
    cfg = deep_merge(base_cfg, {'data': {'market': {'seed': int(seed)}},
                                'phase2': {'models': list(MODELS.values())}})
    d = root/f'seed_{seed}'
    t0 = time.perf_counter()
    p1 = run_phase1(cfg, artifact_root=d, reports_dir=d/'reports', progress=False)
    p2 = run_phase2(cfg, artifact_root=d, reports_dir=d/'reports', run_data=p1.data, progress=False)
    c = p2.metrics['checks']
    v = c['lightgbm_vs_baseline']
    return {'seed': seed, 'ic_n': v['ic_a'], 'ic_all': v['ic_b'], 'diff': v['diff'], 'se': v['se'], 't': v['t'],
            'speed_ratio_wall': c['speed_ratio_wall'], 'within_one_se': c['not_worse_ok'], 'speed_ok': c['speed_ok'],
            **oracle_fractions(p2.metrics), 'seconds': round(time.perf_counter() - t0, 1)}


def summarise(rows: list[dict]) -> dict:
    """Over seeds: the mean difference with its Student-t 95% interval, and `not_worse`: True when that interval
    includes zero or lies above it (upper end >= 0), False when it lies below zero, None with fewer than 2 seeds.
    `oracle`: the mean (and 95% interval) of the oracle's test IC and of each model's fraction of it, over the
    seeds where it is defined."""
    ci = mean_ci([r['diff'] for r in rows], 0.95)
    oracle = {k: mean_ci([r.get(k) for r in rows], 0.95) for k in ('oracle_ic', *(f'frac_{m}' for m in MODELS))}
    return {'n_seeds': len(rows), 'mean_diff': ci['mean'], 'se_across_seeds': ci['se'],
            'ci95': [ci['lo'], ci['hi']] if ci['hi'] is not None else None,
            'not_worse': None if ci['hi'] is None else bool(ci['hi'] >= 0),
            'within_one_se': sum(bool(r['within_one_se']) for r in rows), 'speed_ok': sum(bool(r['speed_ok']) for r in rows),
            'median_speed_ratio_wall': statistics.median(r['speed_ratio_wall'] for r in rows), 'oracle': oracle}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--seeds', type=int, nargs='+', default=[1, 2, 3, 4, 5, 6])
    ap.add_argument('--config', default=None, help='experiment config (default: configs/experiment_defaults.yaml)')
    ap.add_argument('--json', default=None, help='also write the rows and summary to this file')
    a = ap.parse_args(argv)
    cfg = load_config(a.config)
    root = scratch_root('bench_selection')
    rows = []
    num = lambda v, f: format(v, f) if v is not None else format('-', f'>{len(format(0.0, f))}')
    print(f'{"seed":>4} {"IC N":>7} {"IC all":>7} {"diff":>8} {"s.e.":>7} {"t":>6} {"speed":>6} {"oracle":>7} '
          f'{"N/orc":>6} {"all/orc":>7}  checks')
    for s in a.seeds:
        r = one_seed(cfg, s, root)
        rows.append(r)
        print(f'{s:>4} {r["ic_n"]:7.4f} {r["ic_all"]:7.4f} {r["diff"]:+8.4f} {r["se"]:7.4f} {r["t"]:6.2f} '
              f'{r["speed_ratio_wall"]:5.1f}x {num(r["oracle_ic"], "7.4f")} {num(r["frac_n"], "6.2f")} '
              f'{num(r["frac_all"], "7.2f")}  within 1 s.e. {"ok" if r["within_one_se"] else "NO"}, '
              f'3x {"ok" if r["speed_ok"] else "NO"}  ({r["seconds"]:.0f} s)', flush=True)
    summary = summarise(rows)
    print(f'\nmean difference (N features - all) over {len(rows)} seeds: {summary["mean_diff"]:+.4f}'
          + (f', s.e. across seeds {summary["se_across_seeds"]:.4f}, 95% interval [{summary["ci95"][0]:+.4f}, '
             f'{summary["ci95"][1]:+.4f}]' if summary['ci95'] else ''))
    print('not worse (the 95% interval of the mean difference includes zero or lies above it): '
          + {True: 'yes', False: 'NO', None: 'undecided (needs at least 2 seeds)'}[summary['not_worse']])
    print(f'within one s.e. in the single run: {summary["within_one_se"]}/{len(rows)} seeds; at least 3x faster: '
          f'{summary["speed_ok"]}/{len(rows)} (median {summary["median_speed_ratio_wall"]:.1f}x)')
    o = summary['oracle']
    if o['oracle_ic']['n']:
        span = lambda c, f: ('-' if c['mean'] is None else f'{c["mean"]:{f}}'
                             + (f' [{c["lo"]:{f}}, {c["hi"]:{f}}]' if c['lo'] is not None else ''))
        print(f'oracle test IC, mean over {o["oracle_ic"]["n"]} seeds (95% interval): {span(o["oracle_ic"], ".4f")}; '
              f'test IC as a fraction of the oracle\'s: N features {span(o["frac_n"], ".2f")}, '
              f'all features {span(o["frac_all"], ".2f")} (compare with the Phase 2 verdict\'s oracle-fraction target)')
    else:
        print('oracle: none on these runs (real data or a path target), so no oracle fractions')
    if a.json: Path(a.json).write_text(json.dumps({'rows': rows, 'summary': summary}, indent=1))
    return 0


if __name__ == '__main__':
    sys.exit(main())
