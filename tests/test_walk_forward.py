"""Phase 2's walk-forward is out of sample: inside each fold, Phase 1 (selection, scaler, VAE, regimes) and every
model choice (early stopping, ridge's penalty, the ensemble's weights) are fitted on rows whose label windows end
before the fold's block. Spies record the rows every learner sees; a small market keeps it cheap."""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

import pipeline_lib.phases.phase2 as phase2
import pipeline_lib.phases.training as training
import pipeline_lib.phases.walk_forward as walk_forward_module
from pipeline_lib.core.config import deep_merge, load_config
from pipeline_lib.models.multitask import MultiTaskModel
from pipeline_lib.phases.phase1 import run_phase1
from pipeline_lib.phases.transformer import FeatureTransformer
from pipeline_lib.evaluation.metrics import evaluate
from pipeline_lib.phases.phase2 import run_phase2
from pipeline_lib.phases.walk_forward import inner_split
from pipeline_lib.phases.run_data import prepare_run_data
from pipeline_lib.data.splits import purged_walk_forward
from pipeline_lib.data.targets import max_horizon

# a small null market, few features, short VAE and network fits, two folds: every model runs, cheaply
SMALL = {'data': {'market': {'strength': 0, 'n_symbols': 4, 'n_days': 10}},
         'phase1': {'n_features': 8, 'vae': {'epochs': 3},
                    'importance': {'num_boost_round': 60, 'early_stopping_rounds': 10, 'shap_sample': 300}},
         'phase2': {'walk_forward': True, 'n_folds': 2,
                    'lightgbm': {'n_estimators': 200, 'early_stopping_rounds': 10},
                    'multitask': {'epochs': 3, 'patience': 2, 'hidden': [16]}}}


def _label_end(rd, horizon: int) -> np.ndarray:
    "Per row: the timestamp its label window reaches (`horizon` bars later in its symbol); +inf (as int64) when open."
    b = rd.bars[['symbol', 'timestamp']]
    t = b['timestamp'].astype('int64')
    end = t.groupby(b['symbol'].to_numpy()).shift(-horizon)
    return end.fillna(np.iinfo(np.int64).max).astype('int64').to_numpy()


def _rows(frame) -> np.ndarray:
    "Row positions of a frame cut from the run's features/targets (their index is the bars' RangeIndex)."
    return np.asarray(frame.index, dtype=np.int64)


class _Spies:
    """Records, during `walk_forward` only, the rows each learner fits on and the blocks scored, in call order.
    A frame made by a transformer carries in `attrs` the rows that transformer was fitted on."""
    def __init__(self, monkeypatch, main_phase1_rows: np.ndarray):
        self.events, self.active = [], False
        fit, transform = FeatureTransformer.fit, FeatureTransformer.transform
        spies = self

        def fit_spy(ft, features, y=None, **kw):
            ft._spy_rows = _rows(features)
            if spies.active: spies.events.append(('phase1', ft._spy_rows, None))
            return fit(ft, features, y, **kw)

        def transform_spy(ft, features):
            out = transform(ft, features)
            # a transformer fitted before the spies (the run's own Phase 1, loaded from disk) learnt the main training rows
            out.attrs['phase1_rows'] = getattr(ft, '_spy_rows', main_phase1_rows)
            return out

        transformed_frame = walk_forward_module.transformed_frame
        def transformed_spy(ft, rd, rows=None):   # the fold's features, made a store partition at a time
            out = transformed_frame(ft, rd, rows)
            out.attrs['phase1_rows'] = getattr(ft, '_spy_rows', main_phase1_rows)
            return out

        def learnt(X, y):   # LightGBM and ridge leave out the rows whose target is NaN (Phase 2 gives them all of X)
            return _rows(X)[np.isfinite(np.asarray(y, dtype=float))]

        def learner(name, f, x_pos=0, valid_pos=2):
            def spy(*a, **kw):
                if spies.active:
                    X = a[x_pos]
                    Xv = a[valid_pos] if len(a) > valid_pos else kw.get('X_valid')
                    yv = a[valid_pos + 1] if len(a) > valid_pos + 1 else kw.get('y_valid')
                    spies.events.append((name, learnt(X, a[x_pos + 1]), None if Xv is None else learnt(Xv, yv)))
                    if 'regime' in X.columns:   # Phase 1's features (the baseline's raw ones learnt nothing)
                        spies.events.append(('features of ' + name, X.attrs.get('phase1_rows'), None))
                return f(*a, **kw)
            return spy

        def mt_fit(model, X, Y, X_valid=None, *a, **kw):   # given row positions, it learns from those rows of X only
            if spies.active:
                at = lambda F, rows: _rows(F) if rows is None else _rows(F)[np.asarray(rows)]
                spies.events.append(('multitask', at(X, kw.get('train_rows')),
                                     None if X_valid is None else at(X_valid, kw.get('valid_rows'))))
                spies.events.append(('features of multitask', X.attrs.get('phase1_rows'), None))
            return mt_fit_orig(model, X, Y, X_valid, *a, **kw)
        mt_fit_orig = MultiTaskModel.fit

        fitting_targets = training.fitting_targets
        def targets_spy(targets, *a, **kw):   # every label a Phase 2 model learns from or is chosen on passes here
            if spies.active: spies.events.append(('labels', _rows(targets), None))
            return fitting_targets(targets, *a, **kw)

        evaluate = walk_forward_module.evaluate
        def evaluate_spy(y, pred, timestamps, *a, **kw):
            if spies.active: spies.events.append(('block', np.asarray(timestamps).astype('datetime64[ns]').astype('int64'), None))
            return evaluate(y, pred, timestamps, *a, **kw)

        wf = phase2.walk_forward
        def wf_spy(*a, **kw):
            spies.active = True
            try: return wf(*a, **kw)
            finally: spies.active = False

        monkeypatch.setattr(FeatureTransformer, 'fit', fit_spy)
        monkeypatch.setattr(FeatureTransformer, 'transform', transform_spy)
        monkeypatch.setattr(walk_forward_module, 'transformed_frame', transformed_spy)
        monkeypatch.setattr(MultiTaskModel, 'fit', mt_fit)
        monkeypatch.setattr(training, 'fit_lgbm', learner('lightgbm', training.fit_lgbm))
        monkeypatch.setattr(training, 'fit_ridge', learner('ridge', training.fit_ridge))
        monkeypatch.setattr(training, 'fitting_targets', targets_spy)
        monkeypatch.setattr(walk_forward_module, 'evaluate', evaluate_spy)
        monkeypatch.setattr(phase2, 'walk_forward', wf_spy)

    def by_fold(self) -> list[tuple[int, list]]:
        "[(block start ns, learner events fitted before that block was scored)] per fold."
        out, pending = [], []
        for kind, rows, valid in self.events:
            if kind == 'block':
                if pending: out.append((int(rows.min()), pending)); pending = []
            else: pending.append((kind, rows, valid))
        assert not pending, 'learners fitted after the last block was scored'
        return out


@pytest.fixture(scope='module')
def small(tmp_path_factory):
    cfg = load_config('configs/quick.yaml', SMALL)
    root = tmp_path_factory.mktemp('wf')
    p1 = run_phase1(cfg, artifact_root=root, progress=False)
    return cfg, root, p1.data


@pytest.mark.e2e
def test_every_learner_in_a_fold_sees_only_rows_whose_labels_end_before_its_block(small, monkeypatch, tmp_path):
    cfg, root, rd = small
    horizon = max_horizon(cfg['targets']['horizons'], cfg['targets']['path_horizon'])
    end, ts = _label_end(rd, horizon), rd.bars['timestamp'].to_numpy().astype('datetime64[ns]').astype('int64')
    spies = _Spies(monkeypatch, rd.rows('train'))
    r = run_phase2(cfg, artifact_root=root, output_dir=tmp_path/'out', run_data=rd, progress=False)

    folds = spies.by_fold()
    assert len(folds) == cfg['phase2']['n_folds'] and len(r.walk_forward['fold'].unique()) == len(folds)
    for k, (block_start, events) in enumerate(folds):
        kinds = {kind for kind, _, _ in events}
        assert {'phase1', 'lightgbm', 'ridge', 'multitask', 'labels'} <= kinds, (k, kinds)   # refitted in the fold
        for kind, rows, valid in events:
            assert rows is not None and len(rows), (k, kind)
            seen = rows if valid is None else np.r_[rows, valid]
            assert end[seen].max() < block_start, (
                f'fold {k}: {kind} learnt from rows whose labels reach {pd.Timestamp(end[seen].max())}, '
                f'at or after the block that starts {pd.Timestamp(block_start)}')
            if kind in ('lightgbm', 'ridge', 'multitask'):
                # choices (early stopping, penalty) are made inside the fold, on rows after its purged training rows
                assert valid is not None and len(valid), (k, kind, 'no validation rows inside the fold')
                assert end[rows].max() < ts[valid].min(), (k, kind, 'inner split not purged')
    # each fold's Phase 1 was fitted on that fold's rows: the later fold's Phase 1 saw more rows
    p1 = [next(rows for kind, rows, _ in events if kind == 'phase1') for _, events in folds]
    assert len(p1[1]) > len(p1[0])
    # per-fold timings are recorded
    assert (r.walk_forward[['phase1_seconds', 'models_seconds', 'seconds']] > 0).all().all()
    assert set(r.metrics['walk_forward']) == {'lightgbm', 'multitask', 'ensemble', 'ridge', 'baseline_all_features'}


def test_inner_split_purges_training_rows_whose_labels_reach_the_fold_validation_rows():
    ts = np.repeat(pd.date_range('2024-01-02 09:30', periods=40, freq='min').to_numpy(), 2)
    sym = np.tile(['A', 'B'], 40)
    lab = inner_split(ts, sym, horizon=3, valid_frac=0.25)
    assert list(pd.Series(lab).value_counts().sort_index().items()) == [('gap', 6), ('train', 54), ('valid', 20)]
    assert ts[lab == 'train'].max() < ts[lab == 'gap'].min() <= ts[lab == 'gap'].max() < ts[lab == 'valid'].min()


# Two planted columns on a null market, each exp(2.5 * (c * z + noise)) with z the standardised target: trees (which
# only see the order of values) learn it, but its heavy right tail keeps its linear IC small, so the leakage screen
# lets it through. `planted_a` carries z modestly before the first block and never after; `planted_b` weakly before
# the first block, then strongly from the block's start to the end of the main training split: rows the main Phase 1
# was fitted on and fold 0 must never see (the main training split covers the block). Selection keeps one feature. Fitted on rows before the block, Phase 1 prefers planted_a, useless
# in the block; the main Phase 1 (which the old walk-forward reused) saw the block and prefers planted_b, whose
# relationship the fold's model then learns from its weak early part and cashes in on the block.
PLANT = deep_merge(SMALL, {'split': {'train': 0.9, 'valid': 0.05, 'test': 0.05},
                           'phase1': {'n_features': 1, 'max_corr': None},
                           'phase2': {'models': ['lightgbm']}})
WEIGHTS = {'planted_a': (0.3, 0.0), 'planted_b': (0.2, 0.9)}    # c before the first block, c from it to train's end


def _planted_run_data(cfg):
    rd = prepare_run_data(cfg, progress=False)
    ts, sym = rd.bars['timestamp'].to_numpy(), rd.bars['symbol'].to_numpy()
    scored = np.flatnonzero(rd.split.to_numpy() != 'gap')
    horizon = max_horizon(cfg['targets']['horizons'], cfg['targets']['path_horizon'])
    folds = list(purged_walk_forward(pd.Series(ts[scored]), sym[scored], n_folds=cfg['phase2']['n_folds'], horizon=horizon))
    block = scored[folds[0][1]]
    start, train_end = ts[block].min(), ts[rd.rows('train')].max()
    assert train_end > ts[block].max(), 'the main training split must cover the first block'
    y = rd.targets[cfg['primary_target']].to_numpy(float)
    z = np.nan_to_num((y - np.nanmean(y)) / np.nanstd(y))
    rng = np.random.default_rng(0)
    cols = {}
    for name, (before, inside) in WEIGHTS.items():
        c = np.where(ts < start, before, np.where(ts <= train_end, inside, 0.0))
        cols[name] = np.exp(2.5 * (c * z + np.sqrt(1 - c**2) * rng.standard_normal(len(z))))
    rd = dataclasses.replace(rd, store=None, frame=rd.features.assign(**{k: v.astype(np.float32) for k, v in cols.items()}))
    return rd, block


@pytest.mark.e2e
def test_a_signal_planted_where_the_main_phase1_overlaps_a_block_does_not_profit_walk_forward(tmp_path):
    cfg = load_config('configs/quick.yaml', PLANT)
    rd, block = _planted_run_data(cfg)
    p1 = run_phase1(cfg, artifact_root=tmp_path, run_data=rd, progress=False)
    assert p1.selected == ['planted_b']                       # the main Phase 1 saw the block: it picks planted_b
    y, ts, sym = (rd.targets[cfg['primary_target']].to_numpy(float)[block], rd.bars['timestamp'].to_numpy()[block],
                  rd.bars['symbol'].to_numpy()[block])
    f = rd.features['planted_b'].to_numpy(float)[block]
    there = evaluate(y, np.log(f), ts, sym)                 # what planted_b offers a model on the first block
    assert there['ic'] > 0.5
    r = run_phase2(cfg, artifact_root=tmp_path, run_data=rd, progress=False)
    fold0 = r.walk_forward[(r.walk_forward['fold'] == 0) & (r.walk_forward['model'] == 'lightgbm')].iloc[0]
    assert fold0['ic'] < 0.1 and fold0['ic'] < 3 * fold0['ic_se'], (fold0['ic'], fold0['ic_se'], there['ic'])
