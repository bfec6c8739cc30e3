import numpy as np
import pytest

from pipeline_lib.core.config import PipelineError, load_config
from pipeline_lib.data.market import make_market
from pipeline_lib.phases.run_data import check_target, oracle_metrics, prepare_run_data, reduce_bars


@pytest.fixture(scope='module')
def market():
    return make_market(n_symbols=4, n_days=3, seed=5)


def test_max_rows_keeps_the_most_recent_rows_with_one_cut(market):
    bars, oracle = market
    rb, ro = reduce_bars(bars, oracle, {'data': {'max_rows': 1000}})
    assert len(rb) <= 1000 and len(ro) == len(rb) and (rb.index == np.arange(len(rb))).all()
    dropped = bars.merge(rb[['symbol', 'timestamp']], how='left', indicator=True).query('_merge == "left_only"')
    assert rb.timestamp.min() > dropped.timestamp.max()  # one time cut for every symbol
    assert (rb.groupby('symbol').timestamp.min().nunique()) == 1


def test_sample_keeps_a_seeded_fraction_of_whole_symbols(market):
    bars, oracle = market
    cfg = {'data': {'sample': 0.5, 'market': {'seed': 3}}}
    a, ao = reduce_bars(bars, oracle, cfg)
    b, _ = reduce_bars(bars, oracle, cfg)
    assert a.symbol.nunique() == 2 and a.equals(b)
    for sym, g in a.groupby('symbol'):  # whole symbols: every bar of a kept symbol is kept, oracle aligned
        full = bars[bars.symbol == sym]
        assert len(g) == len(full)
        assert np.array_equal(ao.loc[g.index, 'oracle'].to_numpy(), oracle.loc[full.index, 'oracle'].to_numpy())


def test_no_reduction_returns_the_inputs_and_empty_is_an_error(market):
    bars, oracle = market
    rb, ro = reduce_bars(bars, oracle, {'data': {}})
    assert rb is bars and ro is oracle
    with pytest.raises(PipelineError, match='leave no rows'):
        reduce_bars(bars, oracle, {'data': {'max_rows': 0}})
    with pytest.raises(PipelineError, match='leave no rows'):
        reduce_bars(bars, oracle, {'data': {'sample': 0}})


def test_prepare_run_data_aligns_everything_and_scores_the_oracle():
    cfg = load_config('configs/quick.yaml', {'data': {'max_rows': 8000}})
    rd = prepare_run_data(cfg, progress=False)
    assert len(rd.bars) <= 8000
    assert len(rd.features) == len(rd.targets) == len(rd.split) == len(rd.oracle) == len(rd.bars)
    assert set(rd.split) <= {'train', 'valid', 'test', 'gap'} and len(rd.rows('test')) > 0
    om = oracle_metrics(rd, 'fwd_ret_5m')
    assert om['fwd_ret_5m']['test']['n'] == int(np.isfinite(rd.targets['fwd_ret_5m'].to_numpy()[rd.rows('test')]).sum())
    assert om['fwd_ret_5m']['train']['ic'] > 0


def test_unknown_target_lists_the_available_ones():
    with pytest.raises(PipelineError, match='available targets: fwd_ret_5m, mfe'):
        check_target('fwd_ret_7m', ['fwd_ret_5m', 'mfe'])
