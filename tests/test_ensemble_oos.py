"""The ensemble's validation figure is out of sample, the best model is chosen by it, and the verdict states the
cost of a full retrain and when one market cannot settle "not worse". Unit-level: planted members, no training."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pytest

from pipeline_lib.models.ensemble import day_blocks, fit_ensemble, simplex_weights
from pipeline_lib.evaluation.metrics import evaluate
from pipeline_lib.phases.phase2 import model_metrics
from pipeline_lib.phases.training import Fits, predict_all
from pipeline_lib.phases.verdict import MIN_TEST_DAYS, compare, phase1_cost, verdict

T = 'fwd_ret_5m'
PURGE = 30


@dataclass
class Member:
    "A stand-in for a fitted LightGBM/ridge: predicts one column of X, with the attributes the metrics read."
    column: str
    seconds: float = 1.0
    features: list = field(default_factory=lambda: ['signal', 'lucky'])
    best_iteration: int = 10
    n_iterations: int = 60
    n_train: int = 0
    n_valid: int = 0
    alpha: float = 1.0
    valid_mse: dict = field(default_factory=dict)
    engine: dict | None = None

    @property
    def seconds_per_iteration(self): return self.seconds / self.n_iterations
    def predict(self, X): return X[self.column].to_numpy(float)


def _panel(n_days=(4, 5, 5), n_symbols=5, bars=100, seed=0, lucky_block=2):
    """Train, valid and test days of `bars` minute bars for `n_symbols` symbols. `signal` is a calibrated weak
    prediction of y everywhere; `lucky` equals y on one day block of the validation rows and is noise of the
    signal's scale elsewhere: the member a validation-fitted ensemble overweights."""
    rng = np.random.default_rng(seed)
    days = pd.bdate_range('2024-01-02', periods=sum(n_days))
    ts = np.concatenate([d + pd.Timedelta('9h30min') + pd.to_timedelta(np.arange(bars), unit='min') for d in days])
    ts = np.repeat(ts, n_symbols)
    sym = np.tile([f'S{j}' for j in range(n_symbols)], len(ts) // n_symbols)
    day = pd.DatetimeIndex(ts).normalize()
    split = np.where(day < days[n_days[0]], 'train', np.where(day < days[n_days[0] + n_days[1]], 'valid', 'test'))
    signal = 0.3 * rng.standard_normal(len(ts))
    y = signal + rng.standard_normal(len(ts))
    va = split == 'valid'
    block = np.full(len(ts), -1)
    block[va] = day_blocks(ts[va])
    lucky = np.where(block == lucky_block, y, 0.3 * rng.standard_normal(len(ts)))
    X = pd.DataFrame({'signal': signal, 'lucky': lucky})
    frame = pd.DataFrame({'symbol': sym, 'timestamp': ts, 'split': split, T: y})
    return X, frame, block


def _fits(X, frame):
    "LightGBM = the signal, ridge = the lucky member, and their ensemble fitted the way fit_models fits it."
    fits = Fits(lightgbm={T: Member('signal')}, ridge={T: Member('lucky')})
    va = frame['split'].eq('valid').to_numpy()
    members = {'lightgbm': X['signal'].to_numpy()[va], 'ridge': X['lucky'].to_numpy()[va]}
    fits.ensemble[T] = fit_ensemble(members, frame[T].to_numpy()[va], target=T,
                                    timestamps=frame['timestamp'].to_numpy()[va], purge_bars=PURGE)
    return fits


def _scored(fits, X, frame, out_of_fold=True, models=('lightgbm', 'ensemble')):
    "The predictions frame Phase 2 writes (valid rows of the ensemble out of fold) and its metrics."
    kw = dict(split=frame['split'].to_numpy(), timestamps=frame['timestamp'].to_numpy()) if out_of_fold else {}
    P = frame.assign(**predict_all(fits, X, None, list(models), **kw))
    return P, model_metrics(P, fits, list(models), [T])


def test_out_of_fold_weights_never_see_their_own_block():
    X, frame, block = _panel()
    fits = _fits(X, frame)
    e = fits.ensemble[T]
    va = frame['split'].eq('valid').to_numpy()
    ts, y, b = frame['timestamp'].to_numpy()[va], frame[T].to_numpy()[va], block[va]
    P = np.c_[X['signal'].to_numpy()[va], X['lucky'].to_numpy()[va]]
    assert len(e.folds) == len(np.unique(b)) >= 3
    # the lucky member carries the in-sample fit; its own block's out-of-fold weights give it almost nothing
    assert e.as_dict()['ridge'] > 0.3 and e.folds[2]['weights']['ridge'] < 0.05
    # each block's weights are exactly those of the other blocks less the purge: rows of the block never enter
    pos = np.searchsorted(np.unique(ts), ts)
    for k, f in enumerate(e.folds):
        held = b == k
        keep = ~held & ((pos < pos[held].min() - PURGE) | (pos > pos[held].max() + PURGE))
        assert (held & keep).sum() == 0 and keep.sum() < (~held).sum()      # purged on at least one side
        assert np.allclose(list(f['weights'].values()), simplex_weights(P[keep], y[keep]), atol=1e-12)
    # changing a block's own rows (target and members) leaves that block's weights untouched
    y2, P2 = y.copy(), P.copy()
    y2[b == 2] = -y2[b == 2]
    P2[b == 2] = P2[b == 2][::-1]
    e2 = fit_ensemble({'lightgbm': P2[:, 0], 'ridge': P2[:, 1]}, y2, timestamps=ts, purge_bars=PURGE)
    assert e2.folds[2]['weights'] == pytest.approx(e.folds[2]['weights'], abs=1e-12)
    assert e2.as_dict() != pytest.approx(e.as_dict(), abs=1e-6)


def test_reported_validation_ic_is_the_out_of_fold_one():
    X, frame, _ = _panel()
    fits = _fits(X, frame)
    P, metrics = _scored(fits, X, frame)
    va = frame['split'].eq('valid').to_numpy()
    e, mem = fits.ensemble[T], {'lightgbm': X['signal'].to_numpy(), 'ridge': X['lucky'].to_numpy()}
    oof = e.predict_out_of_fold({k: v[va] for k, v in mem.items()}, frame['timestamp'].to_numpy()[va])
    assert np.array_equal(P[f'ensemble__{T}'].to_numpy()[va], oof)
    te = frame['split'].eq('test').to_numpy()                       # test and production: the all-valid weights
    assert np.allclose(P[f'ensemble__{T}'].to_numpy()[te], e.predict({k: v[te] for k, v in mem.items()}))
    ev = lambda p: evaluate(frame[T].to_numpy()[va], p, frame['timestamp'].to_numpy()[va], frame['symbol'].to_numpy()[va])['ic']
    reported = metrics['ensemble'][T]['valid']['ic']
    assert reported == pytest.approx(ev(oof), abs=1e-12)
    in_sample = ev(e.predict({k: v[va] for k, v in mem.items()}))
    assert in_sample > reported + 0.05
    assert metrics['ensemble']['valid_in_sample'] == 'mild' and 'out of fold' in metrics['ensemble']['valid_role']
    assert 'early stopping' in metrics['lightgbm']['valid_role']
    assert len(metrics['ensemble']['training'][T]['out_of_fold']) == len(e.folds)


def test_best_model_is_chosen_by_the_out_of_fold_figure():
    X, frame, _ = _panel()
    fits = _fits(X, frame)
    P, metrics = _scored(fits, X, frame)
    ic = lambda m: metrics[m][T]['valid']['ic']
    # the in-sample ensemble would win, the out-of-fold one does not
    _, in_sample = _scored(fits, X, frame, out_of_fold=False)
    assert in_sample['ensemble'][T]['valid']['ic'] > ic('lightgbm') > ic('ensemble')
    assert compare(P, in_sample, fits, T, False)['best_model'] == 'ensemble'
    checks = compare(P, metrics, fits, T, False)
    assert checks['best_model'] == 'lightgbm' and checks['best_model_valid_ic'] == ic('lightgbm')
    assert 'out of fold' in checks['best_model_chosen_by'] and 'in-sample' in checks['best_model_chosen_by']


def _with_baseline(n_days):
    "A scored frame with the N-feature LightGBM and the baseline over `n_days` test days, and their fits."
    X, frame, _ = _panel(n_days=(4, 5, n_days))
    fits = _fits(X, frame)
    fits.lightgbm[T].seconds, fits.baseline[T] = 3.0, Member('lucky', seconds=30.0)
    P, metrics = _scored(fits, X, frame)
    P[f'baseline_all_features__{T}'] = X['lucky'].to_numpy() + X['signal'].to_numpy()
    return P, metrics, fits


@pytest.mark.parametrize('n_days', [MIN_TEST_DAYS - 1, MIN_TEST_DAYS])
def test_verdict_says_a_single_market_is_underpowered_below_20_test_days(n_days):
    P, metrics, fits = _with_baseline(n_days)
    checks = compare(P, metrics, fits, T, False)
    assert checks['test_days'] == n_days and checks['underpowered'] == (n_days < MIN_TEST_DAYS)
    text = verdict(checks, metrics)[0]
    assert ('underpowered' in text) == (n_days < MIN_TEST_DAYS)
    if n_days < MIN_TEST_DAYS:
        assert 'bench/bench_selection.py' in text and '95% interval of the mean difference' in text


def test_verdict_shows_the_cost_of_a_full_retrain(tmp_path):
    P, metrics, fits = _with_baseline(5)
    meta = tmp_path/'metadata'
    (tmp_path/'metrics.json').write_text(json.dumps({'phase1': {'seconds': 20.0, 'timings': {'fit': 12.0},
                                                                'metadata_dir': str(meta)}}))
    cost = phase1_cost(tmp_path, meta)
    assert cost['fit_seconds'] == 12.0
    checks = compare(P, metrics, fits, T, False, cost)
    fr = checks['full_retrain']
    assert fr['seconds'] == 15.0 and fr['baseline_seconds'] == 30.0 and fr['speed_ratio_wall'] == 2.0
    text = verdict(checks, metrics)[1]
    assert text.startswith('**Training time.**')
    assert "A full retrain (Phase 1's fit, 12.0 s, then the N-feature LightGBM, 3.0 s) takes 15.0 s" in text
    assert "baseline's 30.0 s: 2.0x faster" in text
    # unavailable: said so, no number invented
    for missing in (phase1_cost(None, meta), phase1_cost(tmp_path, tmp_path/'elsewhere'), phase1_cost(tmp_path/'none', meta)):
        assert set(missing) == {'missing'}
        text = verdict(compare(P, metrics, fits, T, False, missing), metrics)[1]
        assert 'full retrain (Phase 1, then the N-feature LightGBM) is not known here' in text


def test_phase3_comparison_labels_validation_figures_and_never_chooses_an_in_sample_one():
    from pipeline_lib.phases.phase3 import compare_with_phase2
    X, frame, _ = _panel()
    fits = _fits(X, frame)
    _, in_sample = _scored(fits, X, frame, out_of_fold=False)    # an old run: the ensemble scored in-sample on valid
    P = frame.assign(**predict_all(fits, X, None, ['lightgbm', 'ensemble']), **{f'lstm__{T}': X['signal'].to_numpy() + 0.3 * np.random.default_rng(1).standard_normal(len(X))})
    old = {'models': {m: {k: v for k, v in d.items() if k not in ('valid_in_sample', 'valid_role')} for m, d in in_sample.items()}}
    table, out = compare_with_phase2(P, T, ['lstm'], old)
    assert table.loc['ensemble', 'IC valid in-sample'] == 'yes' and table.loc['lightgbm', 'IC valid in-sample'] == 'mild'
    assert table.loc['lstm', 'IC valid in-sample'] == 'mild'
    assert table.loc['ensemble', 'IC valid'] > table.loc['lightgbm', 'IC valid']     # the higher number is not chosen
    assert out['best_phase3_vs_best_phase2']['phase2_model'] == 'lightgbm' and 'mildly in-sample' in out['message']
    # this run's ensemble (out of fold, labelled) is a candidate like any other
    new = {'models': {m: {**d, 'valid_in_sample': 'mild'} for m, d in old['models'].items()}}
    table, out = compare_with_phase2(P, T, ['lstm'], new)
    assert table.loc['ensemble', 'IC valid in-sample'] == 'mild' and out['best_phase3_vs_best_phase2']['phase2_model'] == 'ensemble'


def test_show_and_index_mark_in_sample_validation_figures(tmp_path):
    from pipeline_lib.driver.index import VALID_NOTE, build_index, show_run
    ic = lambda v: {T: {'train': {'ic': 0.2}, 'valid': {'ic': v}, 'test': {'ic': 0.05}}}
    (tmp_path/'r1').mkdir()
    (tmp_path/'r1'/'metrics.json').write_text(json.dumps({
        'run': {'name': 'r1', 'status': 'ok', 'data': 'embedded', 'primary_target': T, 'started': '2024-01-01T00:00'},
        'phase2': {'models': {'lightgbm': {**ic(0.06), 'valid_in_sample': 'mild'},
                              'ensemble': ic(0.09)}}}))       # no label: an older run's in-sample ensemble
    said = []
    rows = show_run(reports_dir=tmp_path, say=lambda *a, **k: said.append(' '.join(map(str, a))))
    assert rows['lightgbm']['valid_in_sample'] == 'mild' and rows['ensemble']['valid_in_sample'] == 'yes'
    line = {s.split()[0]: s for s in said if s.split() and s.split()[0] in rows}
    assert line['lightgbm'].rstrip().endswith(' *') and line['ensemble'].rstrip().endswith(' **')
    assert VALID_NOTE in said
    index = build_index(tmp_path).read_text()
    assert '<code>lightgbm</code> 0.060* / 0.050' in index and '<code>ensemble</code> 0.090** / 0.050' in index
    assert 'mildly in-sample' in index


@pytest.mark.parametrize('diffs, want', [((-0.01, 0.002, -0.004), True),      # the interval includes zero
                                         ((0.010, 0.012, 0.011), True),       # it lies above zero
                                         ((-0.010, -0.012, -0.011), False),   # it lies below zero: worse
                                         ((0.01,), None)])                    # one seed: no interval
def test_bench_selection_not_worse_is_the_95_interval_of_the_mean_difference(diffs, want):
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location('bench_selection', Path(__file__).parents[1]/'bench'/'bench_selection.py')
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    s = bench.summarise([{'diff': d, 'within_one_se': True, 'speed_ok': True, 'speed_ratio_wall': 4.0} for d in diffs])
    assert s['not_worse'] is want
    if want is not None: assert (s['ci95'][1] >= 0) == want and s['ci95'][0] < s['mean_diff'] < s['ci95'][1]
