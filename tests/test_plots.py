import types

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from pipeline_lib.core.config import PipelineError
from pipeline_lib.evaluation.plots import (
    decile_table, plot_daily_ic, plot_decile_returns, plot_equity_curves, plot_importance_bars, plot_lgbm_curves,
    plot_regimes, plot_training_curves)

RNG = np.random.default_rng(0)


def _saves(fig, tmp_path, name='f.png'):
    "The figure is a detached Figure and writes a non-trivial PNG."
    assert isinstance(fig, Figure)
    assert plt.get_fignums() == []  # not left open in pyplot: shown once when returned, no leak across a report
    p = tmp_path/name
    fig.savefig(p)
    assert p.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and p.stat().st_size > 5000


def _history(heads=()):
    ep = np.arange(1, 21)
    h = pd.DataFrame({'epoch': ep, 'train_loss': 1 / ep, 'valid_loss': 1 / ep + 0.01 * (ep - 8) ** 2 / 10, 'lr': 1e-3, 'seconds': 0.1})
    for k in heads:
        h[f'train_{k}'], h[f'valid_{k}'] = 1 / ep, 1 / ep + 0.01
    return h


def test_training_curves_mark_best_epoch_and_add_head_panels(tmp_path):
    h = _history()
    fig = plot_training_curves(h)
    ax, = fig.axes
    assert len(ax.lines) == 3  # train, valid, best-epoch marker
    best_line = ax.lines[2]
    assert best_line.get_xdata()[0] == h.loc[h['valid_loss'].idxmin(), 'epoch']
    assert ax.get_xlabel() == 'epoch' and ax.get_ylabel() == 'loss' and fig._suptitle.get_text()
    _saves(fig, tmp_path)
    fig = plot_training_curves(types.SimpleNamespace(history=_history(('ret', 'tth', 'mdd', 'mfe')), best_epoch=5))
    visible = [a for a in fig.axes if a.get_visible()]
    assert len(visible) == 5 and {a.get_title() for a in visible} == {'total loss', 'head: ret', 'head: tth', 'head: mdd', 'head: mfe'}
    assert all(a.lines[-1].get_xdata()[0] == 5 for a in visible)
    _saves(fig, tmp_path, 'heads.png')
    with pytest.raises(PipelineError): plot_training_curves(pd.DataFrame({'x': [1]}))


def test_lgbm_curves_one_panel_per_metric(tmp_path):
    ev = {'train': {'l2': list(np.linspace(2, 1, 50)), 'l1': list(np.linspace(1, .5, 50))},
          'valid': {'l2': list(np.linspace(2, 1.5, 50)), 'l1': list(np.linspace(1, .8, 50))}}
    fig = plot_lgbm_curves(ev, best_iteration=31)
    assert len(fig.axes) == 2 and all(len(a.lines) == 3 for a in fig.axes)
    assert fig.axes[0].lines[2].get_xdata()[0] == 31 and fig.axes[0].get_xlabel() == 'boosting iteration'
    assert len(fig.axes[0].lines[0].get_xdata()) == 50 and fig.axes[0].lines[0].get_xdata()[0] == 1
    _saves(fig, tmp_path)
    fig = plot_lgbm_curves(types.SimpleNamespace(evals_result_=ev, best_iteration_=0))  # no early stop: no marker
    assert all(len(a.lines) == 2 for a in fig.axes)
    with pytest.raises(PipelineError, match='record_evaluation'): plot_lgbm_curves({})


def test_regimes_colour_each_label_and_leave_nan_white(tmp_path):
    n = 300
    labels = np.repeat([0.0, 2.0, 1.0, 2.0, 0.0], 60); labels[:10] = np.nan
    ts = pd.date_range('2024-01-02 09:30', periods=n, freq='1min')
    fig = plot_regimes(ts, 100 + np.cumsum(RNG.normal(size=n)), labels, names={0: 'calm', 1: 'mid', 2: 'wild'})
    ax, = fig.axes
    assert len(ax.collections) == 3 and len(ax.lines) == 1
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ['calm', 'mid', 'wild']
    _saves(fig, tmp_path)
    fig = plot_regimes(ts, np.ones(n), np.array(['a', 'b'] * 150, dtype=object), x='index')
    assert len(fig.axes[0].collections) == 2 and fig.axes[0].get_xlabel() == 'bar'
    with pytest.raises(PipelineError, match='same length'): plot_regimes(ts, np.ones(n - 1), labels)


def test_decile_returns_bars_follow_the_signal(tmp_path):
    pred = RNG.normal(size=4000); real = 0.2 * pred + RNG.normal(size=4000)
    pred[:50] = np.nan
    t = decile_table(pred, real, n=10)
    assert list(t.index) == list(range(1, 11)) and t['n'].sum() == 3950
    assert t['mean'].iloc[-1] > t['mean'].iloc[0] and np.corrcoef(t.index, t['mean'])[0, 1] > 0.9
    fig = plot_decile_returns(pred, real, n=5)
    assert len(fig.axes) == 1 and len(fig.axes[0].patches) == 5 and len(fig.axes[0].lines) >= 1
    _saves(fig, tmp_path)
    # cross-sectional buckets: ranked within each timestamp
    by = np.repeat(np.arange(400), 10)
    tc = decile_table(np.tile(np.arange(10.0), 400), np.tile(np.arange(10.0), 400), n=10, by=by)
    assert tc['mean'].tolist() == list(range(10)) and (tc['n'] == 400).all()
    with pytest.raises(PipelineError, match='fewer than'): decile_table([1.0, np.nan], [1.0, 2.0], n=10)


def test_equity_daily_ic_and_importance(tmp_path):
    days = pd.bdate_range('2024-01-02', periods=40)
    curves = {m: pd.Series(RNG.normal(0.001, 0.01, 40), index=days) for m in ('a', 'b', 'c')}
    fig = plot_equity_curves(curves, cumulate=True)
    ax, = fig.axes
    assert len(ax.lines) == 3 and np.isclose(ax.lines[0].get_ydata()[-1], curves['a'].sum())
    _saves(fig, tmp_path, 'eq.png')
    fig = plot_daily_ic(pd.Series(RNG.normal(0.03, 0.1, 40), index=days), window=10)
    assert len(fig.axes) == 2 and len(fig.axes[0].patches) == 40 and len(fig.axes[1].lines) == 1
    assert 't = ' in fig.axes[0].get_title()
    _saves(fig, tmp_path, 'ic.png')
    imp = pd.Series(RNG.gamma(1.0, size=60), index=[f'f{i}' for i in range(60)])
    imp['f7'] = 100.0
    fig = plot_importance_bars(imp, top=25, highlight=['f7'])
    ax, = fig.axes
    top_label = dict(zip(ax.get_yticks(), (t.get_text() for t in ax.get_yticklabels())))[max(ax.get_yticks())]
    assert len(ax.patches) == 25 and top_label == 'f7'  # largest on top
    _saves(fig, tmp_path, 'imp.png')
    with pytest.raises(PipelineError): plot_daily_ic(pd.Series([np.nan]))
    with pytest.raises(PipelineError): plot_equity_curves({})
