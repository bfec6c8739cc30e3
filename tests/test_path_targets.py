"""A path target (`mdd`) as the primary target, Phases 1-2 end to end on the embedded market: the forward-return oracle
is not that target's oracle (no oracle columns or keys, no oracle leakage bar), the leakage screen uses
`phase1.leakage.path_threshold`, and the run completes even though volatility features predict `mdd` strongly."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pipeline_lib.core.config import load_config
from pipeline_lib.phases.phase1 import run_phase1
from pipeline_lib.phases.phase2 import run_phase2
from pipeline_lib.phases.run_data import oracle_for, oracle_metrics

PATH_THRESHOLD = 0.9   # above the volatility features' |IC| with mdd, so the screen passes; recorded as the bar used

# quick config, 2 of its 4 symbols (every timestamp has fewer than 3: demeaning falls back everywhere), a short VAE,
# two Phase 2 models; Phase 2 also fits the forward return so that its demean fallback is counted
OVERRIDES = {'primary_target': 'mdd', 'data': {'sample': 0.5},
             'phase1': {'leakage': {'path_threshold': PATH_THRESHOLD}, 'vae': {'epochs': 3}},
             'phase2': {'models': ['lightgbm', 'ridge'], 'targets': ['fwd_ret_5m']}}


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    cfg = load_config('configs/quick.yaml', OVERRIDES)
    root = tmp_path_factory.mktemp('path_targets')
    p1 = run_phase1(cfg, artifact_root=root, reports_dir=root/'reports', progress=False)
    p2 = run_phase2(cfg, artifact_root=root, reports_dir=root/'reports', run_name='t', run_data=p1.data, progress=False)
    return cfg, root, p1, p2


@pytest.mark.e2e
def test_mdd_run_has_no_oracle_and_says_why(run):
    _, root, p1, p2 = run
    rd = p1.data
    assert rd.source == 'embedded' and rd.oracle is None and rd.oracle_target is None
    assert rd.oracle_note == 'no oracle for mdd: the embedded oracle is for fwd_ret_5m'
    assert p1.oracle is None and oracle_metrics(rd, 'mdd') is None
    doc = json.loads((root/'reports'/'metrics.json').read_text())
    assert 'oracle' not in doc                                            # no oracle key for mdd (nor any other)
    assert doc['phase1']['oracle_note'] == doc['phase2']['oracle_note'] == rd.oracle_note
    P = pd.read_parquet(root/'reports'/'predictions.parquet')
    assert not [c for c in P.columns if c.startswith('oracle')]
    assert {'lightgbm__mdd', 'ridge__mdd', 'lightgbm__fwd_ret_5m'} <= set(P.columns)
    assert not [k for k in p2.checks if 'oracle' in k or 'bound' in k]   # the verdict compares with no oracle


@pytest.mark.e2e
def test_leakage_screen_used_the_path_threshold_not_the_return_oracle(run):
    cfg, _, p1, _ = run
    lk = p1.metrics['leakage']
    assert lk['threshold'] == PATH_THRESHOLD and lk['threshold_setting'] == 'phase1.leakage.path_threshold'
    assert lk['oracle_bar'] is None and lk['oracle_ic'] is None and lk['flagged'] == []
    # the screen did meet features far above the return target's threshold: the run stops no more for them
    assert lk['max_abs_ic'] > cfg['phase1']['leakage']['threshold']
    assert p1.transformer.leakage_threshold == PATH_THRESHOLD


@pytest.mark.e2e
def test_demean_fallback_rows_are_recorded_per_split(run):
    _, _, p1, p2 = run
    rd = p1.data
    assert rd.bars['symbol'].nunique() == 2
    assert p1.metrics['demean_fallback_rows'] == {}                       # mdd is never demeaned
    y = rd.targets['fwd_ret_5m'].to_numpy()
    # two symbols: no timestamp has 3 finite returns, so every finite fitting row keeps its raw value
    want = {s: int(np.isfinite(y[rd.rows(s)]).sum()) for s in ('train', 'valid')}
    assert p2.metrics['demean_fallback_rows'] == {'fwd_ret_5m': want} and min(want.values()) > 0


@pytest.mark.parametrize('primary,has', [('fwd_ret_5m', True), ('fwd_ret_15m', False), ('mdd', False),
                                         ('mfe', False), ('tth', False), ('tth_side', False)])
def test_an_oracle_exists_only_for_the_target_it_was_computed_for(primary, has):
    ok, note = oracle_for(primary, 'fwd_ret_5m')
    assert ok is has and (note is None) is has
    if not has: assert note == f'no oracle for {primary}: the embedded oracle is for fwd_ret_5m'
    assert oracle_for(primary, None, source='/data/bars') == (False, 'no oracle: only the embedded market knows the truth')
