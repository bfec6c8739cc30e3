"""Synthetic bars for the tests: every generator the suite uses, in one place.

Pick by what the test needs from the data:

| generator | rows | use it for |
|---|---|---|
| `walk_bars` | named symbols on one regular grid (any frequency, or given timestamp strings) | loader round trips, bad files |
| `full_session_bars` | whole 390-bar sessions, every symbol on every bar | features checked against reference formulas |
| `realistic_bars` | missing bars, staggered starts, zero volume, U-shaped volatility, overnight gaps | causality, caches, data-dir runs |
| `ragged_bars` | random-length sessions, halts, nights, weekends, a symbol shorter than any window | targets against a brute-force reference |
| `close_walk` | `symbol, timestamp, close` on full sessions, optional overnight jumps | backtests |
| `close_layout` | `symbol, timestamp, close` with missing bars, long halts and delistings | splits and walk-forward folds |
| `config_market_bars` | the embedded market of a run config (`make_market`) | inference against a trained run |

Each is a plain function of its seed: the same arguments give the same frame, so seed-specific expectations hold.
`randomise_after` replaces the future of a frame (causality checks); `check_valid_bars` asserts the canonical contract.
Import with `from synthetic import ...` (pytest puts tests/ on sys.path; bench/ scripts add it themselves).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline_lib.data.market import make_market
from pipeline_lib.features import random_bars as full_session_bars  # the library's own demo generator

BAR_COLUMNS = ['symbol', 'timestamp', 'open', 'high', 'low', 'close', 'volume']

__all__ = ['BAR_COLUMNS', 'session_grid', 'walk_bars', 'full_session_bars', 'realistic_bars', 'randomise_after',
           'ohlc_walk', 'ragged_bars', 'close_walk', 'close_layout', 'config_market_bars', 'check_valid_bars']


def session_grid(n_days: int, bars_per_day: int = 390, start: str = '2024-01-02 09:30',
                 interval: str = '1min') -> pd.DatetimeIndex:
    "Bar timestamps of `n_days` consecutive weekdays, `bars_per_day` bars `interval` apart from `start`'s time of day."
    start, interval = pd.Timestamp(start), pd.Timedelta(interval)
    days = pd.bdate_range(start.normalize(), periods=n_days) + (start - start.normalize())
    steps = np.arange(bars_per_day) * interval  # timedelta64 at the Timestamp's own unit (pandas 3: us)
    return pd.DatetimeIndex((days.values[:, None] + steps[None, :]).ravel())


# ---------------------------------------------------------------- OHLCV bars
def walk_bars(symbols=('AAA', 'BBB'), n: int = 120, freq: str = '1min', start: str = '2024-01-02 09:30', seed: int = 0,
              timestamps=None) -> pd.DataFrame:
    """Valid canonical bars: per symbol a random walk from 100 with consistent OHLC and integer volumes, on
    `pd.date_range(start, periods=n, freq=freq)`; or on `timestamps` taken as they are (strings too: files to parse)."""
    rng = np.random.default_rng(seed)
    if timestamps is not None: n = len(timestamps)
    ts = pd.date_range(start, periods=n, freq=freq) if timestamps is None else list(timestamps)
    out = []
    for sym in symbols:
        c = 100 * np.exp(np.cumsum(rng.normal(0, 1e-3, n)))
        o = np.r_[100.0, c[:-1]]
        h = np.maximum(o, c) * (1 + rng.uniform(1e-5, 1e-3, n))
        l = np.minimum(o, c) * (1 - rng.uniform(1e-5, 1e-3, n))
        out.append(pd.DataFrame({'symbol': sym, 'timestamp': ts, 'open': o, 'high': h, 'low': l, 'close': c,
                                 'volume': rng.integers(0, 1000, n).astype(float)}))
    b = pd.concat(out, ignore_index=True).assign(symbol=lambda f: f['symbol'].astype('str'))
    return b if timestamps is not None else b.assign(timestamp=b['timestamp'].astype('datetime64[ns]'))


def _ohlcv(rng, n: int, new_day: np.ndarray, minute_of_day: np.ndarray, bars_per_day: int,
           price0: float, vol: float, market: np.ndarray | None) -> dict:
    "Valid OHLCV for `n` bars: a log random walk with an intraday U-shaped volatility and overnight gaps."
    u = minute_of_day / max(bars_per_day - 1, 1)
    shape = 1.0 + 1.5 * (u - 0.5) ** 2 * 4  # U-shape: 2.5x at the open and the close
    sigma = vol * np.sqrt(shape)
    r = rng.standard_t(5, n) * sigma / np.sqrt(5 / 3)
    if market is not None: r = 0.6 * r + 0.8 * market * sigma
    gap = np.where(new_day, rng.normal(0, 8 * vol, n), rng.normal(0, 0.1 * vol, n))
    gap[0] = 0.0
    # open_t = close_{t-1} * exp(gap_t); close_t = open_t * exp(r_t)
    log_c = np.log(price0) + np.cumsum(gap + r)
    log_o = log_c - r
    hi = np.maximum(log_o, log_c) + np.abs(rng.normal(0, 0.5 * sigma, n))
    lo = np.minimum(log_o, log_c) - np.abs(rng.normal(0, 0.5 * sigma, n))
    volume = np.round(np.exp(rng.normal(np.log(2000), 0.8, n)) * shape)
    return {'open': np.exp(log_o), 'high': np.exp(hi), 'low': np.exp(lo), 'close': np.exp(log_c), 'volume': volume}


def realistic_bars(n_symbols: int = 4, n_bars: int = 1500, seed: int = 0, *, start: str = '2024-01-02 09:30',
                   interval: str = '1min', bars_per_day: int = 390, missing: float = 0.01, stagger: int = 7,
                   zero_volume: float = 0.002, vol: float = 1e-3, extra_columns: int = 0) -> pd.DataFrame:
    """Canonical random bars: `n_symbols` symbols of `n_bars` rows each (minute bars over several weekdays).

    Each symbol drops a random `missing` fraction of its slots (different bars per symbol), symbol `j` starts
    `j*stagger` bars after the first, a `zero_volume` fraction of bars trade nothing, prices follow a t-distributed
    log random walk with a common market factor, a U-shaped intraday volatility and overnight gaps. Always valid:
    low <= open, close <= high, volume >= 0. `extra_columns` adds float64 user columns `user_0`, ...
    """
    rng = np.random.default_rng(seed)
    n_slots = int(np.ceil(n_bars / (1 - missing) * 1.02)) + 50 + stagger * n_symbols
    slots = session_grid(-(-n_slots // bars_per_day), bars_per_day, start, interval).to_numpy()[:n_slots]
    slot_day = np.arange(n_slots) // bars_per_day
    slot_min = np.arange(n_slots) % bars_per_day
    market = rng.standard_normal(n_slots)
    frames = []
    for j in range(n_symbols):
        keep = np.zeros(n_slots, bool)
        keep[j * stagger:] = True
        drop = rng.random(n_slots) < missing
        drop[j * stagger] = False
        keep &= ~drop
        idx = np.flatnonzero(keep)[:n_bars]
        if len(idx) < n_bars: raise ValueError('internal: not enough slots')
        day = slot_day[idx]
        new_day = np.r_[True, day[1:] != day[:-1]]
        cols = _ohlcv(rng, n_bars, new_day, slot_min[idx], bars_per_day, float(np.exp(rng.uniform(np.log(20), np.log(300)))),
                      vol * rng.uniform(0.6, 1.6), market[idx])
        if zero_volume: cols['volume'][rng.random(n_bars) < zero_volume] = 0.0
        f = pd.DataFrame({'symbol': f'S{j:02d}', 'timestamp': slots[idx], **cols})
        for k in range(extra_columns): f[f'user_{k}'] = rng.standard_normal(n_bars).cumsum() * 0.1
        frames.append(f)
    bars = pd.concat(frames, ignore_index=True)
    bars['symbol'] = bars['symbol'].astype('str')
    bars['timestamp'] = bars['timestamp'].astype('datetime64[ns]')
    return bars.sort_values(['symbol', 'timestamp'], kind='stable').reset_index(drop=True)


def randomise_after(bars: pd.DataFrame, cut, seed: int = 1) -> pd.DataFrame:
    """A copy of `bars` whose rows with timestamp > `cut` get new random prices, volumes and user columns.

    Each symbol's new path starts near its last price before the cut but is otherwise independent of the old
    values; OHLC stays valid and volume non-negative. Rows at or before `cut` are untouched.
    """
    rng = np.random.default_rng(seed)
    out = bars.copy()
    after = (out['timestamp'] > pd.Timestamp(cut)).to_numpy()
    num = [c for c in out.columns if c not in BAR_COLUMNS and pd.api.types.is_numeric_dtype(out[c])]
    for sym, pos in out.groupby('symbol', sort=False).indices.items():
        pos = pos[after[pos]]
        if len(pos) == 0: continue
        n = len(pos)
        p0 = out['close'].iloc[pos[0] - 1] if pos[0] > 0 and out['symbol'].iloc[pos[0] - 1] == sym else 100.0
        p0 *= np.exp(rng.normal(0, 0.05))  # a different level too
        r = rng.normal(0, 3e-3, n)
        log_c = np.log(p0) + np.cumsum(r)
        log_o = log_c - r + rng.normal(0, 1e-3, n)
        hi = np.maximum(log_o, log_c) + np.abs(rng.normal(0, 2e-3, n))
        lo = np.minimum(log_o, log_c) - np.abs(rng.normal(0, 2e-3, n))
        for c, v in (('open', np.exp(log_o)), ('high', np.exp(hi)), ('low', np.exp(lo)), ('close', np.exp(log_c)),
                     ('volume', np.round(np.exp(rng.normal(np.log(5000), 1.5, n))))):
            out.iloc[pos, out.columns.get_loc(c)] = v
        for c in num: out.iloc[pos, out.columns.get_loc(c)] = rng.standard_normal(n) * 3
    return out


def ohlc_walk(rng, n: int, vol: float, start: float | None = None):
    "Open, high, low, close of an `n`-bar walk with occasional jumps and some very wide bars (arrays, drawn from `rng`)."
    start = rng.uniform(20, 200) if start is None else start
    c = start * np.exp(np.cumsum(rng.normal(0, vol, n) + rng.normal(0, 4 * vol, n) * (rng.random(n) < 0.03)))
    o = np.r_[start, c[:-1]] * np.exp(rng.normal(0, vol / 4, n))
    wick = np.abs(rng.normal(0, vol, (2, n))) * np.where(rng.random(n) < 0.04, 8, 1)  # some very wide bars
    return o, np.maximum(o, c) * np.exp(wick[0]), np.minimum(o, c) * np.exp(-wick[1]), c


def ragged_bars(seed: int, n_symbols: int = 4, max_days: int = 5, with_short_symbol: bool = True,
                missing: float = 0.05) -> pd.DataFrame:
    """1-minute bars: random-length sessions (some shorter than a target's horizon), missing bars, halts, nights,
    weekends, a float `user_feature`; with `with_short_symbol`, a symbol 'ZZ' that ends before any window fills."""
    rng = np.random.default_rng(seed)
    frames = []
    for s in range(n_symbols):
        stamps, day = [], pd.Timestamp('2024-01-02')
        for _ in range(rng.integers(2, max_days + 1)):
            length = int(rng.integers(3, 25) if rng.random() < 0.3 else rng.integers(40, 140))
            minutes = np.arange(length)
            if length > 40 and rng.random() < 0.5:  # a halt: 20-40 min (splits) or 5-12 min (does not, at 15)
                cut = rng.integers(10, length - 10)
                minutes = minutes + (minutes >= cut) * (rng.integers(20, 40) if rng.random() < 0.5 else rng.integers(5, 12))
            minutes = minutes[(rng.random(minutes.size) > missing) | (np.arange(minutes.size) < 2)]
            stamps.append(day + pd.Timedelta('9h30min') + pd.to_timedelta(minutes + int(rng.integers(0, 30)), 'min'))
            day += pd.Timedelta(days=int(rng.choice([1, 1, 1, 3, 4])))
        ts = stamps[0].append(stamps[1:])
        o, h, l, c = ohlc_walk(rng, len(ts), rng.uniform(3e-4, 3e-3))
        frames.append(pd.DataFrame({'symbol': f'S{s}', 'timestamp': ts, 'open': o, 'high': h, 'low': l, 'close': c,
                                    'volume': rng.integers(1, 1000, len(ts)).astype(float)}))
    if with_short_symbol:
        ts = pd.date_range('2024-01-05 10:00', periods=12, freq='1min')
        o, h, l, c = ohlc_walk(rng, 12, 1e-3)
        frames.append(pd.DataFrame({'symbol': 'ZZ', 'timestamp': ts, 'open': o, 'high': h, 'low': l, 'close': c,
                                    'volume': 1.0}))
    bars = pd.concat(frames, ignore_index=True)
    bars['timestamp'] = bars['timestamp'].astype('datetime64[ns]')
    bars['user_feature'] = rng.normal(size=len(bars))
    return bars


def config_market_bars(cfg: dict) -> pd.DataFrame:
    "The bars a run of `cfg` embeds: its `data.market` generated for its first target horizon (the oracle dropped)."
    return make_market(**cfg['data']['market'], horizon=int(cfg['targets']['horizons'][0]))[0]


# ---------------------------------------------------------------- close-only frames
def close_walk(n_symbols: int = 10, n_days: int = 10, bars_per_day: int = 60, seed: int = 0, vol: float = 1e-3,
               overnight: float = 0.0) -> pd.DataFrame:
    "`symbol, timestamp, close`: Gaussian log random walks from 100 on full sessions; `overnight` scales a jump at each open."
    rng = np.random.default_rng(seed)
    ts = session_grid(n_days, bars_per_day)
    frames = []
    for i in range(n_symbols):
        r = vol * rng.normal(size=len(ts))
        r[np.arange(len(ts)) % bars_per_day == 0] += overnight * rng.normal(size=n_days)
        frames.append(pd.DataFrame({'symbol': f'S{i:02d}', 'timestamp': ts, 'close': 100 * np.exp(np.cumsum(r))}))
    return pd.concat(frames, ignore_index=True)


def close_layout(seed: int, n_symbols: int = 3, n_ts: int = 400, p_missing: float = 0.2, holes: int = 1,
                 delist: bool = False, daily_break: int = 130) -> pd.DataFrame:
    """`symbol, timestamp, close` minute rows for a few symbols with random missing bars, `holes` long halts per
    symbol, overnight breaks every `daily_break` bars; with `delist`, the first symbol stops trading midway."""
    rng = np.random.default_rng(seed)
    minutes = np.arange(n_ts) + (np.arange(n_ts) // daily_break) * 1000  # a jump every `daily_break` bars
    grid = pd.Timestamp('2024-01-02 09:30') + pd.to_timedelta(minutes, 'min')
    frames = []
    for i in range(n_symbols):
        keep = rng.random(n_ts) >= p_missing
        for _ in range(holes):
            a = rng.integers(0, n_ts); keep[a:a + rng.integers(1, n_ts // 6 + 2)] = False
        if delist and i == 0 and n_symbols > 1: keep[int(rng.uniform(0.3, 0.9) * n_ts):] = False
        frames.append(pd.DataFrame({'symbol': f'S{i}', 'timestamp': grid[keep],
                                    'close': rng.normal(100, 1, keep.sum())}))
    return pd.concat(frames, ignore_index=True)


def check_valid_bars(bars: pd.DataFrame) -> None:
    "Assert `bars` is a canonical, valid OHLCV frame (the generators' own contract)."
    assert list(bars.columns[:7]) == BAR_COLUMNS
    assert isinstance(bars.index, pd.RangeIndex) and bars.index.start == 0
    assert bars['timestamp'].dtype == 'datetime64[ns]'
    assert not bars.duplicated(['symbol', 'timestamp']).any()
    assert bars.sort_values(['symbol', 'timestamp']).index.equals(bars.index)
    o, h, l, c, v = (bars[k].to_numpy() for k in ('open', 'high', 'low', 'close', 'volume'))
    assert np.isfinite(np.c_[o, h, l, c, v]).all() and (l > 0).all()
    assert (l <= np.minimum(o, c)).all() and (h >= np.maximum(o, c)).all() and (v >= 0).all()
