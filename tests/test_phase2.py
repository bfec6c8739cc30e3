"""Phase 2 end to end on a small null market (no planted signal): honest ICs, the output contracts, refusal of missing,
mismatched or tampered artifacts. Phase 1 is fitted once for the module into a temporary artifact root."""
from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pandas as pd
import pytest

from pipeline_lib.core.artifacts import ArtifactError
from pipeline_lib.core.config import config_hash, load_config
from pipeline_lib.evaluation.metrics import METRIC_KEYS
from pipeline_lib.phases.phase1 import run_phase1
from pipeline_lib.phases.phase2 import (MODEL_NAMES, Phase1Missing, load_core_models, merge_predictions, run_phase2)

# quick config, no planted drift, 16 days so the test split has 4 days (day-block standard errors need a few blocks)
# 40 days give 8 test days: a delete-a-day jackknife over 4 days (16 days) has 3 degrees of freedom, and on pure noise
# it put |IC| beyond 4 standard errors for 1 model in 5 across seeds; 8 days make the 4-s.e. bar meaningful.
NULL = {'data': {'market': {'strength': 0, 'n_days': 40}}, 'phase2': {'multitask': {'epochs': 15}}}

pytestmark = pytest.mark.e2e  # every test reads a run of the quick config


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    cfg = load_config('configs/quick.yaml', NULL)
    root = tmp_path_factory.mktemp('phase2')
    p1 = run_phase1(cfg, artifact_root=root, reports_dir=root/'reports', progress=False)
    res = run_phase2(cfg, artifact_root=root, reports_dir=root/'reports', run_name='t', run_data=p1.data, progress=False)
    return cfg, root, res


def test_null_market_every_model_is_within_4_standard_errors_of_zero(run):
    _, _, res = run
    models = res.metrics['models']
    assert set(models) == set(MODEL_NAMES)
    for name, d in models.items():
        m = d['fwd_ret_5m']['test']
        assert m['n'] > 1000 and m['ic_se'] is not None and m['ic_se'] > 0, name
        assert abs(m['ic']) <= 4 * m['ic_se'], (name, m['ic'], m['ic_se'])


def test_predictions_parquet_contract(run):
    _, root, res = run
    P = pd.read_parquet(root/'reports'/'predictions.parquet')
    rd = res.data
    assert list(P.columns[:3]) == ['symbol', 'timestamp', 'split']
    assert set(P['split']) == {'train', 'valid', 'test'} and len(P) == int((rd.split != 'gap').sum())
    assert not P.duplicated(['symbol', 'timestamp']).any()
    for c in rd.targets.columns: assert c in P.columns
    for c in ('lightgbm__fwd_ret_5m', 'baseline_all_features__fwd_ret_5m', 'multitask__fwd_ret_5m', 'multitask__mdd',
              'multitask__tth', 'multitask__mfe', 'ridge__fwd_ret_5m', 'ensemble__fwd_ret_5m',
              'oracle__fwd_ret_5m', 'oracle_bound__fwd_ret_5m'):
        assert c in P.columns, c
    # realised targets are the run's own, row for row; NaN targets stay NaN
    bars = rd.bars.assign(y=rd.targets['fwd_ret_5m'].to_numpy(), split=rd.split.to_numpy())
    want = bars[bars['split'] != 'gap'].set_index(['symbol', 'timestamp'])['y']
    got = P.set_index(['symbol', 'timestamp'])['fwd_ret_5m'].reindex(want.index)
    assert np.array_equal(got.to_numpy(), want.to_numpy(), equal_nan=True) and got.isna().any()
    assert np.isfinite(P['lightgbm__fwd_ret_5m']).all()


def test_metrics_json_shape_and_no_nan(run):
    _, root, res = run
    text = (root/'reports'/'metrics.json').read_text()
    doc = json.loads(text, parse_constant=lambda c: pytest.fail(f'metrics.json contains {c}'))
    p2 = doc['phase2']
    assert 'phase1' in doc and 'oracle' in doc                   # Phase 1's keys survive the merge
    for name, d in p2['models'].items():
        assert d['seconds'] >= 0
        for s in ('train', 'valid', 'test'): assert set(d['fwd_ret_5m'][s]) == set(METRIC_KEYS)
    assert p2['models']['lightgbm']['seconds_per_iteration'] > 0
    assert p2['models']['baseline_all_features']['n_features'] == res.data.features.shape[1]
    assert set(p2['models']['multitask']) >= {'fwd_ret_5m', 'tth', 'mdd', 'mfe'}
    assert set(p2['backtest']) >= set(MODEL_NAMES) and 'sharpe' in p2['backtest']['lightgbm']
    w = p2['models']['ensemble']['training']['fwd_ret_5m']['weights']
    assert min(w.values()) >= 0 and abs(sum(w.values()) - 1) < 1e-9
    assert p2['checks']['lightgbm_vs_baseline']['se'] is not None
    # the oracle is zero on a null market: no IC, and no model may "beat" it
    assert p2['checks']['oracle_test_ic'] is None and 'oracle_fraction' not in p2['checks']


def test_saved_models_reload_verified_and_reproduce_predictions(run):
    cfg, _, res = run
    back = load_core_models(res.output_dir, {'data_fingerprint': res.data.fingerprint, 'config_hash': config_hash(cfg)})
    rows = np.flatnonzero(res.data.split.to_numpy() == 'test')[:500]
    got = back.predict(res.X.iloc[rows], res.data.features.iloc[rows])
    mine = res.predictions.set_index(['symbol', 'timestamp']).loc[
        pd.MultiIndex.from_arrays([res.data.bars['symbol'].to_numpy()[rows], res.data.bars['timestamp'].to_numpy()[rows]])]
    for c in got.columns: assert np.allclose(got[c].to_numpy(), mine[c].to_numpy(), rtol=1e-6, atol=1e-12), c
    with pytest.raises(ArtifactError, match='config_hash'):
        load_core_models(res.output_dir, {'config_hash': 'something-else'})


@pytest.mark.parametrize('damage', ['flip', 'delete', 'no_manifest'])
def test_tampered_or_missing_model_artifacts_are_refused(run, tmp_path, damage):
    _, _, res = run
    d = tmp_path/'core_models'
    shutil.copytree(res.output_dir, d)
    f = d/'lightgbm_fwd_ret_5m.joblib'
    if damage == 'flip':
        b = bytearray(f.read_bytes()); b[len(b) // 2] ^= 0xFF; f.write_bytes(bytes(b))
    elif damage == 'delete': f.unlink()
    else: (d/'manifest.json').unlink()
    with pytest.raises(ArtifactError, match='lightgbm_fwd_ret_5m|manifest'):
        load_core_models(d)
    with pytest.raises(ArtifactError): load_core_models(tmp_path/'nowhere')


def test_missing_or_mismatched_phase1_stops_with_a_message(run, tmp_path):
    cfg, root, res = run
    with pytest.raises(Phase1Missing, match=r'(?s)Phase 1.*--metadata-dir'):
        run_phase2(cfg, artifact_root=tmp_path, run_data=res.data, progress=False)     # no metadata there
    other = load_config('configs/quick.yaml', {**NULL, 'phase1': {'n_features': 7}})
    with pytest.raises(Phase1Missing, match=r'(?s)phase1\.n_features.*--metadata-dir'):
        run_phase2(other, artifact_root=root, output_dir=tmp_path/'out', run_data=res.data, progress=False)
    md = tmp_path/'metadata'
    shutil.copytree(root/'metadata', md)
    v = md/'vae_encoder.joblib'
    b = bytearray(v.read_bytes()); b[-10] ^= 0xFF; v.write_bytes(bytes(b))
    with pytest.raises(Phase1Missing, match='vae_encoder'):
        run_phase2(cfg, metadata_dir=md, output_dir=tmp_path/'out', run_data=res.data, progress=False)
    assert not (tmp_path/'out').exists()                                                # refused before writing anything


def test_a_later_writer_keeps_other_columns_and_a_rerun_replaces_its_own(run, tmp_path):
    _, root, res = run
    path = tmp_path/'predictions.parquet'
    shutil.copy(root/'reports'/'predictions.parquet', path)
    P = res.predictions
    later = P.loc[P['split'].eq('test'), ['symbol', 'timestamp', 'split', 'fwd_ret_5m']].assign(lstm__fwd_ret_5m=1.0)
    merged = merge_predictions(path, later)
    assert len(merged) == len(P) and merged['lstm__fwd_ret_5m'].notna().sum() == len(later)
    assert np.array_equal(merged['lightgbm__fwd_ret_5m'].to_numpy(), P['lightgbm__fwd_ret_5m'].to_numpy())
    again = merge_predictions(path, P.assign(lightgbm__fwd_ret_5m=0.5))                # Phase 2 re-run: its column replaced
    assert (again['lightgbm__fwd_ret_5m'] == 0.5).all() and again['lstm__fwd_ret_5m'].notna().sum() == len(later)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        other = merge_predictions(path, P.assign(fwd_ret_5m=P['fwd_ret_5m'] + 1))      # another run's data: not mixed
    assert 'lstm__fwd_ret_5m' not in other and any('another run' in str(x.message) for x in w)


def test_merging_the_same_rows_side_by_side_equals_the_keyed_join(run, tmp_path, monkeypatch):
    """Phase 3 writes the same non-gap rows as Phase 2: the merge reads the file a row group at a time and writes the
    columns side by side, without the keyed join. The result and the file equal the keyed join's (schema and pandas
    metadata those of `to_parquet`); `columns` returns only the columns asked for, `splits` only those rows (both
    ways); a changed target still refuses to mix; rows in another order take the keyed join."""
    import pyarrow.parquet as pq
    from pipeline_lib.phases import phase2
    _, root, res = run
    old = pd.read_parquet(root/'reports'/'predictions.parquet')
    new = old[['symbol', 'timestamp', 'split', 'fwd_ret_5m']].assign(lstm__fwd_ret_5m=np.arange(len(old), dtype=float))
    expected, joined = phase2._joined(new, old, ['split', 'fwd_ret_5m']), phase2._joined
    calls = []
    monkeypatch.setattr(phase2, '_joined', lambda *a: calls.append(1) or joined(*a))
    path = tmp_path/'predictions.parquet'
    phase2.write_row_groups(old, path, rows=1000)                   # several row groups, each read and written alone
    merged = merge_predictions(path, new)
    assert not calls
    pd.testing.assert_frame_equal(merged, expected)
    pd.testing.assert_frame_equal(pd.read_parquet(path), expected)
    expected.to_parquet(tmp_path/'whole.parquet', index=False)
    assert pq.read_schema(path).equals(pq.read_schema(tmp_path/'whole.parquet'), check_metadata=True)
    assert pq.ParquetFile(path).metadata.num_row_groups == -(-len(old) // 1000)
    wanted = lambda c: c in ('symbol', 'timestamp') or c.endswith('__fwd_ret_5m')
    some = merge_predictions(path, new.assign(lstm__fwd_ret_5m=2.0), columns=wanted)
    assert list(some.columns) == [c for c in expected.columns if wanted(c)] and (some['lstm__fwd_ret_5m'] == 2.0).all()
    pd.testing.assert_frame_equal(some.drop(columns='lstm__fwd_ret_5m'), expected[list(some.columns.drop('lstm__fwd_ret_5m'))])
    evaluated = merge_predictions(path, new, columns=wanted, splits=('valid', 'test'))   # only these rows read back
    keep = expected['split'].isin(['valid', 'test']).to_numpy()
    assert 0 < len(evaluated) < len(expected) and not calls
    pd.testing.assert_frame_equal(evaluated, expected.loc[keep, list(evaluated.columns)].reset_index(drop=True))
    phase2.write_row_groups(old, path, rows=1000)
    reordered = merge_predictions(path, new.iloc[::-1])              # the same rows in another order: the keyed join
    assert calls and list(reordered.columns) == list(expected.columns)
    pd.testing.assert_frame_equal(reordered, expected)
    tested = merge_predictions(path, new.iloc[::-1], splits=('test',))   # the keyed join's rows of one split
    pd.testing.assert_frame_equal(tested, expected[expected['split'].eq('test').to_numpy()].reset_index(drop=True))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        other = merge_predictions(path, new.assign(fwd_ret_5m=new['fwd_ret_5m'] + 1))   # another run's targets
    assert list(other.columns) == list(new.columns) and any('another run' in str(x.message) for x in w)
    assert list(pd.read_parquet(path).columns) == list(new.columns)


def test_predictions_written_a_row_group_at_a_time_are_the_to_parquet_file(run, tmp_path):
    """`write_row_groups` writes what `to_parquet` writes (values, dtypes, schema and pandas metadata, row groups of
    pyarrow's default size) without converting the whole frame at once; small groups split the rows, none lost."""
    import pyarrow.parquet as pq
    from pipeline_lib.phases.phase2 import write_row_groups
    P = run[2].predictions
    P.to_parquet(tmp_path/'whole.parquet', index=False)
    write_row_groups(P, tmp_path/'groups.parquet')
    assert pq.read_schema(tmp_path/'groups.parquet').equals(pq.read_schema(tmp_path/'whole.parquet'), check_metadata=True)
    for f in ('groups.parquet', 'whole.parquet'):
        assert pq.ParquetFile(tmp_path/f).metadata.num_row_groups == 1
    write_row_groups(P, tmp_path/'small.parquet', rows=1000)
    assert pq.ParquetFile(tmp_path/'small.parquet').metadata.num_row_groups == -(-len(P) // 1000)
    for f in ('groups.parquet', 'small.parquet'):
        pd.testing.assert_frame_equal(pd.read_parquet(tmp_path/f), pd.read_parquet(tmp_path/'whole.parquet'))
    write_row_groups(P.iloc[:0], tmp_path/'empty.parquet')
    assert list(pd.read_parquet(tmp_path/'empty.parquet').columns) == list(P.columns)


def test_a_subset_of_models_with_walk_forward(run, tmp_path):
    cfg, root, res = run
    sub = load_config('configs/quick.yaml', {**NULL, 'phase2': {'models': ['lightgbm', 'ridge'], 'walk_forward': True,
                                                                'n_folds': 2}})
    r = run_phase2(sub, metadata_dir=root/'metadata', output_dir=tmp_path/'out', reports_dir=tmp_path/'rep',
                   run_data=res.data, progress=False)
    assert set(r.metrics['models']) == {'lightgbm', 'ridge'} and r.fits.multitask is None and not r.fits.baseline
    assert [c for c in r.predictions.columns if '__' in c and not c.startswith('oracle')] == ['lightgbm__fwd_ret_5m',
                                                                                              'ridge__fwd_ret_5m']
    wf = r.metrics['walk_forward']
    assert set(wf) == {'lightgbm', 'ridge'} and all(v['n'] == 2 for v in wf.values())
    folds = r.walk_forward[r.walk_forward['model'] == 'lightgbm']
    assert folds['first'].iloc[1] > folds['last'].iloc[0] and folds['n_train'].iloc[1] > folds['n_train'].iloc[0]
    assert sorted(p.name for p in (tmp_path/'out'/'core_models').iterdir()) == [
        'lightgbm_fwd_ret_5m.joblib', 'manifest.json', 'models.json', 'ridge_fwd_ret_5m.joblib']
