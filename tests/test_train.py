import numpy as np
import pandas as pd
import pytest
import torch

from pipeline_lib.core.executor import available_cores
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pipeline_lib.models.trainer import (
    ArrayDataset, TrainingError, evaluate_loss, fit_torch, make_loader, masked_mse, predict_torch,
    resolve_device, seed_everything)

_fit_torch = fit_torch
def fit_torch(*args, **kw):
    "One thread: these models are tiny, and the test machine's 2 cores are shared (threads only add overhead)."
    return _fit_torch(*args, **{'num_threads': 1, **kw})


def _data(n=600, f=6, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, f)).astype(np.float32)
    y = (X[:, 0] - 0.5 * X[:, 1] + rng.normal(scale=1.0, size=n)).astype(np.float32)
    return X, y[:, None]


def _mlp(f=6, h=64):
    return nn.Sequential(nn.Linear(f, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 1))


def test_loss_falls_and_best_epoch_weights_are_restored():
    X, y = _data()
    tr, va = (X[:150], y[:150]), (X[150:], y[150:])
    kw = dict(epochs=40, lr=3e-3, patience=5, batch_size=32, eval_batch_size=128, seed=1, progress=False)
    res = fit_torch(_mlp, tr, va, nn.MSELoss(), **kw)
    h = res.history
    assert h['train_loss'].iloc[-1] < 0.7 * h['train_loss'].iloc[0]
    assert res.stopped_early and res.stop_reason == 'patience' and res.best_epoch < res.epochs_run
    assert res.best_epoch == int(h.loc[h['valid_loss'].idxmin(), 'epoch'])
    valid_now = evaluate_loss(res.model, make_loader(*va, batch_size=128), nn.MSELoss())['loss']
    assert valid_now == h['valid_loss'].min() == res.best_valid_loss
    # without restoring, the model is the last epoch's, which is worse: so the restore above did something
    last = fit_torch(_mlp, tr, va, nn.MSELoss(), restore_best=False, **kw)
    last_now = evaluate_loss(last.model, make_loader(*va, batch_size=128), nn.MSELoss())['loss']
    assert last_now == last.history['valid_loss'].iloc[-1] > valid_now


def test_same_seed_same_weights_other_seed_other_weights():
    X, y = _data(200)
    def run(seed):
        r = fit_torch(_mlp, (X[:150], y[:150]), (X[150:], y[150:]), epochs=3, lr=1e-3, seed=seed, batch_size=16, progress=False)
        return [p.detach().clone() for p in r.model.parameters()], r.history
    (w1, h1), (w2, h2), (w3, _) = run(7), run(7), run(8)
    assert all(torch.equal(a, b) for a, b in zip(w1, w2))
    pd.testing.assert_frame_equal(h1.drop(columns='seconds'), h2.drop(columns='seconds'))
    assert not all(torch.equal(a, b) for a, b in zip(w1, w3))


def test_patience_is_respected():
    X, y = _data(200)
    seen = []
    # lr=0: the weights never move, so the validation loss never improves after epoch 1
    res = fit_torch(_mlp(), (X[:150], y[:150]), (X[150:], y[150:]), epochs=20, lr=0.0, patience=3, seed=0,
                    progress=False, callbacks=[lambda e, row, m: seen.append(e)])
    assert res.epochs_run == 4 and res.best_epoch == 1 and seen == [1, 2, 3, 4] and res.stop_reason == 'patience'
    res = fit_torch(_mlp(), (X[:150], y[:150]), (X[150:], y[150:]), epochs=6, lr=0.0, patience=None, seed=0, progress=False)
    assert res.epochs_run == 6 and not res.stopped_early


class _TwoHead(nn.Module):
    def __init__(self, f=6):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(f, 16), nn.ReLU())
        self.ret, self.tth = nn.Linear(16, 1), nn.Linear(16, 1)
    def forward(self, x):
        z = self.body(x)
        return {'ret': self.ret(z), 'tth': self.tth(z)}


def _mt_loss(out, y):
    parts = {k: masked_mse(out[k], y[k]) for k in ('ret', 'tth')}
    return {'loss': parts['ret'] + 0.5 * parts['tth'], **parts}


def test_per_head_losses_are_logged():
    X, y = _data(300)
    tth = np.abs(y[:, 0]) * 3
    tth[::5] = np.nan  # censored: masked by the loss
    ys = {'ret': y[:, 0], 'tth': tth}
    tr = (X[:200], {k: v[:200] for k, v in ys.items()})
    va = (X[200:], {k: v[200:] for k, v in ys.items()})
    res = fit_torch(_TwoHead, tr, va, _mt_loss, epochs=3, lr=1e-3, seed=0, batch_size=300, progress=False)
    h = res.history
    assert {'train_loss', 'valid_loss', 'train_ret', 'train_tth', 'valid_ret', 'valid_tth', 'lr'} <= set(h.columns)
    assert np.isfinite(h[['train_tth', 'valid_tth']].to_numpy()).all()
    # one validation batch: the total is exactly the weighted sum of the heads
    assert np.allclose(h['valid_loss'], h['valid_ret'] + 0.5 * h['valid_tth'], rtol=1e-6)
    pred = predict_torch(res.model, X[200:])
    assert set(pred) == {'ret', 'tth'} and pred['ret'].shape == (100,)


class _Windows(Dataset):
    "Lookback windows as views into one contiguous array (as Phase 3 builds them)."
    def __init__(self, arr, y, ends, L=8):
        self.arr, self.y, self.ends, self.L = torch.from_numpy(arr), torch.from_numpy(y), ends, L
        self.views = 0
    def __len__(self): return len(self.ends)
    def __getitem__(self, i):
        e = int(self.ends[i])
        w = self.arr[e - self.L + 1:e + 1]
        self.views += w.untyped_storage().data_ptr() == self.arr.untyped_storage().data_ptr()
        return w, self.y[e]


class _Conv(nn.Module):
    def __init__(self, f=6):
        super().__init__()
        self.conv, self.out = nn.Conv1d(f, 8, 3), nn.Linear(8, 1)
    def forward(self, x):  # x: (batch, L, f)
        return self.out(self.conv(x.transpose(1, 2)).mean(-1))


def test_custom_dataloader_of_window_views():
    X, y = _data(400)
    ds_tr, ds_va = _Windows(X, y, np.arange(7, 300)), _Windows(X, y, np.arange(310, 400))
    res = fit_torch(_Conv, DataLoader(ds_tr, batch_size=32, shuffle=True), DataLoader(ds_va, batch_size=64),
                    nn.MSELoss(), epochs=4, lr=3e-3, seed=0, progress=False, max_batches_per_epoch=5)
    assert ds_tr.views > 0 and res.epochs_run == 4 and res.history['valid_loss'].notna().all()
    p = predict_torch(res.model, DataLoader(ds_va, batch_size=64))
    assert p.shape == (90,) and np.isfinite(p).all()


def test_max_batches_per_epoch_caps_training_batches():
    X, y = _data(400)
    calls = []
    def loss(out, yb):
        if torch.is_grad_enabled(): calls.append(len(yb))
        return nn.functional.mse_loss(out, yb)
    fit_torch(_mlp(), (X, y), None, loss, epochs=2, batch_size=16, max_batches_per_epoch=3, seed=0, progress=False)
    assert calls == [16] * 6


def test_predict_matches_direct_forward_and_arrays_roundtrip():
    X, _ = _data(50)
    seed_everything(0)
    m = _mlp().eval()
    with torch.no_grad(): direct = m(torch.from_numpy(X)).numpy()[:, 0]
    assert np.allclose(predict_torch(m, X, batch_size=7), direct, atol=1e-6)
    assert np.allclose(predict_torch(m, pd.DataFrame(X)), direct, atol=1e-6)
    ds = ArrayDataset(X, {'a': np.arange(50.0)})
    xb, yb = ds[[0, 3]]
    assert xb.shape == (2, 6) and yb['a'].tolist() == [0.0, 3.0]
    with pytest.raises(TrainingError, match='rows'): ArrayDataset(X, np.zeros(3))


def test_masked_mse_ignores_nan_targets():
    pred = torch.tensor([[1.0], [2.0], [3.0]], requires_grad=True)
    loss = masked_mse(pred, torch.tensor([0.0, float('nan'), 1.0]))
    assert loss.item() == pytest.approx(2.5)
    loss.backward()
    assert pred.grad[1].item() == 0.0
    assert masked_mse(pred, torch.full((3,), float('nan'))).item() == 0.0


def test_bad_options_and_nonfinite_loss_raise():
    X, y = _data(64)
    y_bad = y.copy(); y_bad[3] = np.inf
    with pytest.raises(TrainingError, match='loss became'):
        fit_torch(_mlp(), (X, y_bad), None, nn.MSELoss(), epochs=2, progress=False)
    with pytest.raises(TrainingError, match='scheduler'):
        fit_torch(_mlp(), (X, y), None, epochs=1, scheduler='step', progress=False)
    with pytest.raises(TrainingError, match="'loss'"):
        fit_torch(_mlp(), (X, y), None, lambda o, t: {'ret': o.mean()}, epochs=1, progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(TrainingError, match='no CUDA'): resolve_device('cuda')
    assert resolve_device('auto').type == ('cuda' if torch.cuda.is_available() else 'cpu')


def test_schedulers_change_the_learning_rate():
    X, y = _data(100)
    cos = fit_torch(_mlp(), (X, y), (X, y), epochs=4, lr=1e-3, scheduler='cosine', patience=None, progress=False)
    assert cos.history['lr'].is_monotonic_decreasing and cos.history['lr'].iloc[0] == 1e-3
    flat = fit_torch(_mlp(), (X, y), (X, y), epochs=6, lr=1e-7, scheduler='plateau', patience=None, progress=False)
    assert flat.history['lr'].iloc[-1] < flat.history['lr'].iloc[0]
    const = fit_torch(_mlp(), (X, y), (X, y), epochs=3, lr=1e-3, scheduler=None, progress=False)
    assert (const.history['lr'] == 1e-3).all()


def test_default_threads_use_the_machine():
    X, y = _data(64)
    _fit_torch(_mlp(), (X, y), None, epochs=1, progress=False)
    assert torch.get_num_threads() == available_cores()
    fit_torch(_mlp(), (X, y), None, epochs=1, progress=False)
    assert torch.get_num_threads() == 1
