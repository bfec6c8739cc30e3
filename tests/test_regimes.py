import joblib
import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone

from pipeline_lib.core.config import PipelineError
from pipeline_lib.models.regimes import RegimeModel, regime_names, regime_runs, regime_stats, transition_matrix


def _clusters(n=1500, seed=0):
    "3 well-separated clusters in 3-D, true cluster t has volatility proxy ~ (0.5, 1, 2)[t]; rows in random order."
    rng = np.random.default_rng(seed)
    true = rng.permutation(np.repeat([0, 1, 2], n // 3))
    centres = np.array([[6., 0., 0.], [-6., 0., 3.], [0., 7., -3.]])
    Z = centres[true] + rng.normal(size=(n, 3)) * np.array([0.5, 1.0, 1.5])[true][:, None]
    vol = np.array([0.5, 1.0, 2.0])[true] * rng.uniform(0.7, 1.3, n)
    return Z, vol, true


@pytest.mark.parametrize('seed', [0, 1, 2, 3])
def test_labels_ordered_calm_to_turbulent_and_recover_the_clusters(seed):
    Z, vol, true = _clusters()
    rm = RegimeModel(3, seed=seed).fit(Z, vol)
    lab = rm.predict(Z)
    assert lab.dtype == np.int64 and set(lab) == {0, 1, 2}
    assert (lab == true).all()  # the same labels whatever the mixture's own component numbering
    assert np.all(np.diff(rm.vol_means_) > 0) and rm.order_by_ == 'vol'
    assert rm.counts_.tolist() == [500, 500, 500]
    P = rm.predict_proba(Z)
    assert P.shape == (1500, 3) and np.allclose(P.sum(1), 1) and (P.argmax(1) == lab).all()
    assert np.allclose(rm.means_[0], [6, 0, 0], atol=0.2)


def test_vol_from_a_feature_column_and_spread_fallback():
    Z, vol, true = _clusters()
    df = pd.DataFrame(Z, columns=['a', 'b', 'c']).assign(rv=vol)
    rm = RegimeModel(3, on='features', vol_feature='rv', seed=0).fit(df)
    assert (rm.predict(df) == true).all() and rm.order_by_ == 'vol'
    # no proxy: order by covariance spread; the clusters' spreads rise with their volatility here
    rm2 = RegimeModel(3, seed=0).fit(Z)
    assert rm2.order_by_ == 'spread' and rm2.vol_means_ is None and (rm2.predict(Z) == true).all()


def test_deterministic_per_seed_persisted_and_clonable(tmp_path):
    Z, vol, _ = _clusters(900, seed=1)
    Z = Z + np.random.default_rng(5).normal(scale=3.0, size=Z.shape)  # overlapping: EM's start matters
    a = RegimeModel(3, seed=7).fit(Z, vol)
    b = RegimeModel(3, seed=7).fit(Z, vol)
    assert np.array_equal(a.predict_proba(Z), b.predict_proba(Z))
    joblib.dump(a, tmp_path / 'gmm_model.joblib')
    c = joblib.load(tmp_path / 'gmm_model.joblib')
    assert np.array_equal(c.predict(Z), a.predict(Z)) and np.array_equal(c.predict_proba(Z), a.predict_proba(Z))
    d = clone(a)
    assert d.get_params() == a.get_params() and not hasattr(d, 'gmm_')
    assert np.array_equal(d.fit(Z, vol).predict(Z), a.predict(Z))


def test_bad_input():
    Z, vol, _ = _clusters(300)
    Z[17, 2] = np.nan
    with pytest.raises(PipelineError, match='row 17'):
        RegimeModel().fit(Z, vol)
    with pytest.raises(PipelineError, match='vol has'):
        RegimeModel().fit(np.nan_to_num(Z), vol[:10])
    with pytest.raises(PipelineError, match="on must be"):
        RegimeModel(on='prices').fit(np.nan_to_num(Z), vol)
    rm = RegimeModel().fit(np.nan_to_num(Z), vol)
    with pytest.raises(PipelineError, match='dims'):
        rm.predict(np.zeros((5, 2)))


# A: 0 0 1 1 1 0 | B: 1 1 2 NaN 2
LAB = [0, 0, 1, 1, 1, 0, 1, 1, 2, np.nan, 2]
SYM = ['A'] * 6 + ['B'] * 5


def test_regime_stats_on_a_hand_made_sequence():
    ret = np.array([1., 3., -1., 0., 1., 5., 2., 2., 10., 99., -10.])
    st = regime_stats(LAB, ret, symbols=SYM)
    assert st.index.tolist() == [0, 1, 2]
    assert st['rows'].tolist() == [3, 5, 2] and np.allclose(st['share'], [0.3, 0.5, 0.2])
    assert st['n_runs'].tolist() == [2, 2, 2] and st['mean_duration'].tolist() == [1.5, 2.5, 1.0]
    assert np.allclose(st['mean_return'], [3.0, 0.8, 0.0])  # the unlabelled row's 99 is not counted
    assert np.isclose(st.loc[0, 'volatility'], np.std([1., 3., 5.], ddof=1))
    # a run never continues across a symbol boundary; without symbols, all rows are one symbol
    st_one = regime_stats([1, 1, 1, 1], np.zeros(4), symbols=['A', 'A', 'B', 'B'])
    assert st_one.loc[1, 'n_runs'] == 2 and st_one.loc[1, 'mean_duration'] == 2.0
    assert regime_stats([1, 1, 1, 1], np.zeros(4)).loc[1, 'mean_duration'] == 4.0


def test_regime_stats_and_runs_sort_by_symbol_and_time():
    ts = np.r_[np.arange(6), np.arange(5)]
    perm = np.random.default_rng(0).permutation(11)
    lab, sym, t = np.asarray(LAB)[perm], np.asarray(SYM)[perm], ts[perm]
    ret = np.arange(11.0)
    pd.testing.assert_frame_equal(regime_stats(lab, ret[perm], t, sym), regime_stats(LAB, ret, ts, SYM))
    runs = regime_runs(lab, sym, t)
    assert sorted(runs['length'].tolist()) == [1, 1, 1, 2, 2, 3]
    assert (lab[runs['start']] == runs['regime']).all()  # `start` is a row of the input as given


def test_transition_matrix_rows_sum_to_one_and_skip_symbol_boundaries():
    counts = transition_matrix(LAB, SYM, normalize=False)
    # within A: 00 01 11 11 10; within B: 11 12 (2->NaN and NaN->2 skipped); A's last 0 -> B's first 1 skipped
    expected = np.array([[1, 1, 0], [1, 3, 1], [0, 0, 0]])
    assert np.array_equal(counts.to_numpy(), expected)
    P = transition_matrix(LAB, SYM)
    assert np.allclose(P.loc[[0, 1]].sum(axis=1), 1) and P.loc[2].isna().all()  # regime 2 never hands over
    assert P.index.name == 'from' and P.columns.name == 'to'
    # a long random sequence: every row sums to 1, and a cross-symbol pair never appears
    rng = np.random.default_rng(0)
    lab = np.r_[np.zeros(50, int), np.full(50, 2)]  # symbol X is all 0, symbol Y all 2
    P = transition_matrix(lab, ['X'] * 50 + ['Y'] * 50, n_regimes=3)
    assert P.loc[0, 2] == 0 and P.loc[0, 0] == 1 and P.loc[1].isna().all()
    lab = rng.integers(0, 3, 1000)
    P = transition_matrix(lab, np.repeat(['a', 'b', 'c', 'd'], 250))
    assert np.allclose(P.sum(axis=1), 1) and transition_matrix(lab, np.repeat(['a', 'b', 'c', 'd'], 250), normalize=False).to_numpy().sum() == 996


def test_transition_matrix_sorts_by_time_when_given():
    ts = np.r_[np.arange(6), np.arange(5)]
    perm = np.random.default_rng(1).permutation(11)
    a = transition_matrix(np.asarray(LAB)[perm], np.asarray(SYM)[perm], ts[perm], normalize=False)
    pd.testing.assert_frame_equal(a, transition_matrix(LAB, SYM, normalize=False))


def test_labels_must_be_integers():
    with pytest.raises(PipelineError, match='integers'):
        transition_matrix([0, 1.5, 2], None)
    with pytest.raises(PipelineError, match='integers'):
        regime_stats([0, -1, 2], [0., 0., 0.])


def test_regime_names():
    assert regime_names(3) == {0: 'calm', 1: 'normal', 2: 'turbulent'}
    assert regime_names(5)[0] == 'calm' and regime_names(5)[4] == 'turbulent' and len(regime_names(5)) == 5
