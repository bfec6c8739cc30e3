"""Every feature column is causal and its declared warm-up is honest, on random multi-symbol minute bars.

Checks, each run on EVERY column `build_features` produces (the default config, plus a user column):

- prefix: features computed on the data cut at a timestamp (all symbols at once, so cross-sectional features see
  the same rows) equal the features of the full data on the kept rows;
- future randomised: replacing every row after a timestamp with new random (valid) bars leaves all earlier values
  unchanged;
- warm-up: on data that starts later (mid-session and at a session start), every value after the column's declared
  warm-up equals the full-history value to 1e-6 relative;
- and the checks are tested: deliberately leaky canary families (a centred rolling mean, the next bar's return)
  fail both causality checks, and canaries with dishonest warm-ups fail the warm-up check.

A failure names each failing column with the first differing row (symbol, timestamp, both values).
"""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from pipeline_lib import features as F
from synthetic import check_valid_bars, randomise_after, realistic_bars

N_SYMBOLS, N_BARS = 4, 1500
# A cell passes when |got - expected| <= RTOL * |expected|  or  <= ATOL_STD * (the column's std over the full data).
# Causal values should be bit-identical whatever comes later; the slack only forgives summation-order noise.
CAUSAL_RTOL, CAUSAL_ATOL_STD = 1e-6, 1e-7
# The warm-up promise (DESIGN/201_features.library: "no longer matters to 1e-6 relative"): relative to the value, or to the
# column's spread for values near zero (a feature crossing zero cannot be 1e-6-relative to itself).
WARMUP_RTOL, WARMUP_ATOL_STD = 1e-6, 1e-6


def _cut_points(bars: pd.DataFrame) -> list[pd.Timestamp]:
    "Cut timestamps: early, the first bar of the third day (a session boundary), mid, and near the end."
    ts = np.sort(bars['timestamp'].unique())
    days = pd.DatetimeIndex(ts).normalize()
    third_day_open = ts[np.flatnonzero(days == days.unique()[2])[0]]
    return [pd.Timestamp(ts[int(len(ts) * 0.2)]), pd.Timestamp(third_day_open) - pd.Timedelta('1min'),
            pd.Timestamp(ts[int(len(ts) * 0.6)]), pd.Timestamp(ts[int(len(ts) * 0.93)])]


def compare(expected: pd.DataFrame, got: pd.DataFrame, keys: pd.DataFrame, tol: tuple[float, float], label: str,
            rows: np.ndarray | None = None, scale: np.ndarray | None = None) -> dict[str, str]:
    """Columns whose values differ, with evidence: NaN equals NaN, else |a-b| <= rtol*|a| or <= atol_std*scale.

    `expected`, `got` and `keys` (symbol, timestamp) are aligned row-for-row; `tol` = (rtol, atol_std); `scale` is
    each column's std (default: over `expected`); `rows` (bool, rows x columns or rows) restricts the cells compared.
    """
    assert list(expected.columns) == list(got.columns), f'{label}: column lists differ'
    assert len(expected) == len(got) == len(keys)
    rtol, atol_std = tol
    a = expected.to_numpy(np.float64); b = got.to_numpy(np.float64)
    if scale is None: scale = _std(expected)
    with np.errstate(invalid='ignore'):
        d = np.abs(a - b)
        ok = (d <= rtol * np.abs(a)) | (d <= atol_std * scale) | (np.isnan(a) & np.isnan(b))
    if rows is not None: ok |= ~(rows if rows.ndim == 2 else rows[:, None])
    out = {}
    for j in np.flatnonzero(~ok.all(axis=0)):
        bad = np.flatnonzero(~ok[:, j]); i = bad[0]
        with np.errstate(invalid='ignore', divide='ignore'), warnings.catch_warnings():
            warnings.simplefilter('ignore', RuntimeWarning)
            worst = np.nanmax(np.where(ok[:, j], np.nan, d[:, j] / np.maximum(np.abs(a[:, j]), scale[j])))
        out[expected.columns[j]] = (f'{label}: {len(bad)} rows differ (worst |diff|/max(|value|, std) {worst:.1e}); '
                                    f'first {keys["symbol"].iat[i]} {keys["timestamp"].iat[i]}: '
                                    f'expected {float(a[i, j])!r}, got {float(b[i, j])!r}')
    return out


def _std(frame: pd.DataFrame) -> np.ndarray:
    "Each column's std over its finite values (0 where there are fewer than two)."
    x = frame.to_numpy(np.float64)
    x = np.where(np.isfinite(x), x, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', RuntimeWarning)
        sd = np.nanstd(x, axis=0)
    return np.nan_to_num(sd, nan=0.0)


def prefix_violations(bars, full, config=None, cuts=None) -> dict[str, str]:
    "Columns whose values on data cut at a timestamp differ from the full data's."
    found, scale = {}, _std(full)
    for cut in cuts if cuts is not None else _cut_points(bars):
        keep = (bars['timestamp'] <= cut).to_numpy()
        sub = bars[keep].reset_index(drop=True)
        got = F.build_features(sub, config)
        exp = full[keep].reset_index(drop=True)
        for c, e in compare(exp, got, sub, (CAUSAL_RTOL, CAUSAL_ATOL_STD), f'prefix to {cut}', scale=scale).items(): found.setdefault(c, e)
    return found


def future_violations(bars, full, config=None, cuts=None) -> dict[str, str]:
    "Columns whose values at or before a timestamp change when every later row is randomised."
    found, scale = {}, _std(full)
    for k, cut in enumerate(cuts if cuts is not None else _cut_points(bars)):
        noisy = randomise_after(bars, cut, seed=100 + k)
        keep = (bars['timestamp'] <= cut).to_numpy()
        assert not np.allclose(noisy.loc[~keep, 'close'], bars.loc[~keep, 'close'])  # the future really changed
        got = F.build_features(noisy, config)[keep].reset_index(drop=True)
        exp = full[keep].reset_index(drop=True)
        for c, e in compare(exp, got, bars[keep].reset_index(drop=True), (CAUSAL_RTOL, CAUSAL_ATOL_STD),
                              f'randomised after {cut}', scale=scale).items():
            found.setdefault(c, e)
    return found


def _positions(bars):
    return bars.groupby('symbol', sort=False).cumcount().to_numpy()


def warmup_violations(bars, full, config=None, starts=None) -> tuple[dict[str, str], dict[str, int]]:
    """Columns whose values after their declared warm-up, on data starting later, differ from the full history's.

    Per-symbol columns are compared at rows whose position in the later data is >= the warm-up; cross-sectional
    columns from the first timestamp at which every symbol has passed its warm-up. Also returns how many cells
    were compared per column (a column never compared is reported as a violation: the data were too short)."""
    warm = F.feature_warmup(config)
    kinds = {F.FEATURE_FAMILIES[n].column(p): F.FEATURE_FAMILIES[n].kind
             for n, ps in F.normalise_feature_config(config)['families'].items() for p in ps}
    found, counted, scale = {}, dict.fromkeys(full.columns, 0), _std(full)
    for start in starts:
        keep = (bars['timestamp'] >= start).to_numpy()
        late = bars[keep].reset_index(drop=True)
        got = F.build_features(late, config)
        exp = full[keep].reset_index(drop=True)
        pos = _positions(late)
        mask = np.zeros(got.shape, bool)
        for j, c in enumerate(got.columns):
            w = warm[c]
            if kinds.get(c) == 'cross_section':
                first_ok = late['timestamp'][pos == w].groupby(late['symbol']).min()
                if first_ok.size < late['symbol'].nunique(): continue  # some symbol never gets past the warm-up
                mask[:, j] = (late['timestamp'] >= first_ok.max()).to_numpy()
            else:
                mask[:, j] = pos >= w
            counted[c] += int((mask[:, j] & np.isfinite(exp[c].to_numpy())).sum())
        for c, e in compare(exp, got, late, (WARMUP_RTOL, WARMUP_ATOL_STD), f'data starting {start}', rows=mask,
                              scale=scale).items():
            found.setdefault(c, f'{e} (declared warm-up {warm[c]})')
    for c, n in counted.items():
        if n == 0: found.setdefault(c, f'no finite value after the declared warm-up {warm[c]} was compared (data too short?)')
    return found, counted


def _report(found: dict[str, str]) -> str:
    return f'{len(found)} columns fail:\n' + '\n'.join(f'  {c}: {e}' for c, e in found.items())


# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def bars():
    b = realistic_bars(N_SYMBOLS, N_BARS, seed=11, extra_columns=1)
    check_valid_bars(b)
    return b


@pytest.fixture(scope='module')
def full(bars):
    f = F.build_features(bars)
    assert list(f.columns) == F.feature_names() and len(f) == len(bars) and f.index.equals(bars.index)
    assert (f.dtypes == np.float32).all()
    return f


@pytest.fixture(scope='module')
def long_data(bars, full):
    "(bars, features) long enough that every column has a few hundred rows after its warm-up in a later-starting frame."
    need = max(F.feature_warmup().values()) + 700
    if need <= N_BARS: return bars, full
    b = realistic_bars(N_SYMBOLS, need, seed=11, extra_columns=1)
    return b, F.build_features(b)


def _starts(bars):
    "Later starts: mid-session on the first day, and the second day's open."
    ts = np.sort(bars['timestamp'].unique())
    days = pd.DatetimeIndex(ts).normalize()
    return [pd.Timestamp(ts[57]), pd.Timestamp(ts[np.flatnonzero(days == days.unique()[1])[0]])]


def test_realistic_bars_are_realistic(bars):
    "The test data has what the checks need: several days, overnight gaps, missing bars, staggered symbols."
    per = bars.groupby('symbol')['timestamp']
    assert bars['timestamp'].dt.normalize().nunique() >= 4
    gaps = bars['timestamp'].diff()[bars['symbol'].eq(bars['symbol'].shift())]
    assert (gaps > pd.Timedelta('12h')).sum() >= 3 * N_SYMBOLS          # overnight gaps
    assert ((gaps > pd.Timedelta('1min')) & (gaps < pd.Timedelta('1h'))).sum() >= N_SYMBOLS  # missing bars
    assert per.min().nunique() == N_SYMBOLS                              # symbols start at different times
    check_valid_bars(randomise_after(bars, _cut_points(bars)[1]))


def test_every_column_is_finite_somewhere_after_its_warmup(long_data):
    "A column that is all NaN after its warm-up would pass every causality check vacuously."
    bars, full = long_data
    warm, pos = F.feature_warmup(), _positions(bars)
    empty = [c for c in full.columns if not np.isfinite(full[c].to_numpy()[pos >= warm[c]]).any()]
    assert not empty, f'columns with no finite value after their warm-up: {empty}'


def test_every_feature_sees_only_prefixes(bars, full):
    found = prefix_violations(bars, full)
    assert not found, _report(found)


def test_every_feature_ignores_the_future(bars, full):
    found = future_violations(bars, full)
    assert not found, _report(found)


@pytest.mark.slow
def test_every_declared_warmup_is_honest(long_data):
    bars, full = long_data
    found, counted = warmup_violations(bars, full, None, _starts(bars))
    assert not found, _report(found)


# --- the checks are tested: canaries ---------------------------------------------------------------------------

def _per_symbol(ctx, fn):
    "Apply `fn` to each symbol's close (a pandas Series) and restack; uses only `ctx.bars`, the canonical frame."
    return ctx.bars.groupby('symbol', sort=False)['close'].transform(fn).to_numpy()

def _close(ctx): return ctx.bars['close'].to_numpy()

CANARIES = [  # leaky: both causality checks must flag exactly these
    F.FeatureFamily('canary_centred', (5,), lambda ctx, p: _per_symbol(ctx, lambda s: s.rolling(p, center=True).mean()) / _close(ctx),
                    lambda p: p, 'rolling', 'LEAKY: centred rolling mean'),
    F.FeatureFamily('canary_next', (1,), lambda ctx, p: np.log(_per_symbol(ctx, lambda s: s.shift(-p)) / _close(ctx)),
                    0, 'bar', "LEAKY: next bar's return"),
    F.FeatureFamily('canary_fullmean', (1,), lambda ctx, p: _per_symbol(ctx, lambda s: s.mean() + 0 * s) / _close(ctx),
                    0, 'bar', 'LEAKY: close over its full-sample mean'),
]
WARMUP_CANARIES = [  # causal, but their declared warm-ups are too short: the warm-up check must flag them
    F.FeatureFamily('canary_minp', (20,), lambda ctx, p: _per_symbol(ctx, lambda s: s.rolling(p, min_periods=1).mean()) / _close(ctx),
                    0, 'rolling', 'claims no warm-up while its first 19 rows use shorter windows'),
    F.FeatureFamily('canary_ema', (10,), lambda ctx, p: _per_symbol(ctx, lambda s: s.ewm(alpha=0.1, adjust=False).mean()) / _close(ctx),
                    lambda p: p, 'recursive', 'EMA(alpha=0.1) claiming a 10-bar warm-up (needs 132)'),
]


@pytest.fixture
def canaries():
    names = []
    try:
        for fam in CANARIES + WARMUP_CANARIES:
            assert fam.name not in F.FEATURE_FAMILIES
            F.register_family(fam); names.append(fam.name)
        yield
    finally:
        for n in names: F.FEATURE_FAMILIES.pop(n, None)
    assert not any(n.startswith('canary') for n in F.FEATURE_FAMILIES)


def test_causality_checks_catch_leaky_canaries(bars, canaries):
    cfg = {'families': [f.name for f in CANARIES + WARMUP_CANARIES], 'user_columns': False}
    full = F.build_features(bars, cfg)
    leaky = {f.column(p) for f in CANARIES for p in f.params}
    cuts = _cut_points(bars)[:2]
    for check in (prefix_violations, future_violations):
        found = check(bars, full, cfg, cuts)
        assert set(found) == leaky, f'{check.__name__} flagged {sorted(found)}, expected exactly {sorted(leaky)}'


def test_warmup_check_catches_dishonest_warmups(bars, canaries):
    cfg = {'families': [f.name for f in WARMUP_CANARIES], 'user_columns': False}
    full = F.build_features(bars, cfg)
    found, counted = warmup_violations(bars, full, cfg, _starts(bars)[:1])
    assert set(found) == {f.column(p) for f in WARMUP_CANARIES for p in f.params}, found
    # the same EMA declared with its honest warm-up passes
    honest = F.FeatureFamily('canary_ema', (10,), WARMUP_CANARIES[1].fn, lambda p: F.ewm_warmup(0.1), 'recursive')
    F.register_family(honest)
    cfg = {'families': ['canary_ema'], 'user_columns': False}
    found, counted = warmup_violations(bars, F.build_features(bars, cfg), cfg, _starts(bars)[:1])
    assert not found and counted['canary_ema_10'] > 1000, found
