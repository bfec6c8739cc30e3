"""Phase 1 on an honest sample of the training rows, and the transform streamed a partition at a time."""
import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline_lib.core.config import load_config
from pipeline_lib.phases.run_data import prepare_run_data
from pipeline_lib.phases.streaming import sample_training_rows, transform_rows

QUICK = 'configs/quick.yaml'


def _grid(n_symbols, n_bars, seed=0):
    "Symbols on one minute grid, shuffled so the sample cannot rely on their order."
    ts = pd.date_range('2024-01-02 09:30', periods=n_bars, freq='min')
    names = np.random.default_rng(seed).permutation([f'S{i:03d}' for i in range(n_symbols)])
    return pd.DataFrame({'symbol': np.repeat(names, n_bars), 'timestamp': np.tile(ts, n_symbols)})


def test_sample_is_training_rows_only_whole_symbols_over_one_time_range():
    bars = _grid(30, 400)
    train = np.flatnonzero(np.tile(np.arange(400) < 250, 30))   # the first 250 bars of each symbol
    kept, info = sample_training_rows(bars, train, 2_000, seed=1)
    assert 0 < len(kept) <= 2_000 and info['rows'] == len(kept) and info['sampled']
    assert np.isin(kept, train).all(), 'a row outside the training rows was sampled'
    sub = bars.iloc[kept]
    spans = sub.groupby('symbol')['timestamp'].agg(['min', 'max', 'size'])
    assert spans['min'].nunique() == 1 and spans['max'].nunique() == 1, 'the kept symbols do not share one time range'
    assert (spans['max'] == bars['timestamp'].iloc[train].max()).all(), 'the time range is not the latest training one'
    assert (spans['size'] == spans['size'].iloc[0]).all()   # whole symbols: every kept symbol has every bar of the range
    assert info['symbols'] == len(spans) < 30
    again, _ = sample_training_rows(bars, train, 2_000, seed=1)
    assert np.array_equal(kept, again), 'the sample is not a function of its seed'
    other, _ = sample_training_rows(bars, train, 2_000, seed=2)
    assert not np.array_equal(kept, other)


def test_no_cap_or_a_cap_above_the_rows_keeps_every_training_row():
    bars = _grid(4, 100)
    train = np.arange(0, 400, 2)
    for cap in (None, 200, 10**9):
        kept, info = sample_training_rows(bars, train, cap)
        assert np.array_equal(kept, train) and not info['sampled']


@pytest.fixture(scope='module')
def quick_data():
    cfg = load_config(QUICK)
    return cfg, prepare_run_data(cfg, progress=False)


@pytest.mark.e2e
def test_phase1_fits_on_at_most_max_rows_training_rows_and_reports_them(quick_data, tmp_path, monkeypatch):
    from pipeline_lib.phases import phase1
    cfg, rd = quick_data
    seen = []
    real_fit = phase1.FeatureTransformer.fit
    def spy(self, features, y=None, **kw):
        seen.append(len(features)); return real_fit(self, features, y, **kw)
    monkeypatch.setattr(phase1.FeatureTransformer, 'fit', spy)
    cap = len(rd.rows('train')) // 3
    capped = {**cfg, 'phase1': {**cfg['phase1'], 'max_rows': cap}}
    res = phase1.run_phase1(capped, artifact_root=tmp_path, reports_dir=tmp_path / 'reports', run_data=rd, progress=False)
    sample = res.metrics['fit_sample']
    assert seen == [sample['rows']] and sample['rows'] <= cap and sample['sampled']
    assert sample['of_rows'] == len(rd.rows('train'))
    # every row is transformed with the sample's fit, whatever rows it was fitted on
    assert len(res.transformed) == len(rd.bars)


@pytest.mark.e2e
def test_streamed_transform_equals_one_call_on_the_whole_frame(quick_data, tmp_path):
    """One partition is one call, bit for bit. Other chunks give the same selected columns and regimes; the VAE's
    latent columns agree to float32 rounding, because torch's matrix products on CPU pick kernels by batch size."""
    from pipeline_lib.phases.phase1 import fit_phase1
    cfg, rd = quick_data
    ft = fit_phase1(cfg, rd, rd.rows('train'))
    whole = ft.transform(rd.features).to_numpy(np.float32)
    assert len(rd.store.partitions) == 1 and np.array_equal(transform_rows(ft, rd), whole)
    in_memory = dataclasses.replace(rd, store=None, frame=rd.features)
    rows = np.sort(np.random.default_rng(0).choice(len(rd.bars), 700, replace=False))
    part = transform_rows(ft, in_memory, rows, chunk_rows=97)
    n = ft.n_selected_
    assert np.array_equal(part[:, :n], whole[rows, :n]) and np.array_equal(part[:, -1], whole[rows, -1])
    np.testing.assert_allclose(part[:, n:-1], whole[rows, n:-1], rtol=1e-5, atol=1e-6)


@pytest.mark.e2e
def test_phase1_writes_the_compact_store_that_later_phases_map_and_a_new_fit_gets_its_own(tmp_path):
    """Phase 1 streams its N + 11 columns into the compact store keyed by its manifest hash; the transformer that
    Phases 2 and 3 load finds that same file (not rebuilt) with the same values. Another Phase 1 manifest gets another
    store; a feature store keeps its two most recent; a damaged file or one without its sidecar is rebuilt, never read."""
    import os, time
    from pipeline_lib.core.writer import manifest_sha256
    from pipeline_lib.phases.phase1 import load_phase1, run_phase1
    from pipeline_lib.phases.streaming import COMPACT_FILE, COMPACT_META, compact_dir, compact_rows
    cfg = load_config(QUICK)
    rd = prepare_run_data(cfg, cache_dir=tmp_path / 'cache', progress=False)
    res = run_phase1(cfg, artifact_root=tmp_path / 'run', run_data=rd, progress=False)
    folder = compact_dir(res.transformer, rd)
    assert folder.parent == tmp_path / 'cache' / 'compact' and (folder / COMPACT_META).exists()
    written = (folder / COMPACT_FILE).stat().st_mtime_ns
    ft = load_phase1(tmp_path / 'run' / 'metadata', cfg, 2, rd.fingerprint)
    X = compact_rows(ft, rd)
    assert isinstance(X, np.memmap) and Path(X.filename) == folder / COMPACT_FILE
    assert (folder / COMPACT_FILE).stat().st_mtime_ns == written, 'the compact store was rebuilt instead of mapped'
    expected = res.transformed.to_numpy(np.float32, copy=True)   # not a view of the mapped file damaged below
    assert np.array_equal(X, expected, equal_nan=True)
    assert np.array_equal(X, ft.transform(rd.features).to_numpy(np.float32), equal_nan=True)
    del X

    # a damaged file is refused and rebuilt; a file without its sidecar (a build killed in between) is never read
    with open(folder / COMPACT_FILE, 'r+b') as f: f.seek(-4, os.SEEK_END); f.write(np.float32(123.0).tobytes())
    with pytest.warns(UserWarning, match='does not match the SHA-256'):
        assert np.array_equal(compact_rows(ft, rd), expected, equal_nan=True)
    (folder / COMPACT_META).unlink()
    np.save(folder / COMPACT_FILE, np.zeros(expected.shape, np.float32))
    assert np.array_equal(compact_rows(ft, rd), expected, equal_nan=True)

    # other Phase 1 manifests (here the same fit saved under other run names) key other stores; two are kept
    folders = [folder]
    for k in range(3):
        time.sleep(0.01)
        other = load_phase1(tmp_path / 'run' / 'metadata', cfg, 2, rd.fingerprint)
        meta = dict(other.manifest_['meta'], run_name=f'other{k}')
        m = other.save(tmp_path / f'other{k}', meta)
        other.manifest_sha256_ = manifest_sha256(tmp_path / f'other{k}', m)
        compact_rows(other, rd)
        folders.append(compact_dir(other, rd))
    assert len(set(folders)) == 4
    assert sorted(p.name for p in (tmp_path / 'cache' / 'compact').iterdir()) == sorted(f.name for f in folders[-2:])
