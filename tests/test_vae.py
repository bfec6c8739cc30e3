import pickle

import joblib
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.base import clone

from pipeline_lib.core.config import PipelineError
from pipeline_lib.models.vae import VAEEncoder, VAELoss, holdout_mask

FAST = dict(latent_dim=4, hidden=(16, 8), epochs=4, batch_size=128, kl_warmup_epochs=2, patience=3)


def _low_rank(n=2000, d=20, k=3, noise=0.3, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, k)) @ rng.normal(size=(k, d)) + noise * rng.normal(size=(n, d))
    return ((X - X.mean(0)) / X.std(0)).astype(np.float32)


@pytest.fixture(scope='module')
def fitted():
    X = _low_rank(3000, 20)
    return X, VAEEncoder(latent_dim=8, hidden=(32, 16), epochs=30, batch_size=128, lr=3e-3, seed=0).fit(X)


def test_deterministic_per_seed():
    X = _low_rank(1500, 12)
    a = VAEEncoder(**FAST, seed=3).fit(X)
    b = VAEEncoder(**FAST, seed=3).fit(X)
    c = VAEEncoder(**FAST, seed=4).fit(X)
    assert np.array_equal(a.transform(X), b.transform(X))
    pd.testing.assert_frame_equal(a.history_.drop(columns='seconds'), b.history_.drop(columns='seconds'))
    assert not np.allclose(a.transform(X), c.transform(X))


def test_holdout_is_the_tail_in_rows_or_in_time():
    m = holdout_mask(100, 0.2)
    assert m.sum() == 20 and m[80:].all() and not m[:80].any()
    assert not holdout_mask(100, 0.0).any()
    # two symbols sorted by (symbol, time): the hold-out is the latest time of *both*, not the last symbol's rows
    ts = np.r_[np.arange(50), np.arange(50)]
    m = holdout_mask(100, 0.2, timestamps=ts)
    assert m.sum() == 20 and (ts[m] >= 40).all() and m[:50].sum() == 10
    with pytest.raises(PipelineError):
        holdout_mask(10, 1.0)


def _holdout_loss(vae, X_hold):
    x = torch.from_numpy(X_hold)
    with torch.no_grad():
        return float(VAELoss(vae.module_, vae.beta)(vae.module_.eval()(x), x)['loss'])


def test_early_stopping_restores_the_best_weights_scored_on_the_tail():
    rng = np.random.default_rng(0)
    X = (rng.normal(size=(100, 3)) @ rng.normal(size=(3, 30)) + 0.5 * rng.normal(size=(100, 30))).astype(np.float32)
    v = VAEEncoder(latent_dim=4, hidden=(64, 32), epochs=300, batch_size=16, lr=3e-3, patience=5,
                   kl_warmup_epochs=2, holdout_frac=0.3, seed=0).fit(X)
    h = v.history_.set_index('epoch')
    assert v.stop_reason_ == 'patience' and v.best_epoch_ < len(h) and v.n_holdout_rows_ == 30
    best = h.loc[v.best_epoch_, 'valid_loss']
    assert best == h['valid_loss'].min() and h['valid_loss'].iloc[-1] > best
    # the returned weights score the tail rows exactly as the best epoch did (and not like the head rows)
    assert _holdout_loss(v, X[-30:]) == pytest.approx(best, rel=1e-5)
    assert _holdout_loss(v, X[:30]) != pytest.approx(best, rel=1e-2)


def test_kl_warmup_ramps_beta_and_history_columns():
    X = _low_rank(1000, 10)
    v = VAEEncoder(latent_dim=3, hidden=(8,), epochs=6, kl_warmup_epochs=4, beta=2.0, patience=None, seed=0).fit(X)
    h = v.history_
    assert h['beta'].tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 2.0]
    for split in ('train', 'valid'):
        assert np.allclose(h[f'{split}_loss'], h[f'{split}_recon'] + 2.0 * h[f'{split}_kl'], rtol=1e-5)
    # what was optimised used the warm-up beta
    assert np.allclose(h['fit_loss'], h['fit_recon'] + h['beta'] * h['fit_kl'], rtol=1e-5)
    assert {'epoch', 'lr', 'seconds'} <= set(h.columns) and len(h) == 6


def test_transform_shape_dtype_and_input_checks():
    X = _low_rank(800, 10)
    df = pd.DataFrame(X, columns=[f'f{i}' for i in range(10)])
    v = VAEEncoder(**FAST, seed=0).fit(df)
    Z = v.transform(df)
    assert Z.shape == (800, 4) and Z.dtype == np.float32 and np.isfinite(Z).all()
    assert np.array_equal(Z, v.transform(X))  # plain arrays are accepted too
    assert v.inverse_transform(Z).shape == (800, 10) and list(v.get_feature_names_out()) == ['vae_0', 'vae_1', 'vae_2', 'vae_3']
    with pytest.raises(PipelineError, match='features'):
        v.transform(X[:, :9])
    with pytest.raises(PipelineError, match='different feature columns'):
        v.transform(df[df.columns[::-1]])
    bad = df.copy(); bad.iloc[7, 3] = np.nan
    with pytest.raises(PipelineError, match=r"'f3', row 7"):
        VAEEncoder(**FAST).fit(bad)


@pytest.mark.slow
def test_pickle_round_trip_gives_identical_output(tmp_path, fitted):
    X, v = fitted
    joblib.dump(v, tmp_path / 'vae.joblib')
    w = joblib.load(tmp_path / 'vae.joblib')
    assert np.array_equal(w.transform(X), v.transform(X))
    assert np.array_equal(w.reconstruct(X[:50]), v.reconstruct(X[:50]))
    assert w.history_.equals(v.history_) and w.get_params() == v.get_params()
    # the pickle holds numpy weights and the architecture, not a torch module
    state = v.__getstate__()
    assert 'module_' not in state and all(isinstance(a, np.ndarray) for a in state['_module_state'].values())
    assert hasattr(v, 'module_')  # pickling did not strip the live object
    assert np.array_equal(pickle.loads(pickle.dumps(v)).transform(X[:10]), v.transform(X[:10]))


def test_sklearn_clone_and_params():
    v = VAEEncoder(**FAST, seed=5)
    X = _low_rank(800, 10)
    v.fit(X)
    c = clone(v)
    assert c.get_params() == v.get_params() and not hasattr(c, 'module_')
    assert np.array_equal(c.fit(X).transform(X), v.transform(X))
    c.set_params(latent_dim=2)
    assert c.fit(X).transform(X).shape == (800, 2)


@pytest.mark.slow
def test_latent_carries_information(fitted):
    X, v = fitted
    k = v.n_holdout_rows_
    hold = X[-k:]
    mse_vae = ((v.reconstruct(hold) - hold) ** 2).mean()
    mse_mean = ((X[:-k].mean(0) - hold) ** 2).mean()
    assert mse_vae < 0.5 * mse_mean  # rank-3 data + 0.3 noise: a good code explains most of the variance
    var = v.transform(X).var(0)
    assert (var > 0.05).sum() >= 3  # at least the 3 true factors are encoded, not collapsed to the prior


def test_thread_count_is_restored_and_no_holdout_runs_all_epochs():
    before = torch.get_num_threads()
    X = _low_rank(500, 8)
    v = VAEEncoder(**{**FAST, 'epochs': 3}, holdout_frac=0.0).fit(X)
    assert torch.get_num_threads() == before
    assert len(v.history_) == 3 and v.n_holdout_rows_ == 0 and 'valid_loss' not in v.history_


def test_max_train_rows_caps_the_training_rows():
    X = _low_rank(2000, 8)
    v = VAEEncoder(**{**FAST, 'epochs': 1}, max_train_rows=300).fit(X)
    assert v.n_train_rows_ == 300 and v.n_holdout_rows_ == 300
