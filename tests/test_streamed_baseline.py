"""The all-features baseline streamed from the partitioned feature store: the same model as from the in-memory
frame, one partition in memory at a time; and `fit_lgbm` (`lightgbm.train`) is the model `LGBMRegressor` gives."""
from __future__ import annotations

import subprocess
import sys
import weakref

import lightgbm as lgb
import numpy as np
import pandas as pd
import pytest

from pipeline_lib.features.store import build_store
from pipeline_lib.models.store_rows import StoreRows
from pipeline_lib.models import tabular
from pipeline_lib.models.tabular import LGBM_FIXED, LGBM_PARAMS, fit_lgbm
from pipeline_lib.phases.training import fit_models, predict_all
from synthetic import realistic_bars

# LightGBM samples 700 of the ~2600 training rows for its bin boundaries, so the sampling pass skips rows and
# partitions; bagging (subsample 0.75) and column sampling (0.8) stay on, so the seed matters.
PARAMS = {'min_child_samples': 100, 'n_estimators': 150, 'subsample_for_bin': 700}


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    """A store of 4 symbols x 1500 bars in 8 partitions (each symbol in two of 750 rows), its features in memory, a
    learnable target and the blocks: train in each symbol's first partition, valid and test in its second."""
    bars = realistic_bars(4, 1500, seed=3)
    store = build_store(bars, cache_dir=tmp_path_factory.mktemp('store'), partition_rows=1000, progress=False)
    F = store.read()
    close = bars.groupby('symbol')['close']
    fwd = (close.shift(-5) / bars['close'] - 1).to_numpy()             # NaN at each symbol's last 5 bars
    y = pd.Series(fwd + 0.5 * F['kbar_kmid'].to_numpy(), name='y')
    y.iloc[::13] = np.nan                                               # and some rows inside every block
    pos = bars.groupby('symbol').cumcount().to_numpy()
    blocks = {k: np.flatnonzero((pos >= a) & (pos < b)) for k, (a, b) in
              {'train': (0, 700), 'valid': (800, 1100), 'test': (1150, 1500)}.items()}
    return store, F, y, blocks


def test_store_has_several_partitions(data):
    store, F, _, blocks = data
    assert len(store.partitions) == 8 and F.shape == (6000, len(store.columns)) and len(store.columns) > 400
    assert all(len(StoreRows(store).iloc[rows].partitions()) == 4 for rows in blocks.values())


def test_fit_lgbm_is_the_lgbmregressor_model():
    "lightgbm.train with the config's scikit-learn parameter names gives what LGBMRegressor.fit gave (the old path)."
    rng = np.random.default_rng(0)
    X = pd.DataFrame(rng.normal(size=(8000, 12)).astype(np.float32), columns=[f'x{j}' for j in range(12)])
    X[X > 2.5] = np.nan
    y = (X['x0'].fillna(0) + 0.5 * X['x1'].fillna(0) + rng.normal(size=len(X))).to_numpy(copy=True)
    y[::17] = np.nan
    tr, va = slice(0, 6000), slice(6000, None)
    params = {'min_child_samples': 50, 'n_estimators': 300, 'subsample_for_bin': 1500}   # bins from a seeded sample
    fit = fit_lgbm(X[tr], y[tr], X[va], y[va], params=params, seed=5, num_threads=2, early_stopping_rounds=20)

    p = {**LGBM_PARAMS, **params, **LGBM_FIXED, 'random_state': 5, 'n_jobs': 2}
    ktr, kva = np.isfinite(y[tr]), np.isfinite(y[va])
    Atr, ytr = X[tr].to_numpy()[ktr], y[tr][ktr]
    Ava, yva = X[va].to_numpy()[kva], y[va][kva]
    ref = lgb.LGBMRegressor(**p)
    ref.fit(Atr, ytr, eval_X=(Atr, Ava), eval_y=(ytr, yva), eval_names=['train', 'valid'],
            feature_name=[f'f{j}' for j in range(12)], categorical_feature='auto',
            callbacks=[lgb.early_stopping(20, first_metric_only=True, verbose=False)])

    assert 1 < fit.best_iteration == ref.best_iteration_ < fit.n_iterations
    assert fit.evals_result == ref.evals_result_
    assert np.array_equal(fit.predict(X[va]), ref.booster_.predict(X[va].to_numpy(), num_iteration=ref.best_iteration_))
    assert fit.booster.model_to_string() == ref.booster_.model_to_string()


def test_streamed_baseline_is_the_in_memory_model(data):
    "Same trees, curves and predictions (exactly, not only to 1e-6) from StoreRows as from the DataFrame."
    store, F, y, b = data
    rows = StoreRows(store)
    mem = fit_lgbm(F.iloc[b['train']], y.iloc[b['train']], F.iloc[b['valid']], y.iloc[b['valid']], params=PARAMS, seed=1)
    streamed = fit_lgbm(rows.iloc[b['train']], y.iloc[b['train']], rows.iloc[b['valid']], y.iloc[b['valid']],
                        params=PARAMS, seed=1)
    assert streamed.n_train == mem.n_train < len(b['train'])            # the NaN-target rows are left out of both
    assert streamed.best_iteration == mem.best_iteration > 1 and streamed.evals_result == mem.evals_result
    assert streamed.booster.model_to_string() == mem.booster.model_to_string()
    for k in ('valid', 'test'):
        a, m = streamed.predict(rows.iloc[b[k]]), mem.predict(F.iloc[b[k]])
        assert np.array_equal(a, m) and np.abs(a - m).max() <= 1e-6 and np.ptp(a) > 0


def _watch_reads(monkeypatch) -> list:
    "Record every StoreRows.read as (first, last row) and check no matrix an earlier read returned is still alive."
    reads, alive, original = [], [], StoreRows.read

    def read(self, a, b):
        assert all(r() is None for r in alive), 'a partition read earlier is still in memory'
        out = original(self, a, b)
        reads.append((int(self.rows[a]), int(self.rows[b - 1])))
        alive.append(weakref.ref(out))
        return out
    monkeypatch.setattr(StoreRows, 'read', read)
    return reads


def _partition_of(store, first: int, last: int) -> int:
    (k,) = [k for k, p in enumerate(store.partitions) if p['lo'] <= first <= last < p['hi']]
    return k


def test_one_partition_at_a_time(data, monkeypatch):
    "Training reads each partition at most twice (bins, then rows), validation and predictions once, one at a time."
    store, _, y, b = data
    rows = StoreRows(store)
    reads = _watch_reads(monkeypatch)
    fit = fit_lgbm(rows.iloc[b['train']], y.iloc[b['train']], params=PARAMS, seed=1)
    train_parts = [_partition_of(store, *r) for r in reads]
    assert sorted(set(train_parts)) == [0, 2, 4, 6] and all(train_parts.count(k) == 2 for k in set(train_parts))
    assert train_parts[4:] == [0, 2, 4, 6]                            # the second pass pushes the rows in order

    reads.clear()
    fit_lgbm(rows.iloc[b['train']], y.iloc[b['train']], rows.iloc[b['valid']], y.iloc[b['valid']], params=PARAMS, seed=1)
    assert [_partition_of(store, *r) for r in reads][-4:] == [1, 3, 5, 7]   # validation rows: binned with train's bins

    reads.clear()
    pred = fit.predict(rows.iloc[b['test']])
    assert [_partition_of(store, *r) for r in reads] == [1, 3, 5, 7] and len(pred) == len(b['test'])


def test_fit_models_and_predict_all_take_the_store(data):
    "Phase 2's training: the baseline from the FeatureStore (or StoreRows) equals the baseline from the DataFrame."
    store, F, y, b = data
    n = store.n_rows
    split = np.full(n, 'gap', dtype=object)
    for k, rows in b.items(): split[rows] = k
    targets = pd.DataFrame({'fwd_ret_5': y.to_numpy()})
    ts = np.arange(n)                                                  # one row per timestamp: nothing to demean
    opts = {'demean_returns': False, 'seed': 2, 'lightgbm': {**PARAMS, 'early_stopping_rounds': 20}}
    X = pd.DataFrame(index=range(n))                                   # Phase 1's features: unused by the baseline
    args = (targets, split, ts, opts, ['baseline_all_features'], ['fwd_ret_5'], [])
    mem = fit_models(X, F, *args, progress=False)
    streamed = fit_models(X, store, *args, progress=False)
    assert streamed.baseline['fwd_ret_5'].booster.model_to_string() == mem.baseline['fwd_ret_5'].booster.model_to_string()
    scored = np.flatnonzero(split != 'gap')
    p_mem = predict_all(mem, X.iloc[scored], F.iloc[scored], ['baseline_all_features'])
    p_rows = predict_all(streamed, X.iloc[scored], StoreRows(store).iloc[scored], ['baseline_all_features'])
    p_store = predict_all(streamed, X, store, ['baseline_all_features'])['baseline_all_features__fwd_ret_5']
    assert np.array_equal(p_rows['baseline_all_features__fwd_ret_5'], p_mem['baseline_all_features__fwd_ret_5'])
    assert np.array_equal(p_store[scored], p_mem['baseline_all_features__fwd_ret_5']) and len(p_store) == n


def mapped_kb(path) -> int:
    "Resident kB of this process's maps of the file `path`, from /proc/self/smaps (a header line per map, then its fields)."
    kb, inside = 0, False
    for line in open('/proc/self/smaps'):
        first = line.split(maxsplit=1)[0] if line.strip() else ''
        if '-' in first and not first.endswith(':'): inside = line.rstrip().endswith(str(path))
        elif inside and first == 'Rss:': kb += int(line.split()[1])
    return kb


def test_predictions_in_blocks_equal_one_call(monkeypatch, tmp_path):
    """Phase 2 predicts a block of rows at a time; for each model the blocks give the values of one call. On a
    memory-mapped X (the compact store) too, and no page of its file stays resident after each block."""
    from pipeline_lib.models.multitask import MultiTaskModel
    from pipeline_lib.models.tabular import fit_lgbm, fit_ridge
    from pipeline_lib.phases import training
    rng = np.random.default_rng(0)
    X = pd.DataFrame(rng.normal(size=(40_000, 6)).astype('float32'), columns=[f'c{i}' for i in range(6)])
    y = pd.Series(0.2 * X['c0'].to_numpy() + rng.normal(size=len(X)))
    tr, va = slice(0, 20_000), slice(20_000, 30_000)
    ridge = fit_ridge(X[tr], y[tr], X[va], y[va])
    lgbm = fit_lgbm(X[tr], y[tr], X[va], y[va], params={'n_estimators': 20})
    net = MultiTaskModel(['fwd_ret_5m'], hidden=(8,), epochs=1, seed=0).fit(X[tr], pd.DataFrame({'fwd_ret_5m': y[tr]}))
    whole = {'ridge': ridge.predict(X), 'lightgbm': lgbm.predict(X), 'net': net.predict(X)['fwd_ret_5m'].to_numpy()}
    monkeypatch.setattr(training, 'PREDICT_ROWS', 16_384)   # blocks that cut the 40,000 rows where a network batch ends
    assert np.array_equal(training.in_blocks(net.predict, X)['fwd_ret_5m'].to_numpy(), whole['net'])
    monkeypatch.setattr(training, 'PREDICT_ROWS', 7_001)    # any block size for row-wise models
    assert np.array_equal(training.in_blocks(ridge.predict, X), whole['ridge'])
    assert np.array_equal(training.in_blocks(lgbm.predict, X), whole['lightgbm'])
    rows = np.r_[30_000:40_000, 5:20_000:3]    # by position (the ensemble's validation rows): as on a copy of those rows
    for name, model in [('ridge', ridge), ('lightgbm', lgbm)]:
        assert np.array_equal(training.in_blocks(model.predict, X, rows), whole[name][rows])
    monkeypatch.setattr(training, 'PREDICT_ROWS', 16_384)   # the network's float sums depend on its batches: same batches
    got, copied = training.in_blocks(net.predict, X, rows), training.in_blocks(net.predict, X.iloc[rows])
    assert np.array_equal(got.index.to_numpy(), rows) and np.array_equal(got.to_numpy(), copied.to_numpy())
    assert np.allclose(got['fwd_ret_5m'].to_numpy(), whole['net'][rows], atol=1e-6)
    np.save(tmp_path/'X.npy', np.ascontiguousarray(X.to_numpy()))   # row-major, as the compact store
    mapped = pd.DataFrame(np.load(tmp_path/'X.npy', mmap_mode='c'), columns=X.columns, copy=False)   # as Phase 2's X
    assert np.array_equal(training.in_blocks(net.predict, mapped).to_numpy(), training.in_blocks(net.predict, X).to_numpy())
    for name, model in [('ridge', ridge), ('lightgbm', lgbm)]:
        float(mapped.iloc[:, 0].sum())                      # every page resident, as after any pass over the rows
        assert sys.platform != 'linux' or mapped_kb(tmp_path/'X.npy') > 0.9 * X.to_numpy().nbytes / 1024
        assert np.array_equal(training.in_blocks(model.predict, mapped), whole[name])
        assert sys.platform != 'linux' or mapped_kb(tmp_path/'X.npy') == 0


# Run in a fresh interpreter: how glibc lays out the heap depends on everything the process did before, and in a
# long-lived one (pytest's) the freed blocks may already sit where glibc returns them by itself.
HEAP_KEPT = r"""
import ctypes, ctypes.util
from pipeline_lib.models.tabular import release_freed_memory
def anon(): return next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('RssAnon:'))
libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
size, blocks, pins = 64 * 1024, [], []    # under glibc's mmap threshold: from the heap, not maps of their own
for _ in range(3000):                     # each with a live block above it: the heap cannot shrink from its top
    blocks.append(libc.malloc(size)); pins.append(libc.malloc(64)); ctypes.memset(blocks[-1], 1, size)
for b in blocks: libc.free(b)
held = anon()
print(int(release_freed_memory()), held - anon())
"""


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason="glibc's malloc_trim; /proc")
def test_release_freed_memory_hands_back_what_the_heap_kept():
    """Freed blocks below live ones stay resident in glibc's heap (as LightGBM's freed bins and bin sample do) until
    `release_freed_memory` trims it: most of 190 MB of freed 64 KB blocks must leave the process."""
    out = subprocess.run([sys.executable, '-c', HEAP_KEPT], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == '1' and int(out[1]) > 150 * 2**20, out


def test_fit_lgbm_releases_what_lightgbm_freed(data, monkeypatch):
    "Every fit hands LightGBM's freed memory back (the baseline's 1.2 GB at 0.6M rows otherwise stays resident)."
    store, F, y, blocks = data
    calls = []
    monkeypatch.setattr(tabular, 'release_freed_memory', lambda: calls.append(1) or True)
    tr, va = blocks['train'], blocks['valid']
    fit_lgbm(StoreRows(store).iloc[tr], y.iloc[tr], StoreRows(store).iloc[va], y.iloc[va], params=PARAMS)
    assert calls == [1]
