"""Shared test helpers: random canonical bars (realistic minute OHLCV with missing bars and overnight gaps).

`random_bars` and `randomise_after` are plain functions (import them with `from conftest import ...`, or use the
`make_bars` fixture) so that bench/ scripts can reuse them too.
"""
from __future__ import annotations

import os

os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')  # before LightGBM/OpenMP load: spinning threads starve 2 cores

import numpy as np
import pandas as pd
import pytest

BAR_COLUMNS = ['symbol', 'timestamp', 'open', 'high', 'low', 'close', 'volume']


def _session_slots(n_slots: int, start: pd.Timestamp, interval: pd.Timedelta, bars_per_day: int) -> np.ndarray:
    "The first `n_slots` bar timestamps of consecutive weekdays, `bars_per_day` bars a day from `start`'s time of day."
    n_days = n_slots // bars_per_day + 2
    days = pd.bdate_range(start.normalize(), periods=n_days)
    offset = start - start.normalize()
    steps = (offset + pd.to_timedelta(np.arange(bars_per_day) * interval.value, unit="ns")).to_numpy()
    ts = (days.values.astype("datetime64[ns]")[:, None] + steps[None, :]).ravel()
    return ts[:n_slots].astype('datetime64[ns]')


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


def random_bars(n_symbols: int = 4, n_bars: int = 1500, seed: int = 0, *, start: str = '2024-01-02 09:30',
                interval: str = '1min', bars_per_day: int = 390, missing: float = 0.01, stagger: int = 7,
                zero_volume: float = 0.002, vol: float = 1e-3, extra_columns: int = 0) -> pd.DataFrame:
    """Canonical random bars: `n_symbols` symbols of `n_bars` rows each (minute bars over several weekdays).

    Each symbol drops a random `missing` fraction of its slots (different bars per symbol), symbol `j` starts
    `j*stagger` bars after the first, a `zero_volume` fraction of bars trade nothing, prices follow a t-distributed
    log random walk with a common market factor, a U-shaped intraday volatility and overnight gaps. Always valid:
    low <= open, close <= high, volume >= 0. `extra_columns` adds float64 user columns `user_0`, ...
    """
    rng = np.random.default_rng(seed)
    interval = pd.Timedelta(interval)
    start = pd.Timestamp(start)
    n_slots = int(np.ceil(n_bars / (1 - missing) * 1.02)) + 50 + stagger * n_symbols
    slots = _session_slots(n_slots, start, interval, bars_per_day)
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


@pytest.fixture
def make_bars():
    "The `random_bars` function, as a fixture."
    return random_bars
