"""Phase 1 on an honest sample of the training rows, and the transform streamed a partition at a time."""
import dataclasses

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
