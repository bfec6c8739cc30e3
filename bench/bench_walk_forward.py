"""What does Phase 2's walk-forward cost? Phases 1 and 2 once, then the walk-forward that refits both in every fold.

Walk-forward (`phase2.walk_forward: true`) refits Phase 1 (selection, scaler, VAE, regimes) and every Phase 2 model
with its choices inside each fold, so that no fitted object has seen the block it scores. This bench runs the
production path (`run_phase1`, then `run_phase2` with walk-forward on) and prints the seconds of Phase 1, of Phase 2
without the walk-forward, of the walk-forward and of each fold (its Phase 1 refit and its model fits), and the
walk-forward's cost as a multiple of Phases 1 + 2.

    .venv/bin/python bench/bench_walk_forward.py --config configs/quick.yaml
    .venv/bin/python bench/bench_walk_forward.py --config configs/quick.yaml --set phase2.n_folds=2

Wall seconds depend on the machine and on what else runs on it; the multiple is the portable figure. Artifacts go
to a scratch folder under .cache/.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
ROOT = Path(__file__).resolve().parents[1]
os.chdir(ROOT)

import yaml  # noqa: E402

from pipeline_lib.core.config import deep_merge, load_config, scratch_root  # noqa: E402
from pipeline_lib.phases.phase1 import run_phase1  # noqa: E402
from pipeline_lib.phases.phase2 import run_phase2  # noqa: E402


def _override(key: str, value: str) -> dict:
    "{'a': {'b': value}} from 'a.b', the value read as YAML (as run_notebooks.py --set does)."
    out = yaml.safe_load(value)
    for part in reversed(key.split('.')): out = {part: out}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--config', default=None, help='experiment config (default: configs/experiment_defaults.yaml)')
    ap.add_argument('--set', action='append', default=[], metavar='KEY=VALUE', help='override one dotted key')
    ap.add_argument('--json', default=None, help='also write the figures to this file')
    a = ap.parse_args(argv)
    over = {'phase2': {'walk_forward': True}}
    for kv in a.set:
        k, _, v = kv.partition('=')
        over = deep_merge(over, _override(k, v))
    cfg = load_config(a.config, over)
    root = scratch_root('bench_walk_forward')
    t0 = time.perf_counter()
    p1 = run_phase1(cfg, artifact_root=root, progress=False)
    phase1 = time.perf_counter() - t0
    p2 = run_phase2(cfg, artifact_root=root, run_data=p1.data, progress=True)
    wf = p2.timings['walk_forward']
    phase2 = p2.seconds - wf
    folds = p2.walk_forward.drop_duplicates('fold')[['fold', 'n_train', 'n_valid', 'phase1_seconds', 'models_seconds',
                                                     'seconds']]
    rows = len(p1.data.bars)
    print(f'\n{rows:,} bars, {len(p1.data.rows("train")):,} training rows; {len(folds)} folds')
    print(f'Phase 1 {phase1:.1f} s, Phase 2 without walk-forward {phase2:.1f} s, walk-forward {wf:.1f} s '
          f'= {wf / (phase1 + phase2):.1f} x (Phase 1 + Phase 2)')
    print(folds.round(1).to_string(index=False))
    if a.json:
        Path(a.json).write_text(json.dumps({'rows': rows, 'phase1_seconds': phase1, 'phase2_seconds': phase2,
                                            'walk_forward_seconds': wf, 'multiple': wf / (phase1 + phase2),
                                            'folds': folds.to_dict(orient='records')}, indent=1))
    return 0


if __name__ == '__main__':
    sys.exit(main())
