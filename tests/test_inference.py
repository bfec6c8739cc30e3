"""The inference path against a real run: one quick run (Phase 1, 2 and a tiny Phase 3) is trained once for the module
into a temporary artifact root and registered like run_notebooks.py does; its embedded bars are regenerated from the
run's config with make_market. Predictions must reproduce the run's predictions.parquet, be causal, agree with the
full history once the declared warm-up is there, and refuse replaced artifacts, bad bars and other library versions."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline_lib.core.artifacts import ArtifactError, atomic_write_json, read_json
from pipeline_lib.core.config import PipelineError, load_config
from pipeline_lib.data.load import DataError
from pipeline_lib.inference import InferenceError, load_run, main, register_run
from pipeline_lib.phases.phase1 import run_phase1
from pipeline_lib.phases.phase2 import run_phase2
from pipeline_lib.phases.phase3 import run_phase3
from synthetic import config_market_bars

# quick config; 14 days so that even the all-features baseline (vtod_10: 11 sessions of warm-up) scores the test rows
OVERRIDES = {'data': {'market': {'n_days': 14}}, 'phase2': {'multitask': {'epochs': 5}},
             'phase3': {'models': ['cnn1d'], 'lookback': 16, 'max_epochs': 1, 'max_train_windows': 1024,
                        'max_valid_windows': 512, 'max_train_predictions': 1000}}


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    cfg = load_config('configs/quick.yaml', OVERRIDES)
    root = tmp_path_factory.mktemp('inference')
    rep = root/'reports'/'t'
    p1 = run_phase1(cfg, artifact_root=root, reports_dir=rep, progress=False)
    run_phase2(cfg, artifact_root=root, reports_dir=rep, run_name='t', run_data=p1.data, progress=False)
    run_phase3(cfg, artifact_root=root, reports_dir=rep, run_name='t', run_data=p1.data, progress=False)
    register_run(rep, cfg, root, name='t')
    bars = config_market_bars(cfg)
    return cfg, root, rep, bars


@pytest.fixture(scope='module')
def run(trained):
    return load_run(trained[2])


@pytest.fixture(scope='module')
def full(trained, run):
    return run.predict(trained[3])


@pytest.mark.e2e
def test_reproduces_the_runs_predictions_parquet(trained, run, full):
    R = pd.read_parquet(trained[2]/'predictions.parquet').set_index(['symbol', 'timestamp'])
    pred_cols = [c for c in R.columns if '__' in c and not c.startswith('oracle')]
    assert set(full.columns) == set(pred_cols), (set(full.columns) ^ set(pred_cols))
    assert any(c.startswith('baseline_all_features__') for c in full.columns)
    test = R['split'] == 'test'
    for c in pred_cols:
        got = full[c].reindex(R.index)
        assert got[test].notna().all(), f'{c}: test rows without a prediction'      # every test row is scored
        ok = got.notna()
        assert ok.sum() >= test.sum()
        if c.startswith('ensemble__'):   # its validation rows are out of fold (weights fitted on other day blocks)
            ok &= R['split'] != 'valid'
        diff = np.abs(got[ok] - R.loc[ok, c]).max()
        assert diff <= 1e-6, (c, diff)


@pytest.mark.e2e
def test_short_history_rows_are_nan_and_counted(trained, run, full):
    bars = trained[3]
    n_sym = bars['symbol'].nunique()
    for c in full.columns:
        need = run.required_history(c.split('__')[0])
        assert run.short_history_[c] == n_sym * need, c
        first = full[c].groupby(level='symbol').apply(lambda s: int(s.notna().to_numpy().argmax()))
        assert (first == need).all(), (c, first.tolist(), need)
    used = run.raw_columns('baseline_all_features')               # the features the baseline's trees split on
    fit = next(iter(run.core.fits.baseline.values()))
    assert 0 < len(used) < len(fit.features) and set(used) <= set(fit.features)


@pytest.mark.e2e
def test_prefix_gives_the_same_values(trained, run, full):
    bars = trained[3]
    cut = bars['timestamp'].quantile(0.85)      # past the baseline's warm-up too
    P = run.predict(bars[bars['timestamp'] <= cut])
    F = full.loc[full.index.get_level_values('timestamp') <= cut]
    assert P.index.equals(F.index)
    for c in P.columns:
        a, b = P[c].to_numpy(), F[c].to_numpy()
        assert np.array_equal(np.isnan(a), np.isnan(b)) and np.isfinite(a).any(), c
        assert np.nanmax(np.abs(a - b)) <= 1e-12, c


@pytest.mark.e2e
def test_late_start_matches_the_full_history(trained, run, full):
    bars = trained[3]
    days = bars['timestamp'].dt.normalize()
    late = bars[days >= sorted(days.unique())[3]]      # three days less history
    P = run.predict(late)
    n_sym = bars['symbol'].nunique()
    for c in P.columns:
        ok = P[c].notna()
        assert ok.sum() > 0.5 * len(P) or c.startswith('baseline'), c
        assert (~ok).sum() == n_sym * run.required_history(c.split('__')[0]), c
        if ok.any():
            diff = np.abs(P.loc[ok, c] - full[c].reindex(P.index[ok])).max()
            assert diff <= 1e-5, (c, diff)


@pytest.mark.e2e
def test_last_only_equals_the_full_history_on_the_latest_bar(trained, run, full):
    bars = trained[3]
    P = run.predict(bars, last_only=True)
    last = full.groupby(level='symbol').tail(1)
    assert P.index.equals(last.index) and len(P) == bars['symbol'].nunique()
    for c in P.columns:
        assert P[c].notna().all(), c
        assert np.abs(P[c] - last[c]).max() <= 1e-5, c
    assert max(run.short_history_.values()) == 0


@pytest.mark.e2e
def test_models_and_targets_select_columns(trained, run):
    bars = trained[3]
    P = run.predict(bars, models=['ensemble'], last_only=True)
    assert list(P.columns) == ['ensemble__fwd_ret_5m']
    P = run.predict(bars, models='multitask', targets=['mdd', 'tth'], last_only=True)
    assert list(P.columns) == ['multitask__tth', 'multitask__mdd'] or set(P.columns) == {'multitask__tth', 'multitask__mdd'}
    with pytest.raises(InferenceError, match='no model'):
        run.predict(bars, models=['xgboost'])
    with pytest.raises(InferenceError, match='no target'):
        run.predict(bars, models=['lightgbm'], targets=['mdd'])


@pytest.mark.e2e
def test_bad_bars_are_refused_clearly(trained, run):
    bars = trained[3]
    with pytest.raises(DataError, match="volume"):
        run.predict(bars.drop(columns=['volume']))
    five = bars.assign(timestamp=bars['timestamp'].iloc[0] + (bars['timestamp'] - bars['timestamp'].iloc[0]) * 5)
    with pytest.raises(DataError, match='0 days 00:05:00 bars but run t was trained on 0 days 00:01:00'):
        run.predict(five)


def _copy_run(trained, dest: Path) -> Path:
    cfg, root, _, _ = trained
    new = dest/'art'
    shutil.copytree(root/'metadata', new/'metadata')
    shutil.copytree(root/'output', new/'output')
    register_run(dest/'reports'/'c', cfg, new, name='c')
    return dest/'reports'/'c'


@pytest.mark.e2e
def test_replaced_or_modified_artifacts_are_refused(trained, tmp_path):
    rep = _copy_run(trained, tmp_path)
    load_run(rep)                                                  # the copy itself is fine
    core = tmp_path/'art'/'output'/'core_models'
    model = next(core.glob('lightgbm_*.joblib'))
    data = model.read_bytes()
    model.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(ArtifactError, match='modified'):
        load_run(rep)
    model.write_bytes(data)
    m = read_json(core/'manifest.json')                            # a new (valid) manifest: another run's models
    m['created'] = '2000-01-01T00:00:00+00:00'
    atomic_write_json(core/'manifest.json', m)
    with pytest.raises(ArtifactError, match='changed since run c recorded it'):
        load_run(rep)


@pytest.mark.e2e
def test_other_library_version_and_edited_config_are_refused(trained, tmp_path):
    rep = _copy_run(trained, tmp_path)
    md = tmp_path/'art'/'metadata'
    m = read_json(md/'manifest.json')
    m['versions']['pipeline_lib'] = '0.0.0-old'
    atomic_write_json(md/'manifest.json', m)
    register_run(rep, trained[0], tmp_path/'art', name='c')        # as if that old version had run it
    with pytest.raises(InferenceError, match='another library version.*0.0.0-old'):
        load_run(rep)
    text = (rep/'config.yaml').read_text()
    (rep/'config.yaml').write_text(text.replace('n_days: 14', 'n_days: 15'))
    with pytest.raises(InferenceError, match='config was edited'):
        load_run(rep)
    with pytest.raises(InferenceError, match='No run'):
        load_run('no-such-run', tmp_path/'reports')


@pytest.mark.e2e
def test_cli_last_only(trained, tmp_path, capsys):
    bars = trained[3]
    data = tmp_path/'bars.parquet'
    bars.to_parquet(data, index=False)
    out = tmp_path/'p.parquet'
    rc = main(['--run', str(trained[2]), '--data-dir', str(data), '--out', str(out), '--models', 'ensemble', '--last-only'])
    assert rc == 0, capsys.readouterr()
    P = pd.read_parquet(out)
    assert list(P.columns) == ['symbol', 'timestamp', 'ensemble__fwd_ret_5m'] and len(P) == bars['symbol'].nunique()
    assert 'every row had enough history' in capsys.readouterr().out
    assert main(['--run', 'nope', '--data-dir', str(data), '--out', str(out), '--reports-dir', str(tmp_path)]) == 2
    assert 'No run' in capsys.readouterr().err


@pytest.mark.slow
def test_cli_as_a_module(tmp_path):
    r = subprocess.run([sys.executable, '-m', 'pipeline_lib.inference', '--run', 'nope', '--reports-dir', str(tmp_path),
                        '--data-dir', str(tmp_path/'missing.csv'), '--out', str(tmp_path/'p.parquet')],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: No run 'nope'"), r.stderr
