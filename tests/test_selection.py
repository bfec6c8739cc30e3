"""Phase 1 feature selection: planted signal beats noise controls, only training rows matter, determinism,
fewer-than-asked, the correlation filter, the leakage screen and the noise controls' exclusion."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline_lib.core.config import PipelineError
from pipeline_lib.evaluation.metrics import block_labels, pearson_with_se
from pipeline_lib.models.importance import (ImportanceResult, LeakageError, add_noise_controls, check_leakage, feature_ic,
                                            feature_importance, leakage_screen)
from pipeline_lib.models.selection import select_features, select_on_train, selection_params, synthetic_panel
from pipeline_lib.data.splits import make_split

PLANTED = ['f00', 'f01', 'f02']
FAST = dict(horizon=5, num_threads=1, n_folds=3, shap_sample=1000)


@pytest.fixture(scope='module')
def panel():
    X, y, ts, sym = synthetic_panel(20_000, 20, seed=3)
    split = make_split(pd.DataFrame({'symbol': sym, 'timestamp': ts}), horizon=5, lookback=0)
    return X, y, ts, sym, split


@pytest.fixture(scope='module')
def base(panel):
    X, y, ts, sym, split = panel
    return select_on_train(X, y, split, ts, sym, n_features=8, seed=11, **FAST)


def _train(panel):
    X, y, ts, sym, split = panel
    m = split.eq('train').to_numpy()
    return tuple(v[m].reset_index(drop=True) for v in (X, y, ts, sym))


def test_planted_features_outrank_noise_controls(base):
    imp = base.importance
    t = imp.table
    assert len(imp.controls) == 5 and t.loc[imp.controls, 'is_control'].all()
    # every planted feature (f00 or its near-copy for f00) beats every noise control on gain and on SHAP
    f0 = max(t.at['f00', 'gain'], t.at['f00_dup', 'gain'])
    assert min(f0, t.at['f01', 'gain'], t.at['f02', 'gain']) > t.loc[imp.controls, 'gain'].max()
    assert t.loc[['f01', 'f02'], 'shap'].min() > t.loc[imp.controls, 'shap'].max()
    assert {'f01', 'f02'} <= set(base.features) and ({'f00', 'f00_dup'} & set(base.features))
    assert base.table.loc[['f01', 'f02'], 'above_noise'].all()
    assert base.table.loc[['f01', 'f02'], 'fold_stability'].eq(1.0).all()
    assert imp.rank_agreement is not None and imp.rank_agreement > 0.5
    assert np.allclose(imp.fold_gain.sum(axis=0), 1.0) and len(imp.folds) == 3
    assert (imp.folds['valid_ic'] > 0.05).all()   # the models found the planted signal out of sample


def test_poisoning_rows_outside_train_leaves_selection_identical(panel, base):
    X, y, ts, sym, split = panel
    out = split.ne('train').to_numpy()
    assert out.sum() > 5000
    rng = np.random.default_rng(99)
    Xp, yp = X.copy(), y.copy()
    yp[out] = rng.standard_normal(out.sum()) * 1e6
    yp[np.flatnonzero(out)[::7]] = np.nan
    vals = Xp.to_numpy().copy()
    vals[out] = (rng.standard_normal((out.sum(), X.shape[1])) * 1e4).astype(np.float32)
    vals[np.flatnonzero(out)[::5], 0] = np.inf
    # a perfect 'leak' outside train: the poisoned y copied into a feature (the screen sees train rows only)
    Xp = pd.DataFrame(vals, columns=X.columns).assign(f01=lambda d: np.where(out, yp, d['f01']).astype(np.float32))
    got = select_on_train(Xp, yp, split, ts, sym, n_features=8, seed=11, **FAST)
    assert got.features == base.features
    pd.testing.assert_frame_equal(got.importance.table, base.importance.table)
    pd.testing.assert_frame_equal(got.screen, base.screen)


def test_same_seed_same_selection(panel, base):
    X, y, ts, sym, split = panel
    again = select_on_train(X, y, split, ts, sym, n_features=8, seed=11, **FAST)
    assert again.features == base.features
    pd.testing.assert_frame_equal(again.importance.fold_gain, base.importance.fold_gain)
    pd.testing.assert_frame_equal(again.table, base.table)


def test_fewer_usable_than_requested_completes_and_says_so(base):
    imp = base.importance
    n_real = len(imp.table) - len(imp.controls)
    sel = select_features(imp, n_features=50, min_importance=0.02, max_corr=None)
    assert 0 < sel.n_selected < 50 and sel.n_selected == len(sel.features) == len(sel.table)
    assert sel.message.startswith(f'Selected only {sel.n_selected} of the 50 features asked for')
    assert f'of {n_real} candidate features' in sel.message
    assert (sel.table['gain'] >= 0.02).all()
    assert sel.dropped['kind'].eq('min_importance').sum() == n_real - sel.n_selected
    assert sel.to_dict()['n_selected'] == sel.n_selected
    with pytest.raises(PipelineError, match='No feature passed'):
        select_features(imp, n_features=5, min_importance=0.99, max_corr=None)


def test_max_corr_drops_near_duplicate(panel, base):
    Xtr = _train(panel)[0]
    imp = base.importance
    both = select_features(imp, n_features=10, max_corr=None)
    assert {'f00', 'f00_dup'} <= set(both.features)          # without the filter both near-copies are kept
    one = select_features(imp, n_features=10, max_corr=0.95, X=Xtr)
    assert len({'f00', 'f00_dup'} & set(one.features)) == 1
    loser = ({'f00', 'f00_dup'} - set(one.features)).pop()
    assert one.dropped.at[loser, 'kind'] == 'max_corr' and ({'f00', 'f00_dup'} - {loser}).pop() in one.dropped.at[loser, 'reason']
    assert one.n_selected == 10
    with pytest.raises(PipelineError, match='needs the training rows X'):
        select_features(imp, n_features=10, max_corr=0.95)


def test_leakage_screen_flags_target_plus_noise(panel):
    X, y, ts, sym = _train(panel)
    rng = np.random.default_rng(0)
    Xl = X.assign(leaky_feat=(y + 0.3 * rng.standard_normal(len(y))).astype(np.float32))
    screen = leakage_screen(Xl, y, ts)
    assert screen.loc['leaky_feat', 'flagged'] and screen['flagged'].sum() == 1
    assert 'threshold 0.3' in screen.loc['leaky_feat', 'reason']
    with pytest.raises(LeakageError) as e:
        check_leakage(screen)
    assert e.value.columns == ['leaky_feat'] and 'leaky_feat' in str(e.value) and 'phase1.leakage.allow' in str(e.value)
    assert check_leakage(screen, allow=['leaky_feat']) == ['leaky_feat']
    # the threshold off (path targets): nothing flagged; an oracle IC still catches a feature beating it
    assert not leakage_screen(Xl, y, ts, threshold=None)['flagged'].any()
    by_oracle = leakage_screen(Xl, y, ts, threshold=None, oracle_ic=0.2)
    assert set(by_oracle.index[by_oracle['flagged']]) == {'leaky_feat'} | set(by_oracle.index[by_oracle['ic'].abs() > 0.2])
    # and select_on_train stops on it, naming it
    split = pd.Series('train', index=Xl.index)
    with pytest.raises(LeakageError, match='leaky_feat'):
        select_on_train(Xl, y, split, ts, sym, n_features=3, **FAST)


def test_feature_ic_matches_reference_with_missing_values():
    rng = np.random.default_rng(5)
    n = 3000
    ts = pd.Series(pd.date_range('2024-01-02', periods=n, freq='37min'))
    y = rng.standard_normal(n)
    y[::11] = np.nan
    X = pd.DataFrame({'a': y * 0.3 + rng.standard_normal(n), 'b': rng.standard_normal(n) * 1e4 + 1e6,
                      'const': np.ones(n)}).astype(np.float32)
    X.loc[::13, 'a'] = np.nan
    got = feature_ic(X, y, ts)
    for c in ('a', 'b'):
        m = np.isfinite(X[c].to_numpy()) & np.isfinite(y)
        r, se = pearson_with_se(X[c].to_numpy(float)[m], y[m], block_labels(ts[m]))
        assert got.at[c, 'ic'] == pytest.approx(r, abs=1e-6) and got.at[c, 'ic_se'] == pytest.approx(se, rel=1e-4)
        assert got.at[c, 'n'] == m.sum()
    assert np.isnan(got.at['const', 'ic'])   # a constant feature has no IC (and is never flagged)
    assert not leakage_screen(X, y, ts, threshold=0.001).at['const', 'flagged']


def test_noise_controls_never_selected(base):
    imp = base.importance
    # forge an importance table where a control has the top gain: it must still be skipped
    t = imp.table.copy()
    t.loc['noise_iid_0', 'gain'] = 10.0
    forged = ImportanceResult(table=t, fold_gain=imp.fold_gain, fold_shap=imp.fold_shap, folds=imp.folds,
                              rank_agreement=imp.rank_agreement, controls=imp.controls)
    sel = select_features(forged, n_features=100, min_importance=0.0, max_corr=None)
    assert not set(sel.features) & set(imp.controls)
    assert sel.n_selected == len(t) - len(imp.controls)
    assert sel.dropped.loc['noise_iid_0', 'kind'] == 'control'
    # names passed in `exclude` are treated as controls too
    sel2 = select_features(imp, n_features=100, min_importance=0.0, max_corr=None, exclude=['f01'])
    assert 'f01' not in sel2.features


def test_noise_controls_are_noise_and_deterministic(panel):
    X = _train(panel)[0]
    Xc, names = add_noise_controls(X, n=6, seed=4)
    assert names == ['noise_iid_0', 'noise_ar1_1', 'noise_shuf_2', 'noise_iid_3', 'noise_ar1_4', 'noise_shuf_5']
    assert Xc.iloc[:, :X.shape[1]].equals(X)
    assert add_noise_controls(X, n=6, seed=4)[0].equals(Xc)
    assert not add_noise_controls(X, n=6, seed=5)[0][names].equals(Xc[names])
    assert Xc['noise_ar1_1'].autocorr() > 0.95
    # a shuffled control keeps a real feature's values but not their order
    src = [c for c in X.columns if np.allclose(np.sort(X[c].to_numpy()), np.sort(Xc['noise_shuf_2'].to_numpy()))]
    assert src and abs(np.corrcoef(Xc['noise_shuf_2'], X[src[0]])[0, 1]) < 0.05
    with pytest.raises(PipelineError, match='already has a column'):
        add_noise_controls(Xc, n=1, seed=0)


def test_explicit_folds_and_row_limits(panel):
    X, y, ts, sym = _train(panel)
    n = len(X)
    folds = [(np.arange(0, n // 2), np.arange(n // 2 + 100, 3 * n // 4)), (np.arange(0, 3 * n // 4), np.arange(3 * n // 4 + 100, n))]
    imp = feature_importance(X, y, folds=folds, max_rows=5000, num_threads=1, shap_sample=500)
    assert imp.folds['n_train'].tolist() == [5000, 5000] and imp.shap_values.shape == (500, X.shape[1])
    with pytest.raises(PipelineError, match='outside'):
        feature_importance(X, y, folds=[(np.arange(10), np.arange(n, n + 5))], num_threads=1)


def test_selection_params_from_config():
    p = selection_params({'phase1': {'n_features': 7, 'max_corr': None, 'leakage': {'allow': ['x']},
                                     'importance': {'n_folds': 4}}})
    assert (p['n_features'], p['max_corr'], p['allow'], p['n_folds'], p['leakage_threshold']) == (7, None, ['x'], 4, 0.3)
    assert selection_params({}, path_target=True)['leakage_threshold'] is None
