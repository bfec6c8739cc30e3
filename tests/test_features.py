"""Feature definitions cross-checked against independent, straightforward pandas/loop implementations,
plus the frame's contract: count, dtype, names, warm-up NaNs, config restriction, user columns, symbol-order invariance."""
import numpy as np
import pandas as pd
import pytest

from pipeline_lib.data.load import DataError, session_ids
from pipeline_lib.features import (FEATURE_FAMILIES, FEATURE_LIBRARY_VERSION, RECURSIVE_TOL, FeatureError,
                                   FeatureFamily, build_features, ewm_warmup, feature_names, feature_warmup,
                                   normalise_feature_config, register_family, unregister_family)
from synthetic import full_session_bars

N_ROWS = 1600      # per symbol: longer than the longest warm-up but vtod's (D sessions)


@pytest.fixture(scope='module')
def bars():
    b = full_session_bars(3, N_ROWS, seed=3)
    # irregular: drop a few rows of one symbol so timestamps differ across symbols (cross-sections vary in size)
    rng = np.random.default_rng(0)
    drop = rng.choice(np.flatnonzero(b['symbol'].eq('S01').to_numpy()), 40, replace=False)
    return b.drop(index=drop).reset_index(drop=True)


@pytest.fixture(scope='module')
def feats(bars):
    return build_features(bars)


def per_symbol(bars, fn):
    "Apply fn(symbol_frame) -> Series per symbol, aligned back to bars' index."
    return pd.concat([fn(g) for _, g in bars.groupby('symbol', sort=False)]).reindex(bars.index)


def check(feats, bars, name, expected, rtol=1e-4, atol=1e-6, min_frac=0.5):
    "Compare a feature column with an independent computation after its declared warm-up."
    wu = feature_warmup()[name]
    pos = bars.groupby('symbol', sort=False).cumcount().to_numpy()
    got = feats[name].to_numpy(np.float64)
    exp = np.asarray(expected, np.float64)
    after = pos >= wu
    ok = after & np.isfinite(exp)
    assert ok.sum() >= min_frac * after.sum() and ok.sum() > 50, f'{name}: too few comparable rows ({ok.sum()})'
    np.testing.assert_allclose(got[ok], exp[ok], rtol=rtol, atol=atol, err_msg=name)
    assert np.isnan(got[~after]).all(), f'{name}: rows inside the warm-up are not NaN'


# ---------------------------------------------------------------- the frame's contract

def test_shape_names_dtypes(bars, feats):
    names = feature_names()
    assert 411 <= len(names) <= 431
    assert feats.columns.tolist() == names and feats.columns.is_unique
    assert (feats.dtypes == np.float32).all()
    assert len(feats) == len(bars) and feats.index.equals(bars.index)
    assert isinstance(FEATURE_LIBRARY_VERSION, str)
    assert list(normalise_feature_config()['families']) == list(FEATURE_FAMILIES)   # registry order


def test_warmup_rows_nan_and_later_rows_finite(bars, feats):
    warm = feature_warmup()
    pos = bars.groupby('symbol', sort=False).cumcount().to_numpy()
    mostly_nan = []
    for name, wu in warm.items():
        col = feats[name].to_numpy()
        assert np.isnan(col[pos < wu]).all(), name
        after = col[pos >= wu]
        if len(after) < 100: continue          # vtod_*: D sessions of warm-up
        if np.isfinite(after).mean() < 0.95: mostly_nan.append(name)
    assert not mostly_nan, f'mostly NaN after the warm-up: {mostly_nan}'
    # declared warm-ups are not much longer than needed for finite windows: the first row after is finite
    for name in ('ma_60', 'roc_20', 'std_5', 'cord_10', 'skew_120', 'stochd_14', 'acf_30'):
        col = feats[name].to_numpy()
        assert np.isfinite(col[pos == warm[name]]).all(), name


def test_recursive_warmups_follow_the_tolerance_rule():
    "Recursive filters: ceil(log(tol)/log(1-alpha)) bars per filter, summed along chains (tol 1e-9, see the notebook)."
    warm = feature_warmup()
    bars_for = lambda alpha: int(np.ceil(np.log(RECURSIVE_TOL) / np.log(1 - alpha)))
    assert RECURSIVE_TOL <= 1e-6 and ewm_warmup(2 / 27) == 180          # the plain 1e-6 rule
    assert warm['macd_12_26_9'] == bars_for(2 / 27)
    assert warm['macdsig_12_26_9'] == bars_for(2 / 27) + bars_for(2 / 10)
    assert warm['rsi_14'] == 1 + bars_for(1 / 14)
    assert warm['adx_14'] == 1 + 2 * bars_for(1 / 14)
    assert warm['ema_20'] == bars_for(2 / 21)


def test_recursive_features_forget_their_start(bars):
    "After the warm-up, dropping a symbol's first 300 rows changes a recursive feature by < 1e-6 relative."
    one = bars[bars['symbol'].eq('S00')].reset_index(drop=True)
    cfg = {'families': ['rsi', 'atr', 'macd', 'adx', 'ema']}
    full = build_features(one, cfg)
    cut = build_features(one.iloc[300:].reset_index(drop=True), cfg)
    warm = feature_warmup(cfg)
    for name in full.columns:
        k = warm[name]
        a, b = full[name].to_numpy()[300 + k:], cut[name].to_numpy()[k:]
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7 * np.nanstd(a), err_msg=name)


# ---------------------------------------------------------------- textbook indicators

def wilder(x, n):
    "Textbook Wilder smoothing: SMA of the first n values, then s = s + (x - s)/n."
    x = np.asarray(x, float); out = np.full(len(x), np.nan)
    start = np.flatnonzero(~np.isnan(x))[0]
    if len(x) < start + n: return out
    s = x[start:start + n].mean(); out[start + n - 1] = s
    for i in range(start + n, len(x)):
        s = s + (x[i] - s) / n; out[i] = s
    return out


@pytest.mark.parametrize('n', [6, 14, 28])
def test_rsi_wilder(bars, feats, n):
    def rsi(g):
        d = g['close'].diff()
        ag, al = wilder(d.clip(lower=0), n), wilder((-d).clip(lower=0), n)
        return pd.Series(100 - 100 / (1 + ag / al), g.index)
    check(feats, bars, f'rsi_{n}', per_symbol(bars, rsi))


@pytest.mark.parametrize('n', [7, 14])
def test_atr_wilder(bars, feats, n):
    def atr(g):
        pc = g['close'].shift()
        tr = pd.concat([g['high'] - g['low'], (g['high'] - pc).abs(), (g['low'] - pc).abs()], axis=1).max(axis=1)
        tr.iloc[0] = g['high'].iloc[0] - g['low'].iloc[0]
        return pd.Series(wilder(tr, n), g.index) / g['close']
    check(feats, bars, f'atr_{n}', per_symbol(bars, atr))


@pytest.mark.parametrize('p', ['12_26_9', '5_35_5'])
def test_macd(bars, feats, p):
    f, s, sg = map(int, p.split('_'))
    def parts(g):
        line = g['close'].ewm(span=f).mean() - g['close'].ewm(span=s).mean()    # adjust=True: a different start
        sig = line.ewm(span=sg).mean()
        return pd.DataFrame({'macd': line / g['close'], 'sig': sig / g['close'], 'hist': (line - sig) / g['close']})
    exp = pd.concat([parts(g) for _, g in bars.groupby('symbol', sort=False)]).reindex(bars.index)
    check(feats, bars, f'macd_{p}', exp['macd'], rtol=1e-3, atol=1e-8)
    check(feats, bars, f'macdsig_{p}', exp['sig'], rtol=1e-3, atol=1e-8)
    check(feats, bars, f'macdhist_{p}', exp['hist'], rtol=1e-3, atol=1e-8)


@pytest.mark.parametrize('n', [10, 20])
def test_bollinger(bars, feats, n):
    def bb(g):
        m = g['close'].rolling(n).mean(); sd = g['close'].rolling(n).std(ddof=0)
        up, lo = m + 2 * sd, m - 2 * sd
        return pd.DataFrame({'b': (g['close'] - lo) / (up - lo), 'w': (up - lo) / m})
    exp = pd.concat([bb(g) for _, g in bars.groupby('symbol', sort=False)]).reindex(bars.index)
    check(feats, bars, f'bbp_{n}', exp['b'])
    check(feats, bars, f'bbw_{n}', exp['w'])


@pytest.mark.parametrize('n', [5, 14])
def test_stochastic_and_williams(bars, feats, n):
    def st(g):
        hh, ll = g['high'].rolling(n).max(), g['low'].rolling(n).min()
        k = 100 * (g['close'] - ll) / (hh - ll)
        return pd.DataFrame({'k': k, 'd': k.rolling(3).mean(), 'r': -100 * (hh - g['close']) / (hh - ll)})
    exp = pd.concat([st(g) for _, g in bars.groupby('symbol', sort=False)]).reindex(bars.index)
    check(feats, bars, f'stochk_{n}', exp['k'])
    check(feats, bars, f'stochd_{n}', exp['d'])
    if f'willr_{n}' in feats: check(feats, bars, f'willr_{n}', exp['r'])
    check(feats, bars, 'willr_14', per_symbol(bars, lambda g: -100 * (g['high'].rolling(14).max() - g['close'])
                                             / (g['high'].rolling(14).max() - g['low'].rolling(14).min())))


def test_cci(bars, feats):
    def cci(g, n=20):
        tp = (g['high'] + g['low'] + g['close']) / 3
        md = tp.rolling(n).apply(lambda a: np.abs(a - a.mean()).mean(), raw=True)
        return (tp - tp.rolling(n).mean()) / (0.015 * md)
    check(feats, bars, 'cci_20', per_symbol(bars, cci), rtol=1e-3, atol=1e-4)


def test_mfi(bars, feats):
    def mfi(g, n=14):
        tp = (g['high'] + g['low'] + g['close']) / 3; mf = tp * g['volume']
        pos = mf.where(tp > tp.shift(), 0.0).rolling(n).sum(); neg = mf.where(tp < tp.shift(), 0.0).rolling(n).sum()
        return 100 - 100 / (1 + pos / neg)
    check(feats, bars, 'mfi_14', per_symbol(bars, mfi))


def test_obv_slope(bars, feats):
    def obv_slope(g, n=20):
        obv = (np.sign(g['close'].diff()).fillna(0) * g['volume']).cumsum()
        slope = obv.rolling(n).apply(lambda a: np.polyfit(np.arange(n), a, 1)[0], raw=True)
        return slope / g['volume'].rolling(n).mean()
    check(feats, bars, 'obvslope_20', per_symbol(bars, obv_slope), rtol=1e-3, atol=1e-5)


def test_adx(bars, feats):
    n = 14
    def adx(g):
        h, l, c = g['high'].to_numpy(), g['low'].to_numpy(), g['close'].to_numpy()
        up, dn = np.diff(h, prepend=np.nan), -np.diff(l, prepend=np.nan)
        pdm = np.where((up > dn) & (up > 0), up, 0.0); mdm = np.where((dn > up) & (dn > 0), dn, 0.0)
        pc = np.r_[np.nan, c[:-1]]
        tr = np.nanmax(np.c_[h - l, np.abs(h - pc), np.abs(l - pc)], axis=1)
        pdm[0] = mdm[0] = tr[0] = np.nan
        atr, sp, sm = wilder(tr, n), wilder(pdm, n), wilder(mdm, n)
        pdi, mdi = 100 * sp / atr, 100 * sm / atr
        dx = 100 * np.abs(pdi - mdi) / (pdi + mdi)
        return pd.DataFrame({'adx': wilder(dx, n), 'dmi': (pdi - mdi) / (pdi + mdi)}, index=g.index)
    exp = pd.concat([adx(g) for _, g in bars.groupby('symbol', sort=False)]).reindex(bars.index)
    check(feats, bars, f'adx_{n}', exp['adx'], rtol=1e-3, atol=1e-4)
    check(feats, bars, f'dmi_{n}', exp['dmi'], rtol=1e-3, atol=1e-5)


# ---------------------------------------------------------------- Qlib Alpha158 operators

def test_qlib_candles(bars, feats):
    o, h, l, c = (bars[k] for k in ('open', 'high', 'low', 'close'))
    check(feats, bars, 'kbar_kmid', (c - o) / o)
    check(feats, bars, 'kbar_kup2', (h - np.maximum(o, c)) / (h - l + 1e-12))
    check(feats, bars, 'kbar_ksft', (2 * c - h - l) / o)
    check(feats, bars, 'price_low', l / c)


@pytest.mark.parametrize('d', [5, 30])
def test_qlib_rolling(bars, feats, d):
    def q(g):
        c, h, l, v = g['close'], g['high'], g['low'], g['volume']
        dc, dv = c.diff(), v.diff()
        r = c / c.shift() - 1
        x = np.arange(d)
        slope = c.rolling(d).apply(lambda a: np.polyfit(x, a, 1)[0], raw=True)
        rsq = c.rolling(d).apply(lambda a: np.corrcoef(x, a)[0, 1] ** 2, raw=True)
        resi = c.rolling(d).apply(lambda a: a[-1] - np.polyval(np.polyfit(x, a, 1), d - 1), raw=True)
        return pd.DataFrame({
            'roc': c.shift(d) / c, 'ma': c.rolling(d).mean() / c, 'std': c.rolling(d).std() / c,
            'beta': slope / c, 'rsqr': rsq, 'resi': resi / c,
            'max': h.rolling(d).max() / c, 'min': l.rolling(d).min() / c,
            'qtlu': c.rolling(d).quantile(0.8) / c, 'qtld': c.rolling(d).quantile(0.2) / c,
            'rank': c.rolling(d).rank(pct=True),
            'rsv': (c - l.rolling(d).min()) / (h.rolling(d).max() - l.rolling(d).min() + 1e-12),
            'imax': h.rolling(d).apply(lambda a: a.argmax() + 1, raw=True) / d,
            'imin': l.rolling(d).apply(lambda a: a.argmin() + 1, raw=True) / d,
            'corr': c.rolling(d).corr(np.log(v + 1)),
            'cord': (c / c.shift()).rolling(d).corr(np.log(v / v.shift() + 1)),
            'cntp': (dc > 0).astype(float).rolling(d).mean(), 'cntd': ((dc > 0).astype(float) - (dc < 0)).rolling(d).mean(),
            'sump': dc.clip(lower=0).rolling(d).sum() / (dc.abs().rolling(d).sum() + 1e-12),
            'vma': v.rolling(d).mean() / (v + 1e-12), 'vstd': v.rolling(d).std() / (v + 1e-12),
            'wvma': (r.abs() * v).rolling(d).std() / ((r.abs() * v).rolling(d).mean() + 1e-12),
            'vsumn': (-dv).clip(lower=0).rolling(d).sum() / (dv.abs().rolling(d).sum() + 1e-12),
        })
    exp = pd.concat([q(g) for _, g in bars.groupby('symbol', sort=False)]).reindex(bars.index)
    for k in exp.columns:
        check(feats, bars, f'{k}_{d}', exp[k], rtol=2e-4, atol=2e-6)


# ---------------------------------------------------------------- volatility, moments, volume, time, cross-section

def test_volatility_and_moments(bars, feats):
    def vm(g, n=20):
        lr = np.log(g['close']).diff()
        hl = np.log(g['high'] / g['low'])
        rs = np.log(g['high'] / g['close']) * np.log(g['high'] / g['open']) + np.log(g['low'] / g['close']) * np.log(g['low'] / g['open'])
        return pd.DataFrame({'rvol': lr.rolling(n).std(), 'park': np.sqrt((hl ** 2).rolling(n).mean() / (4 * np.log(2))),
                             'rs': np.sqrt(rs.rolling(n).mean()), 'skew': lr.rolling(n).skew(), 'kurt': lr.rolling(n).kurt(),
                             'acf': lr.rolling(n).corr(lr.shift()), 'ret': np.log(g['close'] / g['close'].shift(n)),
                             'vsurp': g['volume'] / g['volume'].shift().rolling(n).mean()})
    exp = pd.concat([vm(g) for _, g in bars.groupby('symbol', sort=False)]).reindex(bars.index)
    for k in exp.columns:
        check(feats, bars, f'{k}_20', exp[k], rtol=1e-3, atol=1e-6)


def test_volume_at_time_of_day(bars, feats):
    "vtod_3: volume over the mean volume at the same time of day in the symbol's previous 3 sessions that have that bar."
    exp = pd.Series(np.nan, index=bars.index)
    for _, g in bars.groupby('symbol', sort=False):
        day = g['timestamp'].dt.normalize(); tod = g['timestamp'] - day
        k = day.rank(method='dense').astype(int)                      # session number of the symbol
        grid = g.assign(k=k, tod=tod).pivot(index='k', columns='tod', values='volume')
        base = grid.shift(1).rolling(3, min_periods=1).mean()         # sessions k-3..k-1, missing bars skipped
        exp[g.index] = g['volume'].to_numpy() / base.stack().reindex(list(zip(k, tod))).to_numpy()
    assert exp.notna().sum() > 1000
    check(feats, bars, 'vtod_3', exp, rtol=1e-5)


def test_time_features(bars, feats):
    ts = bars['timestamp']
    tod = (ts - ts.dt.normalize()).dt.total_seconds() / 86400
    check(feats, bars, 'time_tod_sin', np.sin(2 * np.pi * tod))
    check(feats, bars, 'time_dow', ts.dt.day_of_week)
    first = bars.groupby(['symbol', ts.dt.date])['timestamp'].transform('min')
    check(feats, bars, 'time_since_open', (ts - first).dt.total_seconds() / 60)


def test_features_and_targets_share_one_session_definition():
    "Session starts of the features (time_since_open == 0) are session_ids' (the targets'): new days, and a lunch break > 15 bars."
    from pipeline_lib.data.targets import build_targets
    b = full_session_bars(2, 3 * 390, seed=5)
    t, day = b['timestamp'], b['timestamp'].dt.normalize()
    days = np.sort(day.unique())
    lunch = (day == days[1]) & t.dt.strftime('%H:%M').between('12:00', '12:29')            # 30 bars: a new session
    short = (day == days[2]) & t.dt.strftime('%H:%M').between('12:00', '12:09')            # 10 bars: the same session
    b = b[~(lunch | short).to_numpy()].reset_index(drop=True)
    sid = session_ids(b)
    new = np.r_[True, sid[1:] != sid[:-1]]
    after_lunch = (b['timestamp'].dt.normalize() == days[1]) & (b['timestamp'].dt.strftime('%H:%M') == '12:30')
    after_short = (b['timestamp'].dt.normalize() == days[2]) & (b['timestamp'].dt.strftime('%H:%M') == '12:10')
    assert new[after_lunch.to_numpy()].all() and not new[after_short.to_numpy()].any()      # the definition itself
    F = build_features(b, {'families': ['time', 'sess'], 'bars_per_session': 1})
    since = F['time_since_open'].to_numpy(np.float64)
    ok = np.isfinite(since)                                        # the symbol's first row is warm-up
    assert ok.sum() > len(b) - 4 and np.array_equal(since[ok] == 0, new[ok])
    sess_ret = F['sess_ret'].to_numpy(np.float64)                  # measured from the new session's first open
    assert np.allclose(sess_ret[new & ok], np.log(b['close'] / b['open']).to_numpy()[new & ok], atol=1e-6)
    # and the targets never reach from one of these sessions into the next
    y = build_targets(b, horizons=(3,), path_horizon=5, vol_window=10)['fwd_ret_3m'].to_numpy()
    last3 = np.zeros(len(b), bool)
    for k in range(1, 4): last3[np.flatnonzero(new)[1:] - k] = True
    assert np.isnan(y[last3]).all()


def test_cross_section(bars, feats):
    r5 = per_symbol(bars, lambda g: np.log(g['close'] / g['close'].shift(5)))
    ts = bars['timestamp']
    rank = r5.groupby(ts).rank(pct=True)       # average ties; (less + (eq+1)/2)/n
    n = r5.groupby(ts).transform('count')
    check(feats, bars, 'csret_5', rank - 0.5 / n - 0.5)
    check(feats, bars, 'mktrel_5', r5 - r5.groupby(ts).transform('mean'), atol=1e-6)
    r1 = per_symbol(bars, lambda g: np.log(g['close'] / g['close'].shift()))
    mkt = r1.groupby(ts).transform('mean')
    df = pd.DataFrame({'r': r1, 'm': mkt, 's': bars['symbol']})
    beta = pd.concat([g['r'].rolling(60).cov(g['m']) / g['m'].rolling(60).var() for _, g in df.groupby('s', sort=False)]).reindex(bars.index)
    check(feats, bars, 'mktbeta_60', beta, rtol=1e-3, atol=1e-5)


# ---------------------------------------------------------------- config, user columns, order, errors

def test_config_restricts_and_normalises(bars, feats):
    cfg = {'families': ['roc', 'rsi']}
    sub = build_features(bars, cfg)
    assert sub.columns.tolist() == [c for c in feats.columns if c.startswith(('roc_', 'rsi_'))]
    pd.testing.assert_frame_equal(sub, feats[sub.columns])
    n = normalise_feature_config({'families': ['rsi', 'roc'], 'exclude': ['rsi_6'], 'params': {'roc': [5, 7]}})
    assert n['families'] == {'roc': [5, 7], 'rsi': [9, 14, 21, 28, 42]}       # registry order, exclusions applied
    assert normalise_feature_config(n) == n                                    # idempotent
    assert normalise_feature_config({'exclude': ['kbar']})['families'].keys() == set(FEATURE_FAMILIES) - {'kbar'}
    assert feature_names({'families': ['roc'], 'params': {'roc': [7]}}) == ['roc_7']
    with pytest.raises(FeatureError, match='Unknown feature families'):
        normalise_feature_config({'families': ['nope']})
    with pytest.raises(FeatureError, match='Unknown feature config keys'):
        normalise_feature_config({'famlies': ['roc']})
    with pytest.raises(FeatureError, match='MACD'):
        normalise_feature_config({'params': {'macd': ['26_12_9']}})


def test_extra_columns_are_not_features_unless_listed(bars):
    "A vendor's extra column (here one that is tomorrow's open: pure leakage) stays out of the features unless named."
    b = bars.assign(next_open=bars.groupby('symbol')['open'].shift(-1), my_signal=np.arange(len(bars), dtype=float) * 0.5)
    default = build_features(b, {'families': ['roc']})
    assert not [c for c in default.columns if c.startswith('user_')]
    assert feature_names({'families': ['roc']}) == default.columns.tolist()
    f = build_features(b, {'families': ['roc'], 'user_columns': ['my_signal']})
    assert f.columns.tolist()[-1] == 'user_my_signal' and 'user_next_open' not in f
    with pytest.raises(DataError, match="user column 'spread'") as e:
        build_features(b, {'families': ['roc'], 'user_columns': ['spread']})
    assert e.value.column == 'spread'
    with pytest.raises(DataError, match='list of the extra file columns'):   # the old `user_columns: true`
        normalise_feature_config({'user_columns': True})


def test_user_columns_pass_through(bars):
    b = bars.assign(my_signal=np.arange(len(bars), dtype=float) * 0.5, flag=np.arange(len(bars)) % 2 == 0)
    cfg = {'families': ['roc'], 'user_columns': ['my_signal', 'flag']}
    f = build_features(b, cfg)
    assert f.columns.tolist()[-2:] == ['user_my_signal', 'user_flag']
    assert f['user_my_signal'].dtype == np.float32
    np.testing.assert_array_equal(f['user_my_signal'].to_numpy(), b['my_signal'].to_numpy(np.float32))
    assert 'user_my_signal' not in build_features(b, {'families': ['roc'], 'user_columns': []})
    assert feature_warmup(cfg)['user_my_signal'] == 0
    assert feature_names({'families': ['roc'], 'user_columns': ['user_flag']})[-1] == 'user_flag'   # no double prefix
    with pytest.raises(DataError, match='both be named'):
        build_features(b.assign(user_my_signal=1.0), {**cfg, 'user_columns': ['my_signal', 'user_my_signal']})
    with pytest.raises(DataError, match='exchange'):
        build_features(b.assign(exchange='XNAS'), {'families': ['roc'], 'user_columns': ['exchange']})


def test_symbol_order_does_not_matter(bars, feats):
    syms = bars['symbol'].unique()[::-1]
    shuffled = pd.concat([bars[bars['symbol'].eq(s)] for s in syms])
    f2 = build_features(shuffled.reset_index(drop=True))
    f2.index = shuffled.index
    f2 = f2.reindex(bars.index)
    np.testing.assert_allclose(f2.to_numpy(np.float64), feats.to_numpy(np.float64), rtol=1e-5, atol=1e-6, equal_nan=True)
    own = [c for c in feats.columns if FEATURE_FAMILIES[c.split('_')[0]].kind != 'cross_section']
    assert np.array_equal(f2[own].to_numpy(), feats[own].to_numpy(), equal_nan=True)   # per-symbol features: bit for bit


def test_bad_bars_are_refused(bars):
    with pytest.raises(DataError, match='grouped by symbol'):
        build_features(bars.sample(frac=1, random_state=0).reset_index(drop=True), {'families': ['roc']})
    with pytest.raises(DataError, match='increase strictly'):
        build_features(pd.concat([bars.iloc[:10], bars.iloc[9:20]]).reset_index(drop=True), {'families': ['roc']})
    with pytest.raises(DataError, match='volume'):
        build_features(bars.drop(columns='volume'), {'families': ['roc']})


def test_registered_family_is_built_and_removable(bars):
    fam = FeatureFamily('canary', (1, 2), lambda ctx, p: ctx.close * p, lambda p: p, 'rolling')
    register_family(fam)
    try:
        f = build_features(bars, {'families': ['roc', 'canary']})
        assert f.columns.tolist()[-2:] == ['canary_1', 'canary_2']
        assert f['canary_2'].isna().sum() == 2 * bars['symbol'].nunique()
        assert 'canary_1' in feature_names()
    finally:
        unregister_family('canary')
    assert 'canary_1' not in feature_names()


def test_user_column_list_reaches_inference_and_the_cache_key(bars):
    "Inference rebuilds only the user columns its models read; the list is part of the feature cache key."
    from pipeline_lib.features.store import cache_key
    from pipeline_lib.inference import subset_config
    fc = normalise_feature_config({'families': ['roc'], 'user_columns': ['spread', 'imbalance']})
    sub = subset_config(fc, ['roc_5', 'user_spread'])
    assert sub['user_columns'] == ['spread'] and normalise_feature_config(sub) == sub
    b = bars.assign(spread=0.5)
    assert build_features(b, sub).columns.tolist() == ['roc_5', 'user_spread']
    assert cache_key(b, {'families': ['roc']}) != cache_key(b, {'families': ['roc'], 'user_columns': ['spread']})
