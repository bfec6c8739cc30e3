"""Properties of the run's split and of the walk-forward folds, checked against brute-force window computations."""
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pipeline_lib.core.config import PipelineError
from pipeline_lib.data.load import DataError
from pipeline_lib.data.splits import make_split, purged_walk_forward, split_summary
from synthetic import close_layout


def label_ends(bars, horizon):
    "Brute force: the timestamp `horizon` rows later in the symbol, or the symbol's last timestamp (truncated)."
    g = bars.groupby('symbol', sort=False)['timestamp']
    return bars['timestamp'].groupby(bars['symbol']).shift(-horizon).fillna(g.transform('max')) if horizon else bars['timestamp']


def check_split(bars, split, horizon, lookback):
    ts = bars['timestamp']
    end = label_ends(bars, horizon)
    rows = {k: (split == k).to_numpy() for k in ('train', 'valid', 'test')}
    # label windows [t, end] never overlap across splits (train < valid < test in time)
    for early, late in (('train', 'valid'), ('train', 'test'), ('valid', 'test')):
        assert ts[rows[early]].max() < ts[rows[late]].min()
        assert end[rows[early]].max() < ts[rows[late]].min(), (early, late)
    # the lookback rows before a valid/test row are of its own split or gap
    for lag in range(1, lookback + 1):
        prev = split.groupby(bars['symbol']).shift(lag)
        for k in ('valid', 'test'):
            bad = rows[k] & prev.notna().to_numpy() & ~prev.isin([k, 'gap']).to_numpy()
            assert not bad.any(), (k, lag, bars[bad].head())
    # each block gap spans at least horizon + lookback unique timestamps
    u = np.unique(ts)
    for early, late in (('train', 'valid'), ('valid', 'test')):
        between = np.searchsorted(u, ts[rows[late]].min()) - np.searchsorted(u, ts[rows[early]].max()) - 1
        assert between >= horizon + lookback


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(seed=st.integers(0, 10_000), n_symbols=st.integers(1, 4), n_ts=st.integers(120, 500),
       p_missing=st.sampled_from([0.0, 0.05, 0.3, 0.6]), holes=st.integers(0, 2), delist=st.booleans(),
       horizon=st.integers(0, 12), lookback=st.integers(0, 12),
       fracs=st.sampled_from([(0.6, 0.2, 0.2), (0.5, 0.25, 0.25), (0.7, 0.15, 0.15), (0.34, 0.33, 0.33)]))
def test_split_never_leaks_across_splits(seed, n_symbols, n_ts, p_missing, holes, delist, horizon, lookback, fracs):
    bars = close_layout(seed, n_symbols, n_ts, p_missing, holes, delist)
    try:
        split = make_split(bars, *fracs, horizon=horizon, lookback=lookback)
    except PipelineError as e:  # only for data too short for the gaps, or that leaves a split with no rows at all
        short = bars.timestamp.nunique() < 2 * (horizon + lookback) + 15
        assert 'no rows left after purging' in str(e) or (short and 'Too little data' in str(e)), str(e)
        assume(False)
    assert split.name == 'split' and split.index.equals(bars.index)
    assert set(split.unique()) <= {'train', 'valid', 'test', 'gap'}
    check_split(bars, split, horizon, lookback)


@pytest.mark.parametrize('seed', range(8))
def test_reasonable_data_gives_nonempty_splits_in_proportion(seed):
    bars = close_layout(seed, n_symbols=5, n_ts=2000, p_missing=0.1, holes=1)
    split = make_split(bars, horizon=30, lookback=32)
    check_split(bars, split, 30, 32)
    n = split.value_counts()
    assert min(n['train'], n['valid'], n['test']) > 0
    n_ts = bars.timestamp.groupby(split).nunique()  # fractions are of timestamps, not rows
    assert 2.8 < n_ts['train'] / n_ts['valid'] < 3.2 and 0.9 < n_ts['valid'] / n_ts['test'] < 1.1


def test_full_grid_needs_no_purge_and_gaps_are_exact():
    bars = close_layout(0, n_symbols=3, n_ts=300, p_missing=0.0, holes=0)
    split = make_split(bars, 0.6, 0.2, 0.2, horizon=5, lookback=7)
    assert split.attrs['purged_rows'] == 0
    per_ts = split.groupby(bars['timestamp']).agg(lambda s: s.unique().tolist())
    assert per_ts.map(len).eq(1).all()  # on a full grid every timestamp is one block for all symbols
    blocks = per_ts.map(lambda v: v[0])
    runs = blocks.ne(blocks.shift()).cumsum()
    assert blocks.groupby(runs).first().tolist() == ['train', 'gap', 'valid', 'gap', 'test']
    assert blocks.groupby(runs).size().tolist() == [166, 12, 55, 12, 55]  # 276 usable -> 60/20/20


def test_split_depends_only_on_symbol_and_timestamp():
    bars = close_layout(3, n_symbols=4, n_ts=600, p_missing=0.3)
    split = make_split(bars, horizon=8, lookback=6)
    assert split.equals(make_split(bars, horizon=8, lookback=6))
    noisy = bars.assign(close=np.random.default_rng(1).normal(size=len(bars)), fwd_ret_5m=1.0)
    assert split.equals(make_split(noisy, horizon=8, lookback=6))
    # row order does not matter: shuffle, split, map back by (symbol, timestamp)
    perm = np.random.default_rng(2).permutation(len(bars))
    shuffled = bars.iloc[perm].reset_index(drop=True)
    s2 = make_split(shuffled, horizon=8, lookback=6)
    back = pd.Series(s2.to_numpy(), index=perm).sort_index()
    assert (back.to_numpy() == split.to_numpy()).all()
    # tz-aware timestamps give the same split
    assert make_split(bars.assign(timestamp=bars.timestamp.dt.tz_localize('UTC')), horizon=8, lookback=6).equals(split)


def test_purge_catches_a_halt_across_the_boundary():
    "A symbol halted across the train|valid gap: its last train labels and first valid lookbacks reach across."
    bars = close_layout(0, n_symbols=2, n_ts=500, p_missing=0.0, holes=0)
    plain = make_split(bars, horizon=10, lookback=10)
    ts = bars.timestamp
    first_valid = ts[plain == 'valid'].min()
    u = np.unique(ts); i = np.searchsorted(u, first_valid)
    halt = (bars.symbol == 'S1') & ts.between(u[i - 25], u[i + 5])  # wider than the 20-timestamp gap
    halted = bars[~halt].reset_index(drop=True)
    split = make_split(halted, horizon=10, lookback=10)
    check_split(halted, split, 10, 10)
    s1 = halted.symbol == 'S1'
    before, after = halted.timestamp < u[i - 25], halted.timestamp > u[i + 5]
    assert (split[s1 & before].tail(10) == 'gap').all() and split[s1 & before].iloc[-11] == 'train'
    assert (split[s1 & after].head(10) == 'gap').all() and split[s1 & after].iloc[10] == 'valid'
    assert (split[~s1] == plain[bars.symbol != 'S1'].to_numpy()).all()  # the other symbol is untouched


@pytest.mark.parametrize('kwargs, match', [
    (dict(train=0.7, valid=0.2, test=0.2), 'sum to 1'),
    (dict(train=0.8, valid=0.3, test=None), 'implied'),
    (dict(train=0, valid=0.5, test=0.5), 'strictly between'),
    (dict(train='0.6'), 'strictly between'),
    (dict(horizon=-1), 'horizon'),
    (dict(lookback=2.5), 'lookback'),
    (dict(horizon=100, lookback=100), r'400 unique timestamps available.*need at least 403'),
])
def test_bad_arguments_raise(kwargs, match):
    bars = close_layout(0, n_symbols=2, n_ts=400, p_missing=0.0, holes=0)
    with pytest.raises(PipelineError, match=match):
        make_split(bars, **kwargs)


def test_implied_test_fraction_and_bad_bars():
    bars = close_layout(0, n_symbols=2, n_ts=400, p_missing=0.0, holes=0)
    assert make_split(bars, 0.6, 0.2, None, 5, 5).equals(make_split(bars, 0.6, 0.2, 0.2, 5, 5))
    with pytest.raises(DataError, match="row 3"):
        make_split(bars.assign(timestamp=bars.timestamp.where(bars.index != 3)), horizon=5, lookback=5)
    with pytest.raises(DataError, match="'symbol'"):
        make_split(bars.drop(columns='symbol'))


def test_split_summary_accounts_for_every_row():
    bars = close_layout(5, n_symbols=3, n_ts=600, p_missing=0.2)
    split = make_split(bars, horizon=5, lookback=5)
    summ = split_summary(split, bars)
    assert list(summ.index) == ['train', 'valid', 'test', 'gap']
    assert summ['rows'].sum() == len(bars) and summ.loc['train', 'rows'] == (split == 'train').sum()
    assert summ.loc['train', 'last'] < summ.loc['valid', 'first'] and summ.loc['valid', 'last'] < summ.loc['test', 'first']
    assert summ.loc['train', 'days'] == bars.timestamp[split == 'train'].dt.date.nunique()
    with pytest.raises(PipelineError, match='not aligned'):
        split_summary(split.iloc[1:], bars)


def wf_label_ends(ts, symbols, horizon):
    "Brute force for the folds: `horizon` rows later in the symbol among the given rows; open-ended at the end."
    df = pd.DataFrame({'t': ts, 's': symbols})
    end = df.groupby('s')['t'].shift(-horizon)
    return end.fillna(pd.Timestamp('2200-01-01')) if horizon else df['t']


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(seed=st.integers(0, 10_000), n_symbols=st.integers(1, 4), n_ts=st.integers(100, 400),
       p_missing=st.sampled_from([0.0, 0.2, 0.5]), holes=st.integers(0, 2), delist=st.booleans(),
       n_folds=st.integers(1, 6),
       horizon=st.integers(0, 10), embargo=st.integers(0, 5), expanding=st.booleans(),
       min_train_frac=st.sampled_from([0.3, 0.5, 0.7]))
def test_walk_forward_folds_are_purged(seed, n_symbols, n_ts, p_missing, holes, delist, n_folds, horizon, embargo,
                                       expanding, min_train_frac):
    "A symbol that stops inside the rows given has open-ended label windows: what follows is not in view."
    bars = close_layout(seed, n_symbols, n_ts, p_missing, holes, delist)
    ts, sym = bars['timestamp'].to_numpy(), bars['symbol'].to_numpy()
    try:
        folds = list(purged_walk_forward(bars['timestamp'], bars['symbol'], n_folds=n_folds, horizon=horizon,
                                         embargo=embargo, expanding=expanding, min_train_frac=min_train_frac))
    except PipelineError as e:
        assert 'no training rows' in str(e) or 'Too few timestamps' in str(e)
        assume(False)
    assert len(folds) == n_folds
    end = wf_label_ends(ts, sym, horizon).to_numpy()
    u = np.unique(ts)
    prev_train = None
    for tr, va in folds:
        assert tr.dtype == np.int64 and len(tr) and len(va) and len(np.intersect1d(tr, va)) == 0
        v0 = ts[va].min()
        assert ts[tr].max() < v0
        assert end[tr].max() < v0  # no training label window reaches the fold's valid rows
        # at least `embargo` unique timestamps between the last training label and the valid block
        assert np.searchsorted(u, v0) - np.searchsorted(u, end[tr].max(), side='right') >= embargo
        # a fold's valid rows are all rows in its time block
        assert np.array_equal(va, np.flatnonzero((ts >= v0) & (ts <= ts[va].max())))
        if expanding and prev_train is not None:
            assert np.isin(prev_train, tr).all()
        prev_train = tr
    # valid blocks follow each other and together cover everything after the initial training period
    starts = [ts[va].min() for _, va in folds]
    assert starts == sorted(starts)
    allv = np.sort(np.concatenate([va for _, va in folds]))
    assert np.array_equal(allv, np.flatnonzero(ts >= starts[0]))


def test_walk_forward_rolling_window_is_fixed_and_symbols_matter():
    bars = close_layout(1, n_symbols=3, n_ts=400, p_missing=0.3, holes=1)
    ts = bars['timestamp'].to_numpy()
    u = np.unique(ts)
    for tr, va in purged_walk_forward(bars.timestamp, bars.symbol, n_folds=4, horizon=5, expanding=False,
                                      min_train_frac=0.4):
        assert np.searchsorted(u, ts[va].min()) - np.searchsorted(u, ts[tr].min()) <= round(0.4 * len(u))
    # counting the horizon in the symbol's own bars purges more than counting unique timestamps
    with_sym = [len(tr) for tr, _ in purged_walk_forward(bars.timestamp, bars.symbol, horizon=10)]
    without = [len(tr) for tr, _ in purged_walk_forward(bars.timestamp, horizon=10)]
    assert all(a <= b for a, b in zip(with_sym, without)) and sum(with_sym) < sum(without)


def test_walk_forward_errors_are_eager():
    t = pd.Series(pd.date_range('2024-01-02', periods=20, freq='min'))
    with pytest.raises(PipelineError, match='Too few timestamps'):
        purged_walk_forward(t, n_folds=15)
    with pytest.raises(PipelineError, match='no training rows'):
        purged_walk_forward(t, n_folds=2, horizon=12, min_train_frac=0.5)
    with pytest.raises(PipelineError, match='min_train_frac'):
        purged_walk_forward(t, min_train_frac=1.0)
