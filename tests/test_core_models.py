"""Unit tests of pipeline_lib.models.tabular, .multitask and .ensemble on small synthetic data: ensemble weights, NaN masking and censoring in the
multi-task loss, LightGBM determinism, scaling, ridge, the paired IC difference."""
from __future__ import annotations

import io
import math

import joblib
import numpy as np
import pandas as pd
import pytest
import torch

from pipeline_lib.core.config import PipelineError
from pipeline_lib.models.multitask import MultiTaskLoss, MultiTaskModel, MultiTaskNet, censored_mse
from pipeline_lib.models.ensemble import day_blocks, fit_ensemble, simplex_weights
from pipeline_lib.models.tabular import TabularScaler, fit_lgbm, fit_ridge, mean_ci, paired_ic_difference


def _panel(n=6000, seed=0, signal=0.3):
    "Features, a linear-ish target, and timestamps over several days (rows in time order)."
    rng = np.random.default_rng(seed)
    X = pd.DataFrame(rng.standard_normal((n, 6)).astype(np.float32), columns=[f'x{i}' for i in range(6)])
    y = signal * X['x0'].to_numpy(float) - 0.5 * signal * X['x1'].to_numpy(float) + rng.standard_normal(n)
    ts = pd.Timestamp('2024-01-02 09:30') + pd.to_timedelta(np.arange(n) // 400, unit='D') + pd.to_timedelta(np.arange(n) % 400, unit='min')
    return X, pd.Series(y), pd.Series(ts)


# ---- ensemble -------------------------------------------------------------------------------------------------

def test_simplex_weights_recover_a_known_mix():
    rng = np.random.default_rng(3)
    P = rng.standard_normal((4000, 3))
    y = 0.6 * P[:, 0] + 0.4 * P[:, 2] + 0.1 * rng.standard_normal(4000)
    w = simplex_weights(P, y)
    assert (w >= 0).all() and math.isclose(w.sum(), 1.0, abs_tol=1e-12)
    assert np.allclose(w, [0.6, 0.0, 0.4], atol=0.02)


def test_simplex_weights_stay_non_negative_when_least_squares_wants_a_short():
    rng = np.random.default_rng(4)
    P = rng.standard_normal((3000, 3))
    y = P[:, 0] - 0.8 * P[:, 1]          # the unconstrained optimum has a negative weight on member 1
    w = simplex_weights(P, y)
    assert (w >= 0).all() and math.isclose(w.sum(), 1.0, abs_tol=1e-12) and w[1] == 0.0


def test_ensemble_ignores_rows_with_a_missing_member_and_predicts_the_mix():
    rng = np.random.default_rng(5)
    P = pd.DataFrame(rng.standard_normal((3000, 2)), columns=['a', 'b'])
    y = 0.3 * P['a'] + 0.7 * P['b']
    P.loc[:99, 'a'] = np.nan
    e = fit_ensemble(P, y.to_numpy(), target='t')
    assert e.n_fit == 2900 and np.allclose(e.weights, [0.3, 0.7], atol=1e-6)
    assert np.allclose(e.predict(P.iloc[200:210]), (0.3 * P['a'] + 0.7 * P['b']).iloc[200:210])
    with pytest.raises(PipelineError): e.predict({'a': [1.0]})


def test_day_blocks_are_contiguous_whole_days_in_time_order():
    _, _, ts = _panel(n=4000)                       # 10 days of 400 rows
    shuffled = ts.sample(frac=1.0, random_state=0)  # row order must not matter
    b = day_blocks(shuffled.to_numpy(), 4)
    day = pd.DatetimeIndex(shuffled).normalize()
    assert sorted(set(b)) == [0, 1, 2, 3]
    per_day = pd.Series(b).groupby(day).nunique()
    assert (per_day == 1).all()                     # a day never straddles two blocks
    first = pd.Series(b).groupby(day).first().sort_index().to_numpy()
    assert (np.diff(first) >= 0).all()              # blocks follow time
    one_day = ts[:300].to_numpy()                   # a single day: its timestamps are cut instead
    assert sorted(set(day_blocks(one_day, 3))) == [0, 1, 2] and (np.diff(day_blocks(one_day, 3)) >= 0).all()


# ---- multi-task network -----------------------------------------------------------------------------------------

def test_multitask_loss_masks_nan_targets_exactly():
    torch.manual_seed(0)
    net = MultiTaskNet(4, ['a', 'b'], hidden=(8,), dropout=0.0).eval()
    x = torch.randn(10, 4, requires_grad=True)
    out = net(x)
    ya = torch.randn(10); ya[[1, 4, 7]] = float('nan')
    yb = torch.full((10,), float('nan'))                      # a head with no finite target in the batch
    parts = MultiTaskLoss(net)(out, {'a': ya, 'b': yb})
    ok = torch.isfinite(ya)
    assert torch.allclose(parts['a'], ((out['a'][ok] - ya[ok]) ** 2).mean())
    assert float(parts['b'].detach()) == 0.0 and torch.isfinite(parts['loss'])
    parts['loss'].backward()
    assert float(x.grad[~ok].abs().sum()) == 0.0 and float(x.grad[ok].abs().sum()) > 0


def test_censored_tth_is_a_one_sided_penalty():
    p = torch.tensor([40.0, 20.0, 10.0, 5.0, 0.0])
    t = torch.tensor([30.0, 30.0, 12.0, float('nan'), 3.0])
    c = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0])
    # censored at 30: a prediction of 40 is free, 20 costs 10^2; uncensored rows: squared error; NaN masked
    assert math.isclose(float(censored_mse(p, t, c)), (0 + 100 + 4 + 9) / 4, rel_tol=1e-6)


@pytest.mark.slow
def test_multitask_fits_with_nan_targets_and_round_trips_a_pickle():
    X, y, _ = _panel(3000)
    rng = np.random.default_rng(1)
    Y = pd.DataFrame({'ret': y, 'mdd': 0.5 * X['x2'].to_numpy(float) - 1 + 0.1 * rng.standard_normal(len(X)),
                      'tth': np.minimum(rng.integers(1, 40, len(X)), 30).astype(float)})
    Y.loc[rng.random(len(Y)) < 0.3, 'ret'] = np.nan          # 30% of one head missing
    Y.loc[:500, 'mdd'] = np.nan
    cens = (Y['tth'] >= 30).to_numpy()
    m = MultiTaskModel(['ret', 'mdd', 'tth'], hidden=(16,), lr=3e-3, epochs=4, patience=None, batch_size=256, seed=0)
    m.fit(X.iloc[:2000], Y.iloc[:2000], X.iloc[2000:], Y.iloc[2000:], cens[:2000], cens[2000:])
    h = m.history_
    assert np.isfinite(h[['train_loss', 'valid_loss', 'train_ret', 'valid_mdd']].to_numpy()).all()
    assert m.y_mean_['ret'] == pytest.approx(np.nanmean(Y['ret'].iloc[:2000]))   # statistics of finite training targets
    pred = m.predict(X.iloc[2000:])
    assert list(pred.columns) == ['ret', 'mdd', 'tth'] and np.isfinite(pred.to_numpy()).all()
    assert pred['mdd'].corr(Y['mdd'].iloc[2000:]) > 0.3                           # the easy head learned something
    buf = io.BytesIO(); joblib.dump(m, buf); buf.seek(0)
    assert np.array_equal(joblib.load(buf).predict(X.iloc[2000:]).to_numpy(), pred.to_numpy())


def test_multitask_on_row_positions_is_the_model_on_a_copy_of_the_rows():
    """Phase 2 hands the network every row (the mapped store) with the training and validation rows' positions
    instead of copies of them: the same scaler, the same training, the same predictions, bit for bit."""
    X, y, _ = _panel(3000)
    X = X.assign(regime=np.random.default_rng(3).integers(0, 3, len(X)).astype(float))
    Y = pd.DataFrame({'ret': y, 'vol': X['x1'].abs().to_numpy(float)})
    tr, va = np.r_[0:1200, 1500:2200], np.arange(2400, 3000)            # not one contiguous slice, as split rows need not be
    kw = dict(hidden=(16,), lr=3e-3, epochs=3, patience=None, batch_size=256, censored_head=None, categorical=['regime'], seed=0)
    a = MultiTaskModel(['ret', 'vol'], **kw).fit(X.iloc[tr], Y.iloc[tr], X.iloc[va], Y.iloc[va])
    b = MultiTaskModel(['ret', 'vol'], **kw).fit(X, Y.iloc[tr], X, Y.iloc[va], train_rows=tr, valid_rows=va)
    assert np.array_equal(a.scaler_.mean_, b.scaler_.mean_) and a.scaler_.levels_ == b.scaler_.levels_
    assert not np.array_equal(b.scaler_.mean_, TabularScaler(['regime']).fit(X).mean_)   # statistics of those rows only
    pd.testing.assert_frame_equal(a.history_.drop(columns='seconds', errors='ignore'), b.history_.drop(columns='seconds', errors='ignore'))
    assert np.array_equal(a.predict(X).to_numpy(), b.predict(X).to_numpy())


def test_multitask_uncertainty_weights_are_learned():
    X, y, _ = _panel(2000)
    Y = pd.DataFrame({'a': y, 'b': X['x3'].to_numpy(float) * 3})
    m = MultiTaskModel(['a', 'b'], hidden=(16,), lr=1e-2, epochs=5, patience=None, loss_weights='uncertainty',
                       censored_head=None, seed=0).fit(X.iloc[:1500], Y.iloc[:1500], X.iloc[1500:], Y.iloc[1500:])
    w = m.head_weights_
    assert set(w) == {'a', 'b'} and w['b'] > w['a'] > 0   # the predictable head gets the larger weight


# ---- LightGBM ---------------------------------------------------------------------------------------------------

def test_lightgbm_is_deterministic_per_seed():
    X, y, _ = _panel()
    tr, va = slice(0, 4000), slice(4000, 6000)
    a = fit_lgbm(X.iloc[tr], y.iloc[tr], X.iloc[va], y.iloc[va], seed=7)
    b = fit_lgbm(X.iloc[tr], y.iloc[tr], X.iloc[va], y.iloc[va], seed=7)
    c = fit_lgbm(X.iloc[tr], y.iloc[tr], X.iloc[va], y.iloc[va], seed=8)
    assert np.array_equal(a.predict(X.iloc[va]), b.predict(X.iloc[va]))
    assert a.evals_result == b.evals_result
    assert not np.array_equal(a.predict(X.iloc[va]), c.predict(X.iloc[va]))   # bagging/column sampling follow the seed


def test_lightgbm_drops_nan_targets_and_records_both_curves():
    X, y, _ = _panel()
    y = y.copy(); y.iloc[:500] = np.nan
    f = fit_lgbm(X.iloc[:4000], y.iloc[:4000], X.iloc[4000:], y.iloc[4000:], params={'n_estimators': 300})
    assert f.n_train == 3500 and f.n_valid == 2000
    assert set(f.evals_result) == {'train', 'valid'}
    assert len(f.evals_result['train']['l2']) == len(f.evals_result['valid']['l2']) == f.n_iterations
    assert 1 <= f.best_iteration <= f.n_iterations
    assert f.best_iteration == int(np.argmin(f.evals_result['valid']['l2'])) + 1   # stopped on the validation rows
    assert f.importance().index[0] in ('x0', 'x1')
    sv, sd, base = f.shap_values(X.iloc[4000:], max_rows=300)
    assert sv.shape == (300, 6) and np.allclose(sv.sum(axis=1) + base, f.predict(sd.reset_index(drop=True)), atol=1e-6)
    with pytest.raises(PipelineError): f.predict(X.drop(columns='x3'))


def test_lightgbm_without_validation_trains_a_fixed_number_of_trees():
    X, y, _ = _panel(2000)
    f = fit_lgbm(X, y, params={'n_estimators': 17})
    assert f.n_iterations == 17 and f.n_valid == 0


# ---- scaling, ridge, statistics ----------------------------------------------------------------------------------

def test_tabular_scaler_uses_training_statistics_only():
    tr = pd.DataFrame({'a': [0.0, 2.0, np.nan], 'regime': [0.0, 1.0, 1.0]})
    sc = TabularScaler(categorical=['regime']).fit(tr)
    Z = sc.transform(pd.DataFrame({'a': [1.0, 101.0, np.nan], 'regime': [1.0, 3.0, 0.0]}))
    assert Z[0, 0] == 0.0 and Z[1, 0] == pytest.approx(8.0)      # mean 1, sd 1 from train; 100 sd clipped at 8
    assert Z[2, 0] == 0.0                                        # missing input -> the training mean
    assert Z[1, 1:].tolist() == [0.0, 0.0] and Z[2, 1:].tolist() == [1.0, 0.0]   # unseen regime 3 -> no level


def test_ridge_chooses_its_penalty_on_validation_rows():
    X, y, _ = _panel(4000, signal=0.5)
    r = fit_ridge(X.iloc[:3000], y.iloc[:3000], X.iloc[3000:], y.iloc[3000:], alphas=(1.0, 1e7))
    assert r.alpha == 1.0 and r.valid_mse[1.0] < r.valid_mse[1e7]
    assert np.corrcoef(r.predict(X.iloc[3000:]), y.iloc[3000:])[0, 1] > 0.2
    with pytest.raises(PipelineError): fit_ridge(X, y, alphas=(1.0, 2.0))   # no validation rows: one alpha only


def test_paired_ic_difference():
    X, y, ts = _panel(4000)
    a = X['x0'].to_numpy(float)
    same = paired_ic_difference(y, a, a, ts)
    assert same['diff'] == 0.0 and same['se'] == 0.0 and same['n_blocks'] == 10
    b = X['x4'].to_numpy(float)                                  # an uninformative predictor
    d = paired_ic_difference(y, a, b, ts)
    assert d['diff'] == pytest.approx(d['ic_a'] - d['ic_b']) and d['se'] > 0 and d['t'] > 3
    back = paired_ic_difference(y, b, a, ts)
    assert back['diff'] == pytest.approx(-d['diff']) and back['se'] == pytest.approx(d['se'])


def test_mean_ci():
    ci = mean_ci([0.01, 0.03, None, float('nan'), 0.05])
    assert ci['n'] == 3 and ci['mean'] == pytest.approx(0.03) and ci['lo'] < 0.03 < ci['hi']
    assert mean_ci([0.02])['se'] is None and mean_ci([])['mean'] is None
