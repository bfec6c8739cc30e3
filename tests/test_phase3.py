"""Phase 3 end to end on a small null market (no planted signal) with tiny caps: honest ICs, windows that respect the
split, exactly Phase 2's test rows, the output contracts, and refusal of missing Phase 1 or tampered artifacts.
Phase 1 is fitted once for the module into a temporary artifact root."""
from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline_lib.core.artifacts import ArtifactError
from pipeline_lib.core.config import PipelineError, load_config
from pipeline_lib.evaluation.metrics import METRIC_KEYS
from pipeline_lib.phases.phase1 import run_phase1
from pipeline_lib.phases.phase2 import prediction_frame
from pipeline_lib.phases.phase3 import MODEL_NAMES, compare_with_phase2, load_sequence_models, phase3_options, run_phase3
from pipeline_lib.phases.streaming import transform_rows
from pipeline_lib.core.config import DependencyError

T = 'fwd_ret_5m'
# quick config, no planted drift, 16 days so the test split has 4 days (day-block standard errors need a few blocks);
# tiny caps keep the three models to a few seconds
NULL = {'data': {'market': {'strength': 0, 'n_days': 16}},
        'phase3': {'max_epochs': 1, 'max_train_windows': 1024, 'max_valid_windows': 1024, 'max_train_predictions': 1500,
                   'num_threads': 1, 'device': 'cpu'}}


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    cfg = load_config('configs/quick.yaml', NULL)
    root = tmp_path_factory.mktemp('phase3')
    rep = root/'reports'
    p1 = run_phase1(cfg, artifact_root=root, reports_dir=rep, progress=False)
    rd = p1.data
    # a stand-in for Phase 2's predictions.parquet: Phase 3 must merge into it and compare on the same rows
    rows = np.flatnonzero(rd.split.to_numpy() != 'gap')
    fake = np.random.default_rng(1).standard_normal(len(rows))
    prediction_frame(rd, {f'lightgbm__{T}': fake}, rows, T).to_parquet(rep/'predictions.parquet', index=False)
    res = run_phase3(cfg, artifact_root=root, reports_dir=rep, run_name='t', run_data=rd, progress=False)
    return cfg, root, res


@pytest.mark.e2e
def test_null_market_every_model_is_within_4_standard_errors_of_zero(run):
    _, _, res = run
    assert set(res.metrics['models']) == set(MODEL_NAMES)
    for name, d in res.metrics['models'].items():
        m = d[T]['test']
        assert m['n'] > 1000 and m['ic_se'] is not None and m['ic_se'] > 0, name
        assert abs(m['ic']) <= 4 * m['ic_se'], (name, m['ic'], m['ic_se'])


@pytest.mark.e2e
def test_windows_stay_in_their_symbol_and_split_and_end_at_their_row(run):
    _, _, res = run
    rd, L = res.data, res.opts['lookback']
    lab, sym = rd.split.to_numpy().astype(str), rd.bars['symbol'].to_numpy()
    P = res.predictions
    pos = np.flatnonzero(lab != 'gap')                     # P's rows are the run's non-gap rows, in order
    assert np.array_equal(P['timestamp'].to_numpy(), rd.bars['timestamp'].to_numpy()[pos])
    for name in res.fits:
        ends = pos[np.isfinite(P[f'{name}__{T}'].to_numpy())]
        assert (ends >= L - 1).all()
        W = ends[:, None] + np.arange(-(L - 1), 1)[None, :]
        assert (sym[W] == sym[ends][:, None]).all()                                   # one symbol
        assert ((lab[W] == lab[ends][:, None]) | (lab[W] == 'gap')).all()              # one split (+ gaps)
    # the features are Phase 1's transform of every row (chunked transform == one call)
    some = np.flatnonzero(lab == 'test')[:50]
    assert np.array_equal(res.X[some], res.transformer.transform(rd.features.iloc[some]).to_numpy(np.float32))
    in_memory = dataclasses.replace(rd, store=None, frame=rd.features)   # chunks of 64 rows instead of partitions
    assert np.array_equal(transform_rows(res.transformer, in_memory, np.arange(300), chunk_rows=64),
                          res.transformer.transform(rd.features.iloc[:300]).to_numpy(np.float32))


@pytest.mark.e2e
def test_a_prediction_is_made_at_its_windows_last_row(run):
    "Changing row k's features changes the predictions of rows k .. k+L-1 (the windows holding it), and no other."
    _, root, res = run
    L = res.opts['lookback']
    back = load_sequence_models(root/'output'/'sequential_models')
    sym = res.data.bars['symbol'].to_numpy()
    a = int(np.flatnonzero(sym == sym[0])[0])
    Xs, ss = res.X[a:a + 3 * L].copy(), sym[a:a + 3 * L]
    k = L + 5
    before = back.predict(Xs, ss)
    Xs[k] += 5.0
    changed = np.abs(back.predict(Xs, ss).to_numpy() - before.to_numpy()) > 1e-7
    for j, c in enumerate(before.columns):
        hit = np.flatnonzero(changed[:, j])
        assert hit.min() == k and hit.max() <= k + L - 1, (c, hit)


@pytest.mark.e2e
def test_test_rows_are_exactly_phase2s(run):
    _, root, res = run
    rd = res.data
    y = rd.targets[T].to_numpy()
    lab = rd.split.to_numpy().astype(str)
    p2_test = int(((lab == 'test') & np.isfinite(y)).sum())          # what Phase 2 scores on test
    for name, d in res.metrics['models'].items():
        assert d[T]['test']['n'] == p2_test and d[T]['valid']['n'] == int(((lab == 'valid') & np.isfinite(y)).sum())
    c = res.metrics['comparison']
    assert c['phase2_available'] and c['same_test_rows'] and c['rows']['test'] == p2_test
    assert c['best_phase3_vs_best_phase2']['phase2_model'] == 'lightgbm'
    assert set(res.comparison.index) >= set(MODEL_NAMES) | {'lightgbm'}
    assert res.metrics['windows']['test']['rows without one'] == 0


@pytest.mark.e2e
def test_predictions_parquet_merges_with_phase2(run):
    _, root, res = run
    P = pd.read_parquet(root/'reports'/'predictions.parquet')
    rd = res.data
    assert list(P.columns[:3]) == ['symbol', 'timestamp', 'split']
    assert len(P) == int((rd.split != 'gap').sum()) and not P.duplicated(['symbol', 'timestamp']).any()
    for c in [f'{m}__{T}' for m in MODEL_NAMES] + [f'lightgbm__{T}', f'oracle__{T}', f'oracle_bound__{T}', T, 'mdd', 'tth', 'mfe']:
        assert c in P.columns, c
    assert P[f'lightgbm__{T}'].notna().all()                          # Phase 2's column kept
    te = P['split'].eq('test').to_numpy()
    for m in MODEL_NAMES:
        assert P.loc[te, f'{m}__{T}'].notna().all()                    # every test row predicted
        assert P.loc[P['split'].eq('train'), f'{m}__{T}'].notna().sum() == 1500   # capped train scoring


@pytest.mark.e2e
def test_compare_says_plainly_when_phase2_has_not_run(run):
    _, _, res = run
    table, out = compare_with_phase2(res.predictions, T, list(res.fits))
    assert not out['phase2_available'] and 'Phase 2 has not run' in out['message']
    assert set(table['phase']) == {'phase 3', 'oracle'}


@pytest.mark.e2e
def test_metrics_json_shape_caps_and_no_nan(run):
    _, root, res = run
    doc = json.loads((root/'reports'/'metrics.json').read_text(), parse_constant=lambda c: pytest.fail(f'metrics.json contains {c}'))
    assert 'phase1' in doc and 'oracle' in doc                         # Phase 1's keys survive the merge
    p3 = doc['phase3']
    assert p3['capped'] is True and p3['lookback'] == 32 and p3['caps']['max_train_windows'] == 1024
    for name, d in p3['models'].items():
        assert d['seconds'] > 0
        for s in ('train', 'valid', 'test'): assert set(d[T][s]) == set(METRIC_KEYS)
        c = d['capped']
        assert c['active'] and 'max_train_windows' in c['by'] and 'max_train_predictions' in c['by']
        assert c['windows_per_epoch'] == 1024 and c['train_windows'] > 1024
        assert d['training']['windows_per_second'] > 0 and d['training']['n_parameters'] > 0


@pytest.mark.e2e
def test_artifacts_round_trip_with_weights_only(run):
    _, root, res = run
    d = root/'output'/'sequential_models'
    man = json.loads((d/'manifest.json').read_text())
    assert set(man['files']) == {f'{m}.pt' for m in MODEL_NAMES} | {'models.json'}
    assert man['meta']['model_configs']['lstm']['arch'] == {'hidden_size': 128, 'num_layers': 2, 'dropout': 0.3}
    for m in MODEL_NAMES:
        state = torch.load(d/f'{m}.pt', weights_only=True)
        assert all(isinstance(v, torch.Tensor) for v in state.values())
    back = load_sequence_models(d, {'data_fingerprint': res.data.fingerprint, 'primary_target': T})
    rd, L = res.data, res.opts['lookback']
    sym = rd.bars['symbol'].to_numpy()
    r = np.flatnonzero((rd.split.to_numpy() == 'test') & (sym == sym[-1]))[:400]
    a = r[0] - L + 1
    again = back.predict(res.X[a:r[-1] + 1], sym[a:r[-1] + 1]).iloc[L - 1:]
    pos = np.searchsorted(np.flatnonzero(rd.split.to_numpy() != 'gap'), r)
    for c in again.columns:
        assert np.allclose(again[c].to_numpy(), res.predictions[c].to_numpy()[pos], rtol=1e-5, atol=1e-9), c


@pytest.mark.e2e
def test_tampered_or_foreign_artifacts_are_refused(run, tmp_path):
    _, root, res = run
    d = tmp_path/'sequential_models'
    shutil.copytree(root/'output'/'sequential_models', d)
    with pytest.raises(ArtifactError, match='stale'):
        load_sequence_models(d, {'data_fingerprint': 'another'})
    raw = bytearray((d/'lstm.pt').read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (d/'lstm.pt').write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match='lstm.pt'):
        load_sequence_models(d)


@pytest.mark.e2e
def test_missing_phase1_is_refused_before_any_work(run, tmp_path):
    cfg, _, res = run
    with pytest.raises(DependencyError, match='Phase 1'):
        run_phase3(cfg, metadata_dir=tmp_path/'nothing', output_dir=tmp_path/'out', run_data=res.data, progress=False)
    assert not (tmp_path/'out').exists()


def test_lookback_longer_than_the_splits_gaps_is_refused():
    with pytest.raises(PipelineError, match='split.max_lookback'):
        phase3_options(load_config('configs/quick.yaml', {'phase3': {'lookback': 40}}))
    with pytest.raises(PipelineError, match='Unknown model'):
        phase3_options(load_config('configs/quick.yaml', {'phase3': {'models': ['gru']}}))
    s = phase3_options(load_config('configs/quick.yaml', {'phase3': {'models': {'cnn1d': {'channels': 8}}}}))
    assert s['models'] == {'cnn1d': {'channels': 8}}


class _Captured(Exception):
    pass


@pytest.mark.e2e
def test_networks_are_trained_and_stopped_on_the_demeaned_return_of_their_block_only(run, monkeypatch):
    """Phase 3 fits `fitting_targets` like Phase 2: the train and valid blocks each demeaned over their own rows,
    and no test row's target is ever handed to the trainer."""
    import pipeline_lib.phases.phase3 as p3
    from pipeline_lib.phases.run_data import prepare_run_data
    cfg, root, res = run
    seen = {}
    def capture(name, X, y, train_ends, valid_ends, *a, **kw):
        seen.update(y=np.asarray(y, float), train=np.asarray(train_ends), valid=np.asarray(valid_ends))
        raise _Captured
    monkeypatch.setattr(p3, 'fit_sequence_model', capture)
    rd = prepare_run_data(cfg, progress=False)
    with pytest.raises(_Captured):
        run_phase3(cfg, artifact_root=root, run_data=rd, progress=False)
    y, lab, ts = seen['y'], rd.split.to_numpy(), rd.bars['timestamp'].to_numpy()
    assert np.isnan(y[lab == 'test']).all() and np.isnan(y[lab == 'gap']).all()
    raw = rd.targets[T].to_numpy(float)
    for s in ('train', 'valid'):
        r = rd.rows(s)
        assert np.array_equal(np.isnan(y[r]), np.isnan(raw[r]))
        assert pd.Series(y[r]).groupby(ts[r]).mean().abs().max() < 1e-12
    assert np.isfinite(y[seen['train']]).all() and np.isfinite(y[seen['valid']]).all()


def test_eval_cap_scores_a_seeded_subset_of_each_split_and_leaves_training_rows_alone():
    from types import SimpleNamespace
    from pipeline_lib.phases.phase3 import scored_rows
    lab = np.array(['train'] * 600 + ['gap'] * 10 + ['valid'] * 200 + ['gap'] * 10 + ['test'] * 300)
    ok = np.ones(len(lab), bool); ok[lab == 'gap'] = False; ok[::7] = False   # some rows lack a full window
    rd = SimpleNamespace(split_labels=lab.astype(object))   # RunData's split as an object array
    opts = {'seed': 3, 'max_train_predictions': None, 'max_eval_predictions': 50}
    rows, pred = scored_rows(rd, ok, opts)
    assert np.array_equal(rows, np.flatnonzero(lab != 'gap'))
    assert ok[pred].all() and (np.diff(pred) > 0).all()
    counts = pd.Series(lab[pred]).value_counts()
    assert counts['valid'] == counts['test'] == 50 and counts['train'] == (ok & (lab == 'train')).sum()
    assert np.array_equal(pred, scored_rows(rd, ok, opts)[1])
    assert np.array_equal(scored_rows(rd, ok, {**opts, 'max_eval_predictions': None})[1], np.flatnonzero(ok))
