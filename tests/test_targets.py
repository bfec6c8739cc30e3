"""Targets against a plain-Python reference written from the definition (DESIGN section 4), plus edge cases built on purpose."""
import math
import statistics

import numpy as np
import pandas as pd
import pytest

from pipeline_lib.core.config import PipelineError
from pipeline_lib.data.load import DataError
from pipeline_lib.data.targets import (PATH_TARGETS, barrier_sigma, build_targets, demean_by_timestamp, demean_fallback_rows,
                                  demean_returns, fitting_targets, max_horizon, target_horizon_bars, target_names)
from synthetic import ohlc_walk, ragged_bars, realistic_bars

PATH_COLS = ['mfe', 'mdd', 'tth', 'tth_side']


# ---------------------------------------------------------------- reference, straight from the definition
def ref_sessions(bars, max_gap_bars):
    "Session number per row: new at each symbol, and for intraday bars at each new date or after a gap > max_gap_bars bars."
    sym, ts = bars['symbol'].tolist(), list(bars['timestamp'])
    spacings = {}
    for i in range(1, len(ts)):
        if sym[i] == sym[i - 1]: spacings.setdefault(sym[i], []).append(ts[i] - ts[i - 1])
    medians = {pd.Timedelta(pd.Series(v).median()) for v in spacings.values()}
    assert len(medians) == 1
    interval = medians.pop()
    intraday = interval < pd.Timedelta('1D')
    out, cur = [], -1
    for i in range(len(ts)):
        new = i == 0 or sym[i] != sym[i - 1]
        if intraday and not new:
            new = ts[i].date() != ts[i - 1].date() or ts[i] - ts[i - 1] > max_gap_bars * interval
        cur += new
        out.append(cur)
    return out, interval


def ref_targets(bars, horizons, H, k, W, max_gap_bars):
    sess, interval = ref_sessions(bars, max_gap_bars)
    sym, ts = bars['symbol'].tolist(), list(bars['timestamp'])
    c, hi, lo = bars['close'].tolist(), bars['high'].tolist(), bars['low'].tolist()
    n = len(c)

    def complete(t, h):
        "Rows t..t+h are in one session and, intraday, no bar is missing between them (each one interval after the last)."
        if t + h >= n or sess[t + h] != sess[t]: return False
        return interval >= pd.Timedelta('1D') or all(ts[j] - ts[j - 1] == interval for j in range(t + 1, t + h + 1))

    res = {f'h{h}': [math.nan] * n for h in horizons}
    res.update({name: [math.nan] * n for name in PATH_COLS})
    for t in range(n):
        for h in horizons:  # close[t+h] must be in the same session, exactly h bars of time later
            if complete(t, h):
                res[f'h{h}'][t] = math.log(c[t + h] / c[t])
        # sigma_t: the last W one-bar log returns of this symbol up to t, skipping session-crossing ones
        rets, j = [], t
        while j >= 1 and sym[j - 1] == sym[t] and len(rets) < W:
            if sess[j] == sess[j - 1]: rets.append(math.log(c[j] / c[j - 1]))
            j -= 1
        if len(rets) < W: continue
        sigma = statistics.stdev(rets)
        if not complete(t, H): continue
        up, dn = c[t] * (1 + k * sigma * math.sqrt(H)), c[t] * (1 - k * sigma * math.sqrt(H))
        res['mfe'][t] = max(hi[t + 1:t + H + 1]) / c[t] - 1
        falls = []
        for j in range(t + 1, t + H + 1):
            peak = max([c[t]] + hi[t + 1:j])  # close[t] and EARLIER bars' highs only
            falls.append(lo[j] / peak - 1)
        res['mdd'][t] = min(0.0, min(falls))
        res['tth'][t], res['tth_side'][t] = H, 0
        for j in range(t + 1, t + H + 1):
            touch_up, touch_dn = hi[j] >= up, lo[j] <= dn
            if touch_up or touch_dn:
                res['tth'][t], res['tth_side'][t] = j - t, (-1 if touch_dn else 1)
                break
    return res


def assert_matches_reference(bars, horizons, H, k, W, gap):
    got = build_targets(bars, horizons=horizons, path_horizon=H, barrier_k=k, vol_window=W, max_gap_bars=gap)
    ref = ref_targets(bars, horizons, H, k, W, gap)
    names = target_names(horizons, '1min')
    assert list(got.columns) == names and got.index.equals(bars.index) and (got.dtypes == 'float64').all()
    for h, name in zip(horizons, names):
        np.testing.assert_allclose(got[name], ref[f'h{h}'], rtol=1e-12, atol=1e-15, equal_nan=True, err_msg=name)
    for name in PATH_COLS:
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-10, atol=1e-14, equal_nan=True, err_msg=name)
    return got


@pytest.mark.parametrize('seed,horizons,H,k,W,gap', [
    (0, (5,), 30, 2.0, 60, 15),          # the defaults
    (1, (1, 7, 13), 7, 0.7, 10, 15),     # short windows: many touches of both barriers
    (2, (3, 30), 12, 1.5, 20, 5),        # a small max_gap_bars: the short halts split sessions too
    (3, (2,), 5, 0.3, 4, 15),            # tiny barriers: side -1 from one-bar double touches is common
])
def test_every_target_matches_plain_loop_reference(seed, horizons, H, k, W, gap):
    bars = ragged_bars(seed, missing=0.01)   # few enough holes that H-bar windows without one are common
    got = assert_matches_reference(bars, horizons, H, k, W, gap)
    side = got['tth_side'].dropna()
    assert got['mfe'].notna().sum() > 50 and set(side.unique()) == {-1.0, 0.0, 1.0}  # the data exercises all cases


def test_targets_are_nan_exactly_where_the_horizon_is_incomplete():
    bars = ragged_bars(5)
    sess, _ = ref_sessions(bars, 15)
    # runs: stretches of a session without a missing bar (each bar one minute after the last)
    run = np.cumsum(np.r_[True, (np.diff(sess) != 0) | (np.diff(bars['timestamp'].to_numpy()) != np.timedelta64(1, 'm'))])
    assert len(np.unique(run)) > len(np.unique(sess))          # the data has missing bars inside sessions
    lengths = pd.Series(run).value_counts().sort_index()
    got = build_targets(bars, horizons=(1, 5, 40), path_horizon=30, vol_window=60)
    for h, name in zip((1, 5, 40), target_names((1, 5, 40), '1min')):
        per_run = got[name].notna().groupby(run).sum()
        assert (per_run == np.maximum(0, lengths - h)).all(), name
    # path targets: at most L - H per run, exactly L - H once sigma exists; never filled
    per_run = got['mfe'].notna().groupby(run).sum()
    assert (per_run <= np.maximum(0, lengths - 30)).all()
    sym = bars['symbol'].to_numpy()
    tail = bars.groupby('symbol').tail(30).index
    assert got.loc[tail, PATH_COLS].isna().all().all()  # end of symbol
    assert got[sym == 'ZZ'][PATH_COLS].isna().all().all()  # symbol shorter than vol_window
    assert (got[PATH_COLS].isna().nunique(axis=1) == 1).all()  # the four path targets share their rows


def test_missing_minutes_match_the_reference_on_realistic_bars():
    "The shared random bars (1% of minutes dropped, staggered symbols, nights): every target equals the plain loop."
    bars = realistic_bars(n_symbols=3, n_bars=900, seed=4)
    steps = bars.groupby('symbol')['timestamp'].diff()
    assert (steps.between(pd.Timedelta('2min'), pd.Timedelta('15min'))).sum() >= 10   # holes inside sessions
    got = assert_matches_reference(bars, (5, 17), 30, 2.0, 60, 15)
    assert got['fwd_ret_5m'].notna().sum() > 1000 and got['mfe'].notna().sum() > 500


def test_a_missing_bar_makes_every_window_over_it_nan_not_a_stretched_horizon():
    c = 100 * np.exp(np.cumsum(np.random.default_rng(1).normal(0, 1e-3, 60)))
    full = _frame(c, c * 1.001, c * 0.999)
    holed = full.drop(index=40).reset_index(drop=True)                     # 10:10 is missing
    H, h = 8, 5
    g_full = build_targets(full, horizons=(h,), path_horizon=H, vol_window=10)
    got = build_targets(holed, horizons=(h,), path_horizon=H, vol_window=10)
    # rows 35..39 (before the hole) would reach across it: NaN, not close[t+5 rows] (6 minutes later)
    assert got['fwd_ret_5m'].iloc[35:40].isna().all() and got['fwd_ret_5m'].iloc[:35].notna().all()
    assert got['fwd_ret_5m'].iloc[40:54].notna().all()                     # after the hole: complete again
    assert np.allclose(got['fwd_ret_5m'].iloc[:35], g_full['fwd_ret_5m'].iloc[:35])
    for col in PATH_COLS:                                                   # the path targets: the same rule over t+1..t+H
        assert got[col].iloc[32:40].isna().all(), col
        assert got[col].iloc[10:32].notna().all() and got[col].iloc[40:51].notna().all(), col
    # daily bars count trading days: a weekend or holiday is not a missing bar
    days = pd.bdate_range('2024-01-02', periods=61).delete(17)              # weekends and a holiday
    daily = _frame(c, c * 1.01, c * 0.99, timestamps=days)
    assert build_targets(daily, horizons=(h,), path_horizon=H, vol_window=10)['fwd_ret_5d'].notna().sum() == len(c) - h


def test_demean_fallback_rows_counts_timestamps_with_too_few_symbols():
    rng = np.random.default_rng(0)
    ts = pd.date_range('2024-01-02 09:30', periods=40, freq='1min')
    rows = [(t, s) for t in ts for s in 'ABCDE' if rng.random() < 0.55]        # 0-5 symbols a timestamp
    frame = pd.DataFrame(rows, columns=['timestamp', 'symbol'])
    frame['fwd_ret_5m'] = rng.normal(size=len(frame))
    frame.loc[rng.random(len(frame)) < 0.1, 'fwd_ret_5m'] = np.nan
    frame['mdd'] = -rng.random(len(frame))
    finite_per_ts = frame.groupby('timestamp')['fwd_ret_5m'].transform('count')
    want = int((frame['fwd_ret_5m'].notna() & (finite_per_ts < 3)).sum())
    assert 0 < want < frame['fwd_ret_5m'].notna().sum()                       # both kinds of timestamp exist
    d, raw = demean_by_timestamp(frame['fwd_ret_5m'], frame['timestamp'], return_fallback=True)
    assert raw.sum() == want and np.array_equal(d[raw], frame['fwd_ret_5m'].to_numpy()[raw])
    assert not np.allclose(d[~raw & frame['fwd_ret_5m'].notna().to_numpy()],
                           frame['fwd_ret_5m'].to_numpy()[~raw & frame['fwd_ret_5m'].notna().to_numpy()])
    half = np.arange(len(frame) // 2)                                           # each block counted on its own rows
    want_half = int((frame['fwd_ret_5m'].iloc[half].notna()
                     & (frame.iloc[half].groupby('timestamp')['fwd_ret_5m'].transform('count') < 3)).sum())
    got = demean_fallback_rows(frame[['fwd_ret_5m', 'mdd']], frame['timestamp'], {'train': np.arange(len(frame)), 'half': half})
    assert got == {'fwd_ret_5m': {'train': want, 'half': want_half}}           # path targets are never demeaned
    assert demean_fallback_rows(frame[['fwd_ret_5m']], frame['timestamp'], {'train': half}, demean=False) == {}


# ---------------------------------------------------------------- edge cases built on purpose
def _frame(close, high=None, low=None, start='2024-01-02 09:30', symbol='A', timestamps=None, freq='1min'):
    close = np.asarray(close, float)
    high = close + 0.01 if high is None else np.asarray(high, float)
    low = close - 0.01 if low is None else np.asarray(low, float)
    ts = pd.date_range(start, periods=len(close), freq=freq) if timestamps is None else pd.DatetimeIndex(timestamps)
    return pd.DataFrame({'symbol': symbol, 'timestamp': ts.astype('datetime64[ns]'), 'open': close, 'high': high,
                         'low': low, 'close': close, 'volume': 1.0})


def _wiggle(n, base=100.0, amp=0.01):
    return base + amp * np.tile([0, 1, 0, -1], n // 4 + 1)[:n]


def test_session_gap_inside_the_window_gives_nan_not_a_crossing_value():
    c = 100 * np.exp(np.cumsum(np.random.default_rng(0).normal(0, 1e-3, 80)))
    ts = pd.date_range('2024-01-02 10:00', periods=40, freq='1min').append(
        pd.date_range('2024-01-02 11:00', periods=40, freq='1min'))  # a 21-minute halt
    bars = _frame(c, c * 1.001, c * 0.999, timestamps=ts)
    got = build_targets(bars, horizons=(5,), path_horizon=10, vol_window=5, max_gap_bars=15)
    assert got['fwd_ret_5m'].isna().tolist() == ([False] * 35 + [True] * 5) * 2
    assert got['mfe'].iloc[30:40].isna().all() and got['mfe'].iloc[29:30].notna().all()
    # with max_gap_bars above the halt it is one session (sigma_t reads across it), but a window over the halt
    # misses bars, so it is still NaN rather than a 5-row return spanning 25 minutes
    one = build_targets(bars, horizons=(5,), path_horizon=10, vol_window=5, max_gap_bars=30)
    assert one['fwd_ret_5m'].isna().tolist() == ([False] * 35 + [True] * 5) * 2
    assert one['mfe'].iloc[30:40].isna().all() and one['mfe'].iloc[40:70].notna().all()
    assert (barrier_sigma(bars, 5, max_gap_bars=30).iloc[40:45] != barrier_sigma(bars, 5, max_gap_bars=15).iloc[40:45]).all()
    # overnight: the same bars on two dates always split
    ts2 = pd.date_range('2024-01-02 15:20', periods=40, freq='1min').append(
        pd.date_range('2024-01-03 09:30', periods=40, freq='1min'))
    night = build_targets(_frame(c, c * 1.001, c * 0.999, timestamps=ts2), horizons=(5,), path_horizon=10,
                          vol_window=5, max_gap_bars=10_000)
    assert night['fwd_ret_5m'].isna().tolist() == ([False] * 35 + [True] * 5) * 2


def test_end_of_symbol_is_nan_even_when_the_next_symbol_continues_in_time():
    a = _frame(_wiggle(40), start='2024-01-02 09:30', symbol='A')
    b = _frame(_wiggle(40, 50), start='2024-01-02 10:10', symbol='B')  # B's clock continues A's
    got = build_targets(pd.concat([a, b], ignore_index=True), horizons=(3,), path_horizon=6, vol_window=4)
    for rows in (slice(37, 40), slice(77, 80)):
        assert got['fwd_ret_3m'].iloc[rows].isna().all()
    assert got['mfe'].iloc[34:40].isna().all() and got['mfe'].iloc[33:34].notna().all()
    assert got['fwd_ret_3m'].iloc[[36, 76]].notna().all()


def test_both_barriers_in_one_bar_is_lower_side():
    c = np.r_[_wiggle(10), 100.0, 100.0, 100.0]
    hi, lo = c + 0.001, c - 0.001
    hi[11], lo[11] = 120.0, 80.0           # the bar after t=10 spans both barriers
    got = build_targets(_frame(c, hi, lo), horizons=(1,), path_horizon=2, vol_window=5)
    assert got.loc[10, 'tth'] == 1 and got.loc[10, 'tth_side'] == -1
    hi[11], lo[11] = 120.0, 99.999         # only the upper one
    got = build_targets(_frame(c, hi, lo), horizons=(1,), path_horizon=2, vol_window=5)
    assert got.loc[10, 'tth'] == 1 and got.loc[10, 'tth_side'] == 1
    hi[11], lo[11] = 100.001, 99.999       # neither in bar 1; the lower one at bar 2 = H is a touch, not censoring
    lo[12] = 80.0
    got = build_targets(_frame(c, hi, lo), horizons=(1,), path_horizon=2, vol_window=5)
    assert got.loc[10, 'tth'] == 2 and got.loc[10, 'tth_side'] == -1


def test_touching_a_barrier_exactly_counts():
    c = np.r_[_wiggle(10), 100.0, 100.0, 100.0]
    bars = _frame(c, c + 0.001, c - 0.001)
    k, H, t = 2.0, 2, 10
    s = barrier_sigma(bars, vol_window=5).loc[t]
    up, dn = c[t] * (1 + k * s * math.sqrt(H)), c[t] * (1 - k * s * math.sqrt(H))
    for col, level, side in (('low', dn, -1), ('high', up, 1)):
        for value, touched in ((level, True), (np.nextafter(level, c[t]), False)):
            b = bars.copy()
            b.loc[t + 1, col] = value
            got = build_targets(b, horizons=(1,), path_horizon=H, barrier_k=k, vol_window=5).loc[t]
            assert (got['tth'], got['tth_side']) == ((1, side) if touched else (H, 0)), (col, touched)


def test_censored_rows_have_tth_h_and_side_zero():
    c = _wiggle(200)
    got = build_targets(_frame(c), horizons=(5,), path_horizon=30, barrier_k=50.0, vol_window=20)
    defined = got['tth'].notna()
    assert defined.sum() == 200 - 20 - 30
    assert (got.loc[defined, 'tth'] == 30).all() and (got.loc[defined, 'tth_side'] == 0).all()
    assert got.loc[~defined, 'tth_side'].isna().all()  # undefined is NaN, not censored


def test_mdd_peak_uses_close_and_earlier_highs_only():
    flat = _wiggle(7)
    c = np.r_[flat, 105, 101, 102]
    hi = np.r_[flat + 0.05, 110, 102, 103]
    lo = np.r_[flat - 0.05, 95, 100, 101]
    got = build_targets(_frame(c, hi, lo), horizons=(1,), path_horizon=3, vol_window=5)
    t = 6  # close 100: bar 7's own high (110) must not be the peak for its own low (95)
    assert np.isclose(got.loc[t, 'mdd'], 100 / 110 - 1)      # 110 (bar 7) then 100 (bar 8)
    assert not np.isclose(got.loc[t, 'mdd'], 95 / 110 - 1)
    assert np.isclose(got.loc[t, 'mfe'], 110 / 100 - 1)
    # a single wide bar whose high comes "first" is a fall from close[t] only
    c2, hi2, lo2 = np.r_[flat, 100, 100, 100], np.r_[flat + 0.05, 130, 100.5, 100.5], np.r_[flat - 0.05, 97, 99.5, 99.5]
    got2 = build_targets(_frame(c2, hi2, lo2), horizons=(1,), path_horizon=1, vol_window=5)
    assert np.isclose(got2.loc[t, 'mdd'], 97 / 100 - 1)
    # a path that only rises has mdd == 0 (min with 0) and a positive mfe
    up = np.r_[flat, 101, 102, 103]
    got3 = build_targets(_frame(up, up + 0.5, up - 0.5), horizons=(1,), path_horizon=3, vol_window=5)
    assert got3.loc[t, 'mdd'] == 0.0 and np.isclose(got3.loc[t, 'mfe'], 103.5 / 100 - 1)


def test_daily_bars_have_one_session_per_symbol_and_day_names():
    rng = np.random.default_rng(3)
    days = pd.bdate_range('2024-01-02', periods=120)
    days = days[(rng.random(days.size) > 0.05)]  # holidays
    days = days[:50].append(days[50:] + pd.Timedelta(days=30))  # a month-long halt: still one session
    frames = []
    for s in 'AB':
        o, h, l, c = ohlc_walk(rng, days.size, 0.02)
        frames.append(pd.DataFrame({'symbol': s, 'timestamp': days.astype('datetime64[ns]'), 'open': o, 'high': h,
                                    'low': l, 'close': c, 'volume': 1.0}))
    bars = pd.concat(frames, ignore_index=True)
    got = build_targets(bars, horizons=(1, 5), path_horizon=10, barrier_k=1.0, vol_window=20)
    assert list(got.columns) == ['fwd_ret_1d', 'fwd_ret_5d', 'mfe', 'mdd', 'tth', 'tth_side']
    for s, part in got.groupby(bars['symbol']):
        assert part['fwd_ret_5d'].isna().tolist() == [False] * (len(part) - 5) + [True] * 5
        assert part['mfe'].notna().sum() == len(part) - 20 - 10
    ref = ref_targets(bars, (1, 5), 10, 1.0, 20, 15)
    for name, key in (('fwd_ret_1d', 'h1'), ('fwd_ret_5d', 'h5'), *((c, c) for c in PATH_COLS)):
        np.testing.assert_allclose(got[name], ref[key], rtol=1e-10, atol=1e-14, equal_nan=True, err_msg=name)


def test_names_and_horizons():
    one_min, day = pd.Timedelta('1min'), pd.Timedelta('1D')
    assert target_names((5,), one_min) == ['fwd_ret_5m', 'mfe', 'mdd', 'tth', 'tth_side']
    assert target_names((5,), day)[0] == 'fwd_ret_5d'
    assert target_names((60, 90), one_min)[:2] == ['fwd_ret_1h', 'fwd_ret_90m']
    assert target_names((3,), pd.Timedelta('5min'))[0] == 'fwd_ret_15m'
    assert set(PATH_TARGETS) <= set(target_names((5,), one_min))
    assert max_horizon((5,), 30) == 30 and max_horizon((5, 60), 30) == 60 and max_horizon([1], 1) == 1
    for interval in (one_min, pd.Timedelta('5min'), pd.Timedelta('30s'), day):
        hs = (1, 5, 12, 60)
        for name, h in zip(target_names(hs, interval), hs):
            assert target_horizon_bars(name, interval) == h
        assert target_horizon_bars('tth', interval, path_horizon=17) == 17
    with pytest.raises(PipelineError): target_horizon_bars('fwd_ret_7m', pd.Timedelta('5min'))
    with pytest.raises(PipelineError): target_horizon_bars('vol_5m', one_min)
    got = build_targets(_frame(_wiggle(30)), horizons=(5,), path_horizon=10, vol_window=5)
    assert list(got.columns) == target_names((5,), one_min)


def test_targets_depend_only_on_their_symbols_window_of_high_low_close():
    bars = ragged_bars(7, n_symbols=3, max_days=3)
    kw = dict(horizons=(5,), path_horizon=12, barrier_k=1.0, vol_window=15, max_gap_bars=15)
    base = build_targets(bars, **kw)
    sess, _ = ref_sessions(bars, 15)
    sym = bars['symbol'].to_numpy()
    rng = np.random.default_rng(0)
    rows = rng.choice(np.flatnonzero(base['tth'].notna().to_numpy()), 25, replace=False)
    for t in rows:
        # first row sigma_t reads: before the 15th-last within-session return up to t
        j, count = t, 0
        while count < 15:
            count += sess[j] == sess[j - 1]
            j -= 1
        lo, hi = j, t + 12
        assert hi - lo >= 12 + 15 and sym[lo] == sym[hi] == sym[t]
        outside = np.ones(len(bars), bool)
        outside[lo:hi + 1] = False
        noisy = bars.copy()
        f = np.exp(rng.normal(0, 0.05, len(bars))) * outside + ~outside
        for col in ('open', 'high', 'low', 'close'): noisy[col] = noisy[col] * f
        noisy['volume'] = rng.permutation(noisy['volume'].to_numpy())
        noisy['user_feature'] = rng.normal(size=len(bars))
        got = build_targets(noisy, **kw)
        pd.testing.assert_series_equal(got.loc[t], base.loc[t])
        # and the window is tight: the bar at either end matters (lo through sigma_t, hi through the path)
        nudged = bars.copy()
        nudged.loc[lo, 'close'] *= 1.05
        assert barrier_sigma(nudged, 15).loc[t] != barrier_sigma(bars, 15).loc[t]
        nudged = bars.copy()
        nudged.loc[hi, 'high'] = nudged.loc[t:hi, 'high'].max() * 1.3
        assert build_targets(nudged, **kw).loc[t, 'mfe'] != base.loc[t, 'mfe']


def test_input_is_not_modified_and_index_is_kept():
    bars = ragged_bars(11, n_symbols=2, max_days=2)
    before = bars.copy()
    got = build_targets(bars)
    pd.testing.assert_frame_equal(bars, before)
    assert isinstance(got.index, pd.RangeIndex) and got.index.equals(bars.index) and len(got) == len(bars)
    s = barrier_sigma(bars)
    assert s.index.equals(bars.index) and ((s.isna()) <= got['mfe'].isna()).all()


def test_bad_input_names_symbol_column_and_row():
    bars = _frame(_wiggle(30))
    bad = bars.copy()
    bad.loc[7, 'low'] = 0.0
    with pytest.raises(DataError, match=r"symbol 'A'.*column 'low'.*row 7"): build_targets(bad)
    with pytest.raises(DataError, match='close'): build_targets(bars.drop(columns='close'))
    with pytest.raises(DataError, match='sorted'): build_targets(bars.iloc[::-1].reset_index(drop=True))
    two = pd.concat([bars, _frame(_wiggle(30), symbol='B'), bars.assign(timestamp=bars['timestamp'] + pd.Timedelta('1h'))],
                    ignore_index=True)  # A, B, A again
    with pytest.raises(DataError, match='sorted'): build_targets(two)
    for kw in ({'horizons': ()}, {'horizons': (5, 5)}, {'horizons': (0,)}, {'path_horizon': 0}, {'vol_window': 1},
               {'barrier_k': 0}, {'barrier_k': float('nan')}, {'horizons': (2.5,)}):
        with pytest.raises(PipelineError): build_targets(bars, **kw)


def test_demean_by_timestamp_uses_only_the_rows_given_and_keeps_nan():
    t = pd.to_datetime(['2024-01-02 09:30'] * 4 + ['2024-01-02 09:31'] * 2 + ['2024-01-02 09:32'] * 3)
    y = np.array([1.0, 2.0, 3.0, np.nan, 5.0, 7.0, 1.0, 1.0, 4.0])
    d = demean_by_timestamp(y, t)
    assert np.allclose(d[:3], [-1.0, 0.0, 1.0]) and np.isnan(d[3])     # mean of the finite values only
    assert np.allclose(d[4:6], [5.0, 7.0])                              # fewer than 3 values: left raw
    assert np.allclose(d[6:], [-1.0, -1.0, 2.0]) and abs(np.nansum(d[:3])) < 1e-12
    assert np.allclose(demean_by_timestamp(y[:3], t[:3]), [-1.0, 0.0, 1.0])   # a subset: only its own rows count


def test_fitting_targets_demeans_returns_only_and_follows_the_config():
    t = pd.to_datetime(['2024-01-02 09:30'] * 3 + ['2024-01-02 09:31'] * 3)
    targets = pd.DataFrame({'fwd_ret_5m': [1.0, 2.0, 6.0, 0.0, 0.0, 3.0], 'mdd': [-0.1, -0.2, -0.3, -0.1, -0.2, -0.3]})
    f = fitting_targets(targets, t)
    assert np.allclose(f['fwd_ret_5m'], [-2.0, -1.0, 3.0, -1.0, -1.0, 2.0])
    assert f['mdd'].equals(targets['mdd'])                                    # path targets are never demeaned
    assert fitting_targets(targets, t, demean=False) is targets
    assert targets['fwd_ret_5m'].tolist() == [1.0, 2.0, 6.0, 0.0, 0.0, 3.0]  # the input is not modified
    assert demean_returns({}) is True and demean_returns({'targets': {'demean_returns': False}}) is False
    with pytest.raises(PipelineError, match='targets.demean_returns'):
        demean_returns({'targets': {'demean_returns': 'yes'}})
