import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from pipeline_lib.core.config import PipelineError
from pipeline_lib.data.load import DataError
from pipeline_lib.evaluation.metrics import (METRIC_KEYS, backtest, bars_per_year, block_labels, evaluate, evaluate_splits,
                                  json_safe, se_simulation)
from synthetic import close_walk, session_grid


def _panel(n_symbols=4, n_days=3, bars_per_day=30, seed=0):
    "A small hand-made panel: n_symbols per timestamp, y and a correlated prediction."
    rng = np.random.default_rng(seed)
    ts = session_grid(n_days, bars_per_day)
    n = len(ts) * n_symbols
    y = rng.normal(size=n)
    p = 0.4 * y + rng.normal(size=n)
    return pd.DataFrame({'timestamp': np.repeat(ts, n_symbols), 'symbol': np.tile([f'S{i}' for i in range(n_symbols)], len(ts)),
                         'y': y, 'p': p})


def _no_nan(d):
    return all(v is None or isinstance(v, int) or (isinstance(v, float) and math.isfinite(v)) for v in d.values())


# ---------------------------------------------------------------- evaluate against direct computation

def test_metrics_match_direct_computation():
    d = _panel()
    d.loc[5, 'y'] = np.nan; d.loc[17, 'p'] = np.nan
    d.loc[[20, 21], 'p'] = 0.0; d.loc[22, 'y'] = 0.0               # zeros are excluded from the hit rate
    res = evaluate(d['y'], d['p'], d['timestamp'], d['symbol'])
    k = d[['y', 'p']].notna().all(axis=1)
    y, p = d.loc[k, 'y'].to_numpy(), d.loc[k, 'p'].to_numpy()
    assert res['n'] == len(d) - 2
    assert res['ic'] == pytest.approx(sps.pearsonr(y, p)[0], abs=1e-12)
    assert res['rank_ic'] == pytest.approx(sps.spearmanr(y, p)[0], abs=1e-12)
    assert res['r2'] == pytest.approx(1 - ((y - p)**2).sum() / ((y - y.mean())**2).sum(), abs=1e-12)
    nz = (y != 0) & (p != 0)
    assert nz.sum() == len(y) - 3
    assert res['hit_rate'] == pytest.approx((np.sign(y[nz]) == np.sign(p[nz])).mean(), abs=1e-12)
    # cross-sectional rank IC: mean of per-timestamp Spearman over timestamps with >= 3 symbols
    cs = [sps.spearmanr(g['y'], g['p'])[0] for _, g in d[k].groupby('timestamp') if len(g) >= 3]
    assert res['cs_rank_ic'] == pytest.approx(np.mean(cs), abs=1e-12)
    assert set(res) == set(METRIC_KEYS) and _no_nan(res)


def test_ic_se_is_the_delete_a_day_jackknife():
    d = _panel(n_days=6)
    res = evaluate(d['y'], d['p'], d['timestamp'], d['symbol'])
    day = d['timestamp'].dt.normalize()
    loo = np.array([np.corrcoef(d.loc[day != t, 'y'], d.loc[day != t, 'p'])[0, 1] for t in day.unique()])
    G = len(loo)
    assert G == 6
    assert res['ic_se'] == pytest.approx(math.sqrt((G - 1) / G * ((loo - loo.mean())**2).sum()), rel=1e-10)


def test_cs_rank_ic_t_equals_per_day_mean_t_when_days_are_equal():
    d = _panel(n_days=5, n_symbols=5)
    res = evaluate(d['y'], d['p'], d['timestamp'], d['symbol'])
    per_ts = d.groupby('timestamp').apply(lambda g: sps.spearmanr(g['y'], g['p'])[0])
    per_day = per_ts.groupby(per_ts.index.normalize()).mean()
    t = per_day.mean() / (per_day.std(ddof=1) / math.sqrt(len(per_day)))
    assert res['cs_rank_ic'] == pytest.approx(per_ts.mean(), abs=1e-12)
    assert res['cs_rank_ic_t'] == pytest.approx(t, rel=1e-10)


def test_cross_section_needs_three_symbols():
    d = _panel(n_symbols=4)
    # drop two symbols on the first 10 timestamps: those have 2 symbols and must not count
    first = d['timestamp'].isin(d['timestamp'].unique()[:10]) & d['symbol'].isin(['S2', 'S3'])
    e = d[~first]
    res = evaluate(e['y'], e['p'], e['timestamp'], e['symbol'])
    cs = [sps.spearmanr(g['y'], g['p'])[0] for _, g in e.groupby('timestamp') if len(g) >= 3]
    assert len(cs) == d['timestamp'].nunique() - 10
    assert res['cs_rank_ic'] == pytest.approx(np.mean(cs), abs=1e-12)
    strict = evaluate(e['y'], e['p'], e['timestamp'], e['symbol'], min_cross_section=5)
    assert strict['cs_rank_ic'] is None and strict['cs_rank_ic_t'] is None and strict['ic'] == res['ic']


def test_undefined_cases_are_none_never_nan():
    d = _panel()
    const = evaluate(d['y'], np.full(len(d), 0.3), d['timestamp'], d['symbol'])
    assert const['ic'] is None and const['rank_ic'] is None and const['ic_se'] is None and const['cs_rank_ic'] is None
    assert const['r2'] is not None and const['hit_rate'] is not None
    one_day = d[d['timestamp'].dt.normalize() == d['timestamp'].iloc[0].normalize()]
    r = evaluate(one_day['y'], one_day['p'], one_day['timestamp'], one_day['symbol'])
    assert r['ic'] is not None and r['ic_se'] is None and r['cs_rank_ic'] is not None and r['cs_rank_ic_t'] is None
    no_sym = evaluate(d['y'], d['p'], d['timestamp'])
    assert no_sym['cs_rank_ic'] is None and no_sym['ic_se'] is not None
    single = d[d['symbol'] == 'S0']
    r = evaluate(single['y'], single['p'], single['timestamp'], single['symbol'])
    assert r['cs_rank_ic'] is None and r['ic'] is not None
    all_nan = evaluate(np.full(len(d), np.nan), d['p'], d['timestamp'], d['symbol'])
    assert all_nan == {**dict.fromkeys(METRIC_KEYS), 'n': 0}
    assert evaluate([], [], pd.DatetimeIndex([]))['n'] == 0
    zeros = evaluate(np.zeros(len(d)), d['p'], d['timestamp'])
    assert zeros['r2'] is None and zeros['hit_rate'] is None and zeros['ic'] is None
    for res in (const, r, no_sym, all_nan, zeros):
        assert _no_nan(res)
        json.dumps(res, allow_nan=False)


def test_bad_input_raises():
    d = _panel()
    with pytest.raises(PipelineError, match='same length'):
        evaluate(d['y'], d['p'][:-1], d['timestamp'])
    dup = pd.concat([d, d.iloc[[3]]], ignore_index=True)
    for sym in (dup['symbol'], dup['symbol'].to_numpy()):   # a Series (as evaluate_splits passes it) or an array
        with pytest.raises(DataError, match='Duplicate') as e:
            evaluate(dup['y'], dup['p'], dup['timestamp'], sym)
        assert (e.value.symbol, e.value.row) == (d['symbol'].iloc[3], len(d))
    ts = d['timestamp'].copy(); ts.iloc[2] = pd.NaT
    with pytest.raises(DataError, match='row 2'):
        evaluate(d['y'], d['p'], ts)


def test_blocks_for_daily_bars():
    two_years = pd.bdate_range('2022-01-03', periods=500)
    assert block_labels(two_years).max() + 1 == two_years.to_period('M').nunique()
    quarter = two_years[:63]
    assert block_labels(quarter).max() + 1 == quarter.to_period('W').nunique()
    assert (block_labels(quarter, 'M') == pd.factorize(quarter.to_period('M'))[0]).all()
    intraday = session_grid(3, 10)
    assert block_labels(intraday).tolist() == [0] * 10 + [1] * 10 + [2] * 10


def test_evaluate_splits_scores_each_split():
    d = _panel(n_days=6)
    d['split'] = np.select([d.index < 200, d.index < 260, d.index < 300], ['train', 'gap', 'valid'], 'test')
    out = evaluate_splits(d, 'p', 'y')
    assert list(out) == ['train', 'valid', 'test']
    for s in out:
        sub = d[d['split'] == s]
        assert out[s] == evaluate(sub['y'], sub['p'], sub['timestamp'], sub['symbol'])
    assert out['train']['n'] == 200 and out['valid']['n'] == 40
    with pytest.raises(DataError, match="'nope'"):
        evaluate_splits(d, 'nope', 'y')


def test_json_safe():
    obj = {'a': np.float32('nan'), 'b': [np.int64(3), np.inf, -np.inf, np.array([1.5, np.nan])], 1: np.bool_(True),
           'c': {'d': (np.float64(2.5), None, pd.NaT)}, 'e': pd.Timestamp('2024-01-02 09:30'), 'f': 'x'}
    out = json_safe(obj)
    assert out == {'a': None, 'b': [3, None, None, [1.5, None]], '1': True, 'c': {'d': [2.5, None, None]},
                   'e': '2024-01-02T09:30:00', 'f': 'x'}
    assert type(out['b'][0]) is int and type(out['c']['d'][0]) is float and type(out['1']) is bool
    json.dumps(out, allow_nan=False)
    with pytest.raises(PipelineError):
        json_safe({'x': object()})


# ---------------------------------------------------------------- standard errors against a simulation

@pytest.mark.slow
def test_day_block_se_matches_the_spread_across_replicates():
    # Null panels: 1-minute iid returns with a market factor, target = 5-bar forward sum (overlapping rows),
    # prediction = independent persistent noise with a common component. True IC = 0.
    sim = se_simulation(n_reps=120, seed=1)
    emp = sim['ic'].std()
    reported = math.sqrt((sim['ic_se']**2).mean())
    naive = sim['naive_se'].mean()
    assert 0.75 * emp < reported < 1.3 * emp, (emp, reported, naive)
    assert naive < 0.5 * emp, (emp, naive)                          # naive 1/sqrt(n) is clearly too small
    # the cross-sectional t-stat is honest too: about unit spread under the null
    assert 0.75 < sim['cs_rank_ic_t'].std() < 1.35
    assert abs(sim['cs_rank_ic_t'].mean()) < 0.35


# ---------------------------------------------------------------- backtest

def _shifted_log_close(bars, k):
    "log close k bars ahead within (symbol, day); NaN past the day's end."
    g = bars.groupby([bars['symbol'], bars['timestamp'].dt.normalize()])['close']
    return np.log(g.shift(-k))


def _tstat(x):
    x = np.asarray(x)
    return x.mean() / (x.std(ddof=1) / math.sqrt(len(x)))


def test_backtest_hand_computed_single_symbol():
    bars = pd.DataFrame({'symbol': 'A', 'timestamp': pd.date_range('2024-01-02 09:30', periods=8, freq='min'),
                         'close': [100., 110, 110, 121, 121, 110, 99, 99]})
    bt = backtest(bars, [1, 9, -1, 9, 1, 9, 9, 9], horizon=2, cost_bps=10)
    P = bars['close'].to_numpy()
    # signals at bars 0, 2, 4 -> entries at 1, 3, 5 -> exits at 3, 5, 7 (the session's last bar)
    assert bt.weights['A'].tolist() == [0, 1, 1, -1, -1, 1, 1, 0]
    expect_bar = np.zeros(8)
    expect_bar[2:4] = np.diff(P[1:4]) / P[1]
    expect_bar[4:6] = -np.diff(P[3:6]) / P[3]
    expect_bar[6:8] = np.diff(P[5:8]) / P[5]
    np.testing.assert_allclose(bt.pnl_gross.to_numpy(), expect_bar, atol=1e-15)
    assert bt.stats['gross_total_return'] == pytest.approx((P[3]/P[1] - 1) - (P[5]/P[3] - 1) + (P[7]/P[5] - 1), abs=1e-14)
    assert bt.stats['turnover'] == 6 and bt.stats['n_rebalances'] == 3 and bt.stats['mode'] == 'sign'
    assert bt.trades['entry_time'].tolist() == list(bars['timestamp'].iloc[[1, 3, 5]])


def test_perfect_foresight_earns_and_look_ahead_signals_do_not():
    bars = close_walk()
    h = 5
    lc = np.log(bars['close'])
    foresight = (_shifted_log_close(bars, 1 + h) - _shifted_log_close(bars, 1)).fillna(0)   # the held return
    own_bar = (lc - np.log(bars.groupby('symbol')['close'].shift(1))).fillna(0)               # the signal bar's return
    next_bar = (_shifted_log_close(bars, 1) - lc).fillna(0)                                   # needs a trade at t's close
    good = backtest(bars, foresight, horizon=h, cost_bps=0)
    assert good.stats['gross_total_return'] > 0.2 and _tstat(good.trades['gross_return']) > 20
    for sig in (own_bar, next_bar):
        bt = backtest(bars, sig, horizon=h, cost_bps=0)
        assert abs(_tstat(bt.trades['gross_return'])) < 4, bt.stats
        assert bt.stats['gross_total_return'] < 0.1 * good.stats['gross_total_return']
    # teeth: knowing one bar's return is clearly profitable when that bar is held (bar t+2, the first held bar),
    # so a one-bar timing bug would have made next_bar earn like this
    first_held = (_shifted_log_close(bars, 2) - _shifted_log_close(bars, 1)).fillna(0)
    assert _tstat(backtest(bars, first_held, horizon=h, cost_bps=0).trades['gross_return']) > 8


def test_no_position_is_held_over_the_night():
    bpd = 60
    bars = close_walk(overnight=0.05, bars_per_day=bpd)       # huge overnight jumps
    day = bars['timestamp'].dt.normalize()
    g = bars.groupby(['symbol', day])['close']
    last, first = g.last(), g.first()
    # every row knows its symbol's jump from today's close to tomorrow's open: useless if nothing is held overnight
    jump = np.log(first.groupby(level='symbol').shift(-1) / last).fillna(0)
    pred = jump.reindex(pd.MultiIndex.from_arrays([bars['symbol'], day])).to_numpy()
    bt = backtest(bars, pred, horizon=5, cost_bps=0)
    pos = np.arange(len(bt.pnl_gross)) % bpd
    assert (bt.pnl_gross.to_numpy()[pos == 0] == 0).all()          # no P&L from the overnight move
    assert (bt.weights.to_numpy()[pos == bpd - 1] == 0).all()      # flat at each session's last bar
    assert abs(bt.stats['gross_total_return']) < 0.05
    # the same signal held overnight would earn ~0.06 a night: check with a one-session (daily-like) grid
    held = backtest(bars, pred, horizon=5, cost_bps=0, interval='1D')   # daily: one session
    assert held.stats['gross_total_return'] > 0.2


def test_costs_reduce_returns_by_cost_times_turnover():
    bars = close_walk(n_days=4)
    pred = np.random.default_rng(1).normal(size=len(bars))
    a = backtest(bars, pred, horizon=5, cost_bps=0.0)
    b = backtest(bars, pred, horizon=5, cost_bps=2.5)
    to = b.stats['turnover']
    W = b.weights.to_numpy()
    assert to == pytest.approx(np.abs(np.diff(np.vstack([np.zeros(W.shape[1]), W]), axis=0)).sum(), rel=1e-12)
    assert a.stats['total_return'] == a.stats['gross_total_return'] == b.stats['gross_total_return']
    assert b.stats['gross_total_return'] - b.stats['total_return'] == pytest.approx(2.5e-4 * to, rel=1e-10)
    np.testing.assert_allclose(b.pnl_gross - b.pnl, 2.5e-4 * b.turnover, atol=1e-15)
    assert b.equity.iloc[-1] == pytest.approx(1 + b.stats['total_return'], abs=1e-12)


def test_positions_change_only_every_h_bars_and_are_dollar_neutral():
    h, bpd = 7, 60
    bars = close_walk(n_days=3, bars_per_day=bpd)
    pred = np.random.default_rng(2).normal(size=len(bars))
    bt = backtest(bars, pred, horizon=h, cost_bps=1.0, quantile=0.2)
    W = bt.weights.to_numpy()
    pos = np.arange(len(W)) % bpd                       # position of each bar in its session
    changed = np.r_[np.abs(W[0]).sum() > 0, np.abs(np.diff(W, axis=0)).sum(1) > 0]
    assert changed.any()
    assert np.all(((pos[changed] - 1) % h == 0) | (pos[changed] == bpd - 1))
    held = (bt.trades['exit_time'] - bt.trades['entry_time']) / pd.Timedelta('1min')
    last_of_day = bt.trades['exit_time'].dt.time == pd.Timestamp('10:29').time()
    assert (held[~last_of_day] == h).all() and (held[last_of_day] <= h).all()
    assert np.allclose(W.sum(1), 0)                     # dollar-neutral
    gross = np.abs(W).sum(1)
    assert np.allclose(gross[gross > 0], 1.0)
    assert ((W > 0).sum(1)[gross > 0] == 2).all()      # 10 symbols, quantile 0.2 -> 2 per leg
    assert bt.stats['n_rebalances'] == 3 * len(range(0, bpd - 2, h))


def test_sharpe_annualisation_for_minute_and_daily_bars():
    ts = session_grid(3, 390)
    assert bars_per_year(ts) == 390 * 252
    bars = close_walk(n_symbols=3, n_days=3, bars_per_day=390)
    bt = backtest(bars, np.random.default_rng(3).normal(size=len(bars)), horizon=5)
    pnl = bt.pnl.to_numpy()
    assert bt.stats['bars_per_year'] == 98280
    assert bt.stats['sharpe'] == pytest.approx(pnl.mean() / pnl.std(ddof=1) * math.sqrt(98280), rel=1e-10)
    assert bt.stats['annual_return'] == pytest.approx(pnl.mean() * 98280, rel=1e-10)
    # daily bars: 252 per year, one symbol -> trade the sign
    rng = np.random.default_rng(4)
    days = pd.bdate_range('2023-01-02', periods=300)
    daily = pd.DataFrame({'symbol': 'X', 'timestamp': days, 'close': 100 * np.exp(np.cumsum(0.01 * rng.normal(size=300)))})
    bd = backtest(daily, rng.normal(size=300), horizon=5)
    pnl = bd.pnl.to_numpy()
    assert bd.stats['bars_per_year'] == 252 and bd.stats['mode'] == 'sign'
    assert bd.stats['sharpe'] == pytest.approx(pnl.mean() / pnl.std(ddof=1) * math.sqrt(252), rel=1e-10)
    assert bd.stats['n_rebalances'] == len(range(0, 298, 5))   # daily bars: one session, no overnight flattening
    json.dumps(bd.summary(), allow_nan=False)


def test_backtest_bad_input():
    bars = close_walk(n_symbols=2, n_days=1)
    with pytest.raises(DataError, match="'close'"):
        backtest(bars.drop(columns='close'), np.zeros(len(bars)))
    with pytest.raises(PipelineError, match='rows'):
        backtest(bars, np.zeros(3))
    with pytest.raises(PipelineError, match='quantile'):
        backtest(bars, np.zeros(len(bars)), quantile=0.7)
