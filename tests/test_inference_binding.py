"""Inference is bound to what its models were trained with (issue 13, points 5, 6 and 7's Phase 3 precision).

One quick run (Phase 1, and Phase 2 with LightGBM only) is trained once for the module and registered like
run_notebooks.py does. Then:
- a copy of its artifact root gets Phase 1 again with another VAE beta (same column names, other latents): Phase 2's
  models must be refused for prediction, and a Phase 3 trained afterwards must leave them out of its comparison;
- records of failed, interrupted or skipped phases make the run unusable for prediction;
- a request without all training symbols is refused when the models read cross-sectional features (or predicted with
  a warning when allowed), and the single-symbol answer really differs;
- Phase 3 scores and serves with the precision its manifest records.
"""
from __future__ import annotations

import copy
import shutil

import numpy as np
import pandas as pd
import pytest

import pipeline_lib.models.sequence as sequence
from pipeline_lib.core.artifacts import ArtifactError, merge_json_atomic, read_json, read_manifest, sha256_file
from pipeline_lib.core.config import load_config
from pipeline_lib.features import build_features
from pipeline_lib.inference import (InferenceError, InferenceWarning, check_bars, cross_sectional_columns, load_run, main,
                                    register_run, subset_config)
from pipeline_lib.phases.phase1 import run_phase1
from pipeline_lib.phases.phase2 import run_phase2
from pipeline_lib.phases.phase3 import load_sequence_models, run_phase3
from synthetic import config_market_bars

OVERRIDES = {'phase2': {'models': ['lightgbm']}}
PHASE3 = {'models': ['cnn1d'], 'lookback': 8, 'max_epochs': 1, 'max_train_windows': 512, 'max_valid_windows': 256,
          'max_train_predictions': 500, 'device': 'cpu', 'predict_precision': 'bfloat16'}

pytestmark = pytest.mark.e2e  # every test reads a run of the quick config


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    "Run 'a': Phase 1 and 2 of the quick config, registered; with its config, artifact root, reports and bars."
    cfg = load_config('configs/quick.yaml', OVERRIDES)
    root = tmp_path_factory.mktemp('binding')
    rep = root/'reports'/'a'
    p1 = run_phase1(cfg, artifact_root=root, reports_dir=rep, progress=False)
    run_phase2(cfg, artifact_root=root, reports_dir=rep, run_name='a', run_data=p1.data, progress=False)
    register_run(rep, cfg, root, name='a')
    bars = config_market_bars(cfg)
    return cfg, root, rep, bars, p1.data


@pytest.fixture(scope='module')
def rerun(trained, tmp_path_factory):
    """A copy of run 'a' whose Phase 1 is re-run with another VAE beta into the same artifact root (run 'b'), then
    Phase 3 into the copy's reports, with every predict_torch call's precision recorded."""
    cfg, root, rep, bars, data = trained
    base = tmp_path_factory.mktemp('rerun')
    art = base/'art'
    shutil.copytree(root/'metadata', art/'metadata')
    shutil.copytree(root/'output', art/'output')
    rep_a = base/'reports'/'a'
    shutil.copytree(rep, rep_a)
    register_run(rep_a, cfg, art, name='a')                      # the copy loads, as the original does
    before = sha256_file(art/'metadata'/'manifest.json')
    cfg_b = copy.deepcopy(cfg)
    cfg_b['phase1']['vae']['beta'] = cfg['phase1']['vae']['beta'] / 4
    run_phase1(cfg_b, artifact_root=art, run_data=data, progress=False)
    rep_b = base/'reports'/'b'
    register_run(rep_b, cfg_b, art, name='b')                    # Phase 1 of b next to Phase 2 of a
    cfg_3 = copy.deepcopy(cfg_b)
    cfg_3['phase3'] = dict(PHASE3)
    calls, real = [], sequence.predict_torch
    def recording(*a, **k):
        calls.append(k.get('precision'))
        return real(*a, **k)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sequence, 'predict_torch', recording)
        with pytest.warns(UserWarning, match='Phase 1 was re-run after Phase 2'):
            res3 = run_phase3(cfg_3, artifact_root=art, reports_dir=rep_a, run_name='a', run_data=data, progress=False)
    return {'art': art, 'rep_a': rep_a, 'rep_b': rep_b, 'before': before, 'res3': res3, 'scoring_calls': calls}


def test_a_normal_run_loads(trained):
    run = load_run(trained[2])
    assert run.core is not None and run.universe == sorted(trained[3]['symbol'].unique())
    meta = run.manifests['phase2'][1]['meta']
    assert meta['phase1_manifest_sha256'] == sha256_file(trained[1]/'metadata'/'manifest.json')


def test_phase1_rerun_with_another_vae_beta_is_refused(trained, rerun):
    art = rerun['art']
    now = sha256_file(art/'metadata'/'manifest.json')
    assert now != rerun['before']
    m1 = read_manifest(art/'metadata')['meta']
    assert m1['output_columns_hash'] == read_manifest(trained[1]/'metadata')['meta']['output_columns_hash']  # same names
    with pytest.raises(InferenceError, match=rf'Phase 2 models were trained on Phase 1 manifest {rerun["before"][:12]}'
                                             rf'\.\.\., but .*metadata/? now holds {now[:12]}\.\.\.: re-run Phases 2-3'):
        load_run(rerun['rep_b'])
    with pytest.raises(ArtifactError, match='changed since run a recorded it'):
        load_run(rerun['rep_a'])                                  # run a's own record: its Phase 1 was replaced


def test_phase3_leaves_stale_phase2_out_of_its_comparison(rerun):
    comp = rerun['res3'].metrics['comparison']
    assert 'Phase 1 was re-run after Phase 2' in comp['phase2_stale'] and comp['message'] == comp['phase2_stale']
    assert not comp['phase2_available'] and 'lightgbm' not in comp['models']
    assert rerun['res3'].manifest['meta']['phase1_manifest_sha256'] == sha256_file(rerun['art']/'metadata'/'manifest.json')


def test_phase3_scores_and_serves_with_the_recorded_precision(rerun, monkeypatch):
    res3 = rerun['res3']
    assert res3.manifest['meta']['predict_precision'] == {'cnn1d': 'bfloat16'}
    assert rerun['scoring_calls'] and set(rerun['scoring_calls']) == {'bfloat16'}
    served, real = [], sequence.predict_torch
    monkeypatch.setattr(sequence, 'predict_torch', lambda *a, **k: served.append(k.get('precision')) or real(*a, **k))
    back = load_sequence_models(res3.output_dir)
    sym = res3.data.bars['symbol'].to_numpy()
    block = np.flatnonzero(sym == sym[0])[-1200:]                  # one symbol's latest rows (contiguous; test rows)
    P = back.predict(res3.X[block], sym[block])
    assert served and set(served) == {'bfloat16'}
    at = np.searchsorted(np.flatnonzero(res3.data.split.to_numpy() != 'gap'), block)   # res3.predictions' rows
    keep = (res3.data.split.to_numpy()[block] != 'gap')
    r = back.records['cnn1d']
    z = lambda p: (np.asarray(p, np.float64) - r['target_mean']) / r['target_std']   # the network's own units
    scored = z(res3.predictions['cnn1d__' + res3.primary].to_numpy()[at[keep]])
    again = z(P['cnn1d__' + res3.primary].to_numpy()[keep])
    ok = np.isfinite(scored) & np.isfinite(again)                  # the block's first rows have no full window
    assert ok.sum() > 100 and np.abs(again[ok] - scored[ok]).max() < 1e-6
    back.precision = {'cnn1d': 'float32'}                        # the precision matters: float32 gives other numbers
    f32 = z(back.predict(res3.X[block], sym[block])['cnn1d__' + res3.primary].to_numpy()[keep])[ok]
    assert np.abs(f32 - scored[ok]).max() > 1e-4


@pytest.mark.parametrize('status, phases, said', [
    ('failed', {'1': 'ok', '2': 'failed'}, "recorded as 'failed' \\(Phase 2 failed\\)"),
    ('interrupted', {'1': 'ok', '2': 'interrupted'}, "recorded as 'interrupted' \\(Phase 2 interrupted\\)"),
    ('ok', {'1': 'ok', '2': 'ok', '3': 'failed'}, "recorded as 'ok' \\(Phase 3 failed\\)"),
    ('failed', {'1': 'ok', '2': 'skipped'}, 'Phase 2 skipped'),
])
def test_unfinished_runs_are_refused(trained, tmp_path, status, phases, said):
    rep = tmp_path/'reports'/'f'
    shutil.copytree(trained[2], rep)
    rec = read_json(rep/'metrics.json')['run']
    rec.update(status=status, phases={p: {'status': s} for p, s in phases.items()})
    merge_json_atomic(rep/'metrics.json', 'run', rec)
    with pytest.raises(InferenceError, match=said + '.*not used for prediction'):
        load_run(rep)


def test_partial_universe_is_refused_or_warned_and_really_differs(trained, tmp_path, capsys):
    cfg, root, rep, bars, _ = trained
    run = load_run(rep)
    cs = cross_sectional_columns(run.feature_config, run.raw_columns('lightgbm'))
    assert cs, f'the quick run selected no cross-sectional feature: {run.raw_columns("lightgbm")}'
    syms = sorted(bars['symbol'].unique())
    one = bars[bars['symbol'] == syms[0]]
    with pytest.raises(InferenceError, match=rf'lacks {len(syms) - 1} of the {len(syms)} symbols.*{syms[1]}.*'
                                             'allow_partial_universe'):
        run.predict(one)
    with pytest.warns(InferenceWarning, match='Predicting anyway'):
        alone = run.predict(one, allow_partial_universe=True)
    full = run.predict(bars).loc[syms[0]]
    col = 'lightgbm__' + cfg['primary_target']
    a, f = alone[col].to_numpy(), full[col].reindex(alone.index.get_level_values('timestamp')).to_numpy()
    both = np.isfinite(a) & np.isfinite(f)
    assert both.sum() > 100 and np.abs(a[both] - f[both]).max() > 1e-6
    # the cause: a cross-sectional feature computed for one symbol alone is another feature
    sub = subset_config(run.feature_config, cs)
    F_alone, F_full = build_features(check_bars(one), sub), build_features(check_bars(bars), sub)
    x, y = F_alone[cs[0]].to_numpy(np.float64), F_full[cs[0]].to_numpy(np.float64)[check_bars(bars)['symbol'].eq(syms[0]).to_numpy()]
    fin = np.isfinite(x) & np.isfinite(y)
    assert fin.sum() > 100 and not np.allclose(x[fin], y[fin])
    # a symbol the run never saw: predicted, with a warning
    with pytest.warns(InferenceWarning, match='ZZZ.*outside the training universe'):
        run.predict(pd.concat([bars, one.assign(symbol='ZZZ')], ignore_index=True), last_only=True)
    # the CLI: refused with status 2 naming the symbols; with --allow-partial-universe, a warning line
    data, out = tmp_path/'one.parquet', tmp_path/'p.parquet'
    one.to_parquet(data, index=False)
    assert main(['--run', str(rep), '--data-dir', str(data), '--out', str(out), '--last-only']) == 2
    assert f'{syms[1]}' in capsys.readouterr().err
    assert main(['--run', str(rep), '--data-dir', str(data), '--out', str(out), '--last-only', '--allow-partial-universe']) == 0
    err = capsys.readouterr().err
    assert err.startswith('warning: ') and 'Predicting anyway' in err and len(pd.read_parquet(out)) == 1
