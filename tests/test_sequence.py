"""Lookback windows and sequence models (pipeline_lib.models.sequence, .sequence_nets): windows never cross symbols or splits, a window's last
row is its target row, windows are views into one array, the models learn what only a window can tell, configs are
checked, and state dicts round-trip with weights_only=True."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from pipeline_lib.core.config import PipelineError
from pipeline_lib.data.load import DataError
from pipeline_lib.models.sequence import (WindowDataset, batch_loader, fit_record, fit_sequence_model, model_from_state,
                                   predict_windows, resolve_threads, symbol_starts, window_ends, window_mask)
from pipeline_lib.models.sequence_nets import MODELS, POOLINGS, build_model, model_config, receptive_field

FAST = {'device': 'cpu', 'num_threads': 1}


def random_layout(seed=0, n_sym=4, lo=20, hi=60):
    "Symbols of random lengths, each with its own train | gap | valid | gap | test labels (and a few gaps inside)."
    rng = np.random.default_rng(seed)
    sym, lab = [], []
    for j in range(n_sym):
        n = int(rng.integers(lo, hi))
        cut = np.sort(rng.choice(np.arange(1, n), 4, replace=False))
        l = np.array(['train'] * cut[0] + ['gap'] * (cut[1] - cut[0]) + ['valid'] * (cut[2] - cut[1])
                     + ['gap'] * (cut[3] - cut[2]) + ['test'] * (n - cut[3]), dtype=object)
        l[rng.random(n) < 0.05] = 'gap'   # purged rows
        sym += [f'S{j}'] * n; lab += list(l)
    return np.array(sym), np.array(lab, dtype=str)


@pytest.mark.parametrize('seed,L', [(0, 1), (1, 3), (2, 8), (3, 17)])
def test_window_mask_is_exactly_the_windows_inside_one_symbol_and_one_split(seed, L):
    sym, lab = random_layout(seed)
    got = window_mask(sym, L, lab)
    want = np.zeros(len(sym), bool)
    for e in range(len(sym)):
        a = e - L + 1
        if a < 0 or lab[e] == 'gap' or (sym[a:e + 1] != sym[e]).any(): continue
        want[e] = set(lab[a:e + 1]) <= {lab[e], 'gap'}
    assert np.array_equal(got, want)
    assert got.any() and not got.all()


def test_window_ends_need_a_finite_target_and_are_split_by_split():
    sym, lab = random_layout(5)
    y = np.random.default_rng(0).standard_normal(len(sym))
    y[::7] = np.nan
    ends = window_ends(sym, 4, lab, y)
    ok = window_mask(sym, 4, lab)
    for s, e in ends.items():
        assert (lab[e] == s).all() and ok[e].all() and np.isfinite(y[e]).all()
    assert sum(len(e) for e in ends.values()) == int((ok & np.isfinite(y)).sum())


def test_non_contiguous_symbols_are_refused():
    with pytest.raises(DataError, match="symbol 'A'"):
        symbol_starts(np.array(['A', 'A', 'B', 'A']))
    assert symbol_starts(np.array(['A', 'A', 'B', 'B', 'B'])).tolist() == [0, 0, 2, 2, 2]


def test_dataset_is_one_base_array_and_a_batch_is_only_B_x_L_x_F():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((500, 7)).astype(np.float32)
    ends = np.arange(9, 500, 3)
    ds = WindowDataset(X, ends, 10, y=np.arange(len(ends), dtype=np.float32))
    # the only feature storage is the caller's array: no copy, and nothing else in the dataset is large
    assert ds.X.data_ptr() == X.ctypes.data and ds.X.untyped_storage().nbytes() == X.nbytes
    other = sum(v.untyped_storage().nbytes() for k, v in vars(ds).items() if isinstance(v, torch.Tensor) and k != 'X')
    assert other <= len(ends) * 12 + 10 * 8
    # one window is a view; a batch of B windows allocates B x L x F floats
    w = ds.window(4)
    assert w.untyped_storage().data_ptr() == X.ctypes.data
    idx = [0, 5, 17, 3]
    xb, yb = ds[idx]
    assert xb.shape == (4, 10, 7) and xb.untyped_storage().nbytes() == 4 * 10 * 7 * 4
    for i, k in enumerate(idx):
        e = ends[k]
        assert np.array_equal(xb[i].numpy(), X[e - 9:e + 1])                   # rows e-L+1 .. e, in order
        assert np.array_equal(xb[i, -1].numpy(), X[e]) and yb[i] == k          # last row = the target row
    # a loader yields whole gathered batches
    xl, yl = next(iter(batch_loader(ds, 32)))
    assert xl.shape == (32, 10, 7) and np.array_equal(xl[0].numpy(), X[0:10])


def test_dataset_refuses_out_of_range_ends_and_misaligned_targets():
    X = np.zeros((20, 3), np.float32)
    with pytest.raises(PipelineError, match='out of range'): WindowDataset(X, [3], 5)
    with pytest.raises(PipelineError, match='out of range'): WindowDataset(X, [20], 5)
    with pytest.raises(PipelineError, match='one target per end'): WindowDataset(X, [5, 6], 5, y=[1.0])


def test_models_map_windows_to_one_prediction_each():
    x = torch.randn(6, 16, 5)
    for name in MODELS: assert build_model(name, 5, 16)(x).shape == (6,)
    for pool in POOLINGS: assert build_model('transformer', 5, 16, pooling=pool)(x).shape == (6,)
    with pytest.raises(PipelineError, match='pooling'): build_model('transformer', 5, 16, pooling='max')
    with pytest.raises(PipelineError, match="does not take 'hidden'"): build_model('lstm', 5, 16, hidden=3)
    with pytest.raises(PipelineError, match='receptive field'): build_model('cnn1d', 5, 64, dilations=[1, 2])
    assert receptive_field(3, [1, 2, 4, 8]) == 61


def test_cnn_is_causal_and_the_transformer_reads_the_whole_window():
    torch.manual_seed(0)
    x = torch.randn(3, 32, 4)
    cnn = build_model('cnn1d', 4, 32).eval()
    h = cnn.blocks(cnn.inp(x.transpose(1, 2)))
    x2 = x.clone(); x2[:, 20:] += 3.0
    h2 = cnn.blocks(cnn.inp(x2.transpose(1, 2)))
    assert torch.allclose(h[:, :, :20], h2[:, :, :20]) and not torch.allclose(h[:, :, 20:], h2[:, :, 20:])
    tr = build_model('transformer', 4, 32).eval()
    x3 = x.clone(); x3[:, 0] += 3.0                                              # the window's first bar matters
    assert not torch.allclose(tr(x), tr(x3))


def test_model_configs_merge_file_and_overrides_and_refuse_typos(tmp_path):
    c = model_config('lstm')
    assert c['arch'] == {'hidden_size': 128, 'num_layers': 2, 'dropout': 0.3}
    t = model_config('transformer', {'pooling': 'cls', 'train': {'lr': 0.01}})
    assert t['arch']['pooling'] == 'cls' and t['train'] == {'lr': 0.01} and t['arch']['d_model'] == 64
    assert model_config('cnn1d')['arch']['dilations'] == [1, 2, 4, 8]
    with pytest.raises(PipelineError, match='hiden_size'): model_config('lstm', {'hiden_size': 64})
    with pytest.raises(PipelineError, match='does not exist'): model_config('lstm', model_dir=tmp_path)
    with pytest.raises(PipelineError, match='Unknown sequence model'): model_config('gru')


def lagged_panel(n_per=1200, n_sym=3, F=4, lag=6, seed=0):
    "Target = feature 0 `lag` bars before the target row (+ noise): invisible at the last bar, visible in a window."
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n_per * n_sym, F)).astype(np.float32)
    y = np.full(len(X), np.nan)
    for j in range(n_sym):
        a = j * n_per
        y[a + lag:a + n_per] = X[a:a + n_per - lag, 0] + 0.5 * rng.standard_normal(n_per - lag)
    sym = np.repeat([f'S{j}' for j in range(n_sym)], n_per)
    t = np.tile(np.arange(n_per), n_sym)
    lab = np.where(t < 700, 'train', np.where(t < 720, 'gap', np.where(t < 940, 'valid', np.where(t < 960, 'gap', 'test'))))
    return X, y, sym, lab


SMALL = {'lstm': {'hidden_size': 32, 'num_layers': 1, 'dropout': 0.0},
         'transformer': {'d_model': 16, 'n_heads': 2, 'n_layers': 1, 'dim_feedforward': 32},
         'cnn1d': {'channels': 16, 'dilations': [1, 2, 4]}}


@pytest.mark.slow
@pytest.mark.parametrize('name', list(MODELS))
def test_every_model_learns_a_signal_only_a_window_shows(name):
    X, y, sym, lab = lagged_panel()
    e = window_ends(sym, 12, lab, y)
    f = fit_sequence_model(name, X, y, e['train'], e['valid'], 12, arch=SMALL[name],
                           train={**FAST, 'max_epochs': 8, 'batch_size': 64, 'lr': 1e-2 if name == 'lstm' else 3e-3,
                                  'patience': 3}, progress=False)
    p = f.predict(X, e['test'])
    assert np.corrcoef(p, y[e['test']])[0, 1] > 0.6
    # predictions come back in the target's units (not standardised)
    assert abs(np.std(p) - np.std(y[e['test']])) < 0.5 * np.std(y[e['test']])
    assert f.windows_per_second > 0 and f.history['valid_loss'].notna().all()


def test_caps_are_reported():
    X, y, sym, lab = lagged_panel(n_per=400)
    lab = np.where(np.tile(np.arange(400), 3) < 250, 'train', np.where(np.tile(np.arange(400), 3) < 300, 'valid', 'test'))
    e = window_ends(sym, 8, lab, y)
    f = fit_sequence_model('cnn1d', X, y, e['train'], e['valid'], 8, arch=SMALL['cnn1d'],
                           train={**FAST, 'max_epochs': 2, 'patience': None, 'max_train_windows': 128,
                                  'max_valid_windows': 50, 'batch_size': 64}, progress=False)
    c = f.capped
    assert c['active'] and set(c['by']) == {'max_epochs', 'max_train_windows', 'max_valid_windows'}
    assert f.windows_per_epoch == 128 and f.valid_windows_used == 50 and f.epochs_run == 2
    g = fit_sequence_model('cnn1d', X, y, e['train'], e['valid'], 8, arch=SMALL['cnn1d'],
                           train={**FAST, 'max_epochs': 3, 'time_limit': 0.0, 'batch_size': 64}, progress=False)
    assert g.stop_reason == 'time_limit' and g.epochs_run == 1
    assert 'time_limit' in g.capped['by'] and 'max_epochs' not in g.capped['by']


def test_state_dicts_round_trip_with_weights_only():
    X, y, sym, lab = lagged_panel(n_per=300)
    lab = np.where(np.tile(np.arange(300), 3) < 200, 'train', 'test')
    e = window_ends(sym, 8, lab, y)
    for name in MODELS:
        f = fit_sequence_model(name, X, y, e['train'], [], 8, arch=SMALL[name], train={**FAST, 'max_epochs': 1},
                               progress=False)
        buf = io.BytesIO(); torch.save(f.model.state_dict(), buf)
        state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
        back = model_from_state(fit_record(f), state)
        assert np.array_equal(predict_windows(back, X, e['test'], 8), predict_windows(f.model, X, e['test'], 8))
        with pytest.raises(PipelineError, match='do not fit'):
            model_from_state({**fit_record(f), 'arch': {**f.arch, **({'hidden_size': 8} if name == 'lstm' else
                                                                      {'d_model': 8} if name == 'transformer' else {'channels': 8})}}, state)


def test_threads_follow_the_setting_then_the_environment(monkeypatch):
    assert resolve_threads(3) == 3
    monkeypatch.setenv('OMP_NUM_THREADS', '2')
    assert resolve_threads(None) == 2
    monkeypatch.delenv('OMP_NUM_THREADS')
    assert resolve_threads(None) >= 1
