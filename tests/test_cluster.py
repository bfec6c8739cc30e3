"""Runs on a Dask cluster: a real `distributed.LocalCluster` of 2 worker processes over TCP on localhost, started and
stopped by a session fixture (nothing is started by hand). The feature store, a grid of runs and Phase 2's LightGBM
through the cluster are compared with the same work done locally; a worker killed mid-grid fails only its run."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip('distributed')

from pipeline_lib.core.cluster import dask_client, task_executor
from pipeline_lib.features import store as fc
from synthetic import realistic_bars
from test_runner import REPO, demo_nbs, drive, make_root


ENVIRON_BEFORE_THE_CLUSTER = {}


@pytest.fixture(scope='session')
def cluster():
    "The address of a LocalCluster of 2 single-thread worker processes (TCP on localhost), closed after the session."
    ENVIRON_BEFORE_THE_CLUSTER.update(os.environ)
    with dask_client('local:2') as client:
        assert client.scheduler.address.startswith('tcp://127.0.0.1:')
        client.wait_for_workers(2, timeout=60)
        yield client.scheduler.address


def test_a_local_cluster_keeps_its_thread_settings_to_its_workers(cluster):
    "Dask's nanny sets OMP_NUM_THREADS=1 where it spawns workers; kernels started here later must not inherit it."
    from distributed import Client
    changed = {k for k in set(os.environ) | set(ENVIRON_BEFORE_THE_CLUSTER)
               if os.environ.get(k) != ENVIRON_BEFORE_THE_CLUSTER.get(k) and k != 'PYTEST_CURRENT_TEST'}
    assert not changed, changed
    with Client(cluster) as client:
        assert set(client.run(lambda: os.environ.get('OMP_NUM_THREADS')).values()) == {'1'}


def test_without_a_scheduler_nothing_of_dask_is_imported(tmp_path):
    "The driver's plan and a local feature build import no Dask module."
    code = ("import sys; from pipeline_lib.driver.cli import main; from pipeline_lib.core.cluster import task_executor\n"
            "from pipeline_lib.features.store import build_store; sys.path.insert(0, 'tests'); from synthetic import realistic_bars\n"
            f"with task_executor(1, None) as ex: build_store(realistic_bars(2, 300, seed=1), cache_dir={str(tmp_path)!r}, progress=False, executor=ex)\n"
            "assert main(['--config', 'configs/quick.yaml', '--dry-run']) == 0\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed'))\n"
            "assert not bad, bad\n")
    p = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.mark.slow
def test_scheduler_names_and_what_needs_one_are_checked_before_anything_runs(tmp_path):
    root, nbs = make_root(tmp_path/'root'), demo_nbs(tmp_path/'nbs')
    plan = lambda *args: drive(root, '--config', 'configs/quick.yaml', '--nbs-dir', nbs, '--dry-run', *args)[0]
    p = plan('--scheduler', 'local:0')
    assert p.returncode == 2 and 'local:N with N >= 1' in p.stderr
    p = plan('--set', 'phase2.engine=dask')
    assert p.returncode == 2 and 'phase2.engine: dask' in p.stderr and 'no scheduler is set' in p.stderr
    settings = root/'settings.ini'   # settings.ini's scheduler is the default, and --scheduler none turns it off
    settings.write_text(settings.read_text().replace('\nscheduler =', '\nscheduler = local:2'))
    p = plan('--grid', 'phase1.n_features=5,8', '--set', 'phase2.engine=dask')
    assert p.returncode == 2 and 'in a --grid on a cluster' in p.stderr
    p = plan('--grid', 'phase1.n_features=5,8')
    assert p.returncode == 0 and '2 run(s), phases 1 2, on the Dask cluster local:2' in p.stdout, p.stdout + p.stderr
    p = plan('--grid', 'phase1.n_features=5,8', '--scheduler', 'none')
    assert p.returncode == 0 and '2 run(s), phases 1 2, workers 1' in p.stdout, p.stdout + p.stderr


@pytest.mark.slow
def test_feature_store_built_on_the_cluster_equals_the_local_one(cluster, tmp_path):
    b = realistic_bars(5, 900, seed=11)
    local = fc.build_store(b, cache_dir=tmp_path/'local', partition_rows=1000, progress=False)
    with task_executor(scheduler=cluster, shared=tmp_path/'remote') as ex:
        remote = fc.build_store(b, cache_dir=tmp_path/'remote', partition_rows=1000, executor=ex, progress=False)
    assert len(local.partitions) > 2
    # the same partitions, byte for byte (their SHA-256), and the same values read back
    assert [(p['lo'], p['hi'], p['sha256']) for p in remote.partitions] == [(p['lo'], p['hi'], p['sha256']) for p in local.partitions]
    pd.testing.assert_frame_equal(remote.read(), local.read(), check_exact=True)


@pytest.mark.e2e
def test_a_worker_killed_mid_grid_fails_only_its_run(cluster, tmp_path):
    "Run n_features=5 kills its Dask worker (SIGKILL) from inside its kernel: it is recorded failed, the other run is ok."
    kill = ("import os, signal, yaml\n"
            "if yaml.safe_load(open(config_path))['phase1']['n_features'] == 5:\n"
            "    os.kill(int(os.environ['JPY_PARENT_PID']), signal.SIGKILL)   # the Dask worker that runs this kernel\n")
    root, nbs = make_root(tmp_path/'root'), demo_nbs(tmp_path/'nbs', body1=kill)
    p, _ = drive(root, '--config', 'configs/quick.yaml', '--run-name', 'k', '--grid', 'phase1.n_features=5,8',
                 '--scheduler', cluster, '--nbs-dir', nbs)
    assert p.returncode == 1, p.stdout + p.stderr
    killed = json.loads((root/'reports'/'k__n_features=5'/'metrics.json').read_text())['run']
    assert killed['status'] == 'failed' and killed['phases']['1']['status'] == 'failed'
    assert killed['phases']['1']['error']['ename'] == 'KilledWorker' and killed['phases']['2']['status'] == 'skipped'
    other = json.loads((root/'reports'/'k__n_features=8'/'metrics.json').read_text())
    assert other['run']['status'] == 'ok' and other['phase1']['n_features'] == 8
    assert all(ph['status'] == 'ok' for ph in other['run']['phases'].values())
    err = ' '.join(p.stderr.split())
    assert "run 'k__n_features=5' failed: its worker died: KilledWorker" in err
    assert killed['phases']['1']['log'] and 'phase1_' in killed['phases']['1']['log']   # the killed attempt's output
    index = (root/'reports'/'index.html').read_text()
    row = index.split('href="k__n_features=5/"', 1)[1].split('</tr>', 1)[0]
    assert '>failed<' in row and 'running' not in row


# ------------------------------------------------------------------ a grid of real runs, locally and on the cluster
GRID = ('--config', 'configs/quick.yaml', '--phases', '1', '2', '--run-name', 'g', '--grid', 'phase1.n_features=5,8',
        '--nbs-dir', REPO/'nbs')
POINTS = ('g__n_features=5', 'g__n_features=8')
# what may differ between two runs of the same config: clocks, and where things were written
_RUN_SPECIFIC = ('seconds', 'timings', 'speed_ratio', 'verdict', '_dir', 'path')


def result_leaves(m: dict, prefix: str = '') -> dict:
    "Every leaf of a metrics.json but the `run` record and the clock- and path-dependent ones: {dotted key: value}."
    out = {}
    for k, v in m.items():
        if (not prefix and k == 'run') or any(s in str(k) for s in _RUN_SPECIFIC): continue
        key = f'{prefix}.{k}' if prefix else str(k)
        if isinstance(v, dict): out.update(result_leaves(v, key))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for i, x in enumerate(v): out.update(result_leaves(x, f'{key}[{i}]'))
        else: out[key] = v
    return out


def same_leaves(a: dict, b: dict, tol: float = 1e-6) -> list:
    "Keys whose values differ (numbers by more than `tol`)."
    bad = []
    for k in sorted(set(a) | set(b)):
        u, v = a.get(k, '<missing>'), b.get(k, '<missing>')
        if isinstance(u, float) and isinstance(v, float): ok = (math.isnan(u) and math.isnan(v)) or abs(u - v) <= tol
        else: ok = u == v
        if not ok: bad.append((k, u, v))
    return bad


@pytest.fixture(scope='module')
def grids(cluster, tmp_path_factory):
    "The same 2-point grid of the quick config (Phases 1 and 2), run locally on 2 processes and through the cluster."
    roots = {}
    for where, flags in (('local', ('--workers', '2')), ('cluster', ('--scheduler', cluster))):
        root = make_root(tmp_path_factory.mktemp(f'grid_{where}'))
        p, secs = drive(root, *GRID, *flags)
        assert p.returncode == 0, p.stdout + p.stderr
        print(f'{where} grid: {secs:.1f} s')
        roots[where] = root
    return roots


@pytest.mark.e2e
def test_a_grid_through_the_cluster_gives_the_local_metrics(grids):
    for name in POINTS:
        local, remote = (json.loads((grids[w]/'reports'/name/'metrics.json').read_text()) for w in ('local', 'cluster'))
        assert remote['run']['status'] == 'ok' and all(ph['status'] == 'ok' for ph in remote['run']['phases'].values())
        a, b = result_leaves(local), result_leaves(remote)
        assert len(a) > 300 and 'phase2.models.lightgbm.fwd_ret_5m.test.ic' in a
        assert same_leaves(a, b) == []
        assert (grids['cluster']/'runs'/name/'metadata'/'manifest.json').exists()   # its own artifact root, as locally


@pytest.mark.e2e
def test_phase2_engine_dask_trains_a_plain_lightgbm_close_to_the_local_one(grids, cluster, tmp_path):
    "Phase 2 alone, LightGBM and the baseline on the cluster, on the Phase 1 artifacts of a grid run: test IC within 0.01."
    import lightgbm as lgb
    from pipeline_lib.phases.phase2 import load_core_models
    root, name = grids['cluster'], POINTS[1]
    p, _ = drive(root, '--config', 'configs/quick.yaml', '--set', 'phase1.n_features=8', '--set', 'phase2.engine=dask',
                 '--phases', '2', '--metadata-dir', root/'runs'/name/'metadata', '--output-dir', tmp_path/'output',
                 '--run-name', 'dask2', '--scheduler', cluster, '--nbs-dir', REPO/'nbs')
    assert p.returncode == 0, p.stdout + p.stderr
    local = json.loads((grids['local']/'reports'/name/'metrics.json').read_text())['phase2']['models']
    dask = json.loads((root/'reports'/'dask2'/'metrics.json').read_text())['phase2']['models']
    for model in ('lightgbm', 'baseline_all_features'):
        t = dask[model]['training']['fwd_ret_5m']
        assert local[model]['training']['fwd_ret_5m']['engine'] == {'name': 'local'}
        assert t['engine']['name'] == 'dask' and t['engine']['workers'] == 2
        # the quick config's training rows all fit in the rounds sample: the local engine's early-stopping point
        assert t['engine']['rounds_from']['sample_rows'] == t['n_train'] == local[model]['training']['fwd_ret_5m']['n_train']
        assert t['best_iteration'] == local[model]['training']['fwd_ret_5m']['best_iteration']
        assert abs(dask[model]['fwd_ret_5m']['test']['ic'] - local[model]['fwd_ret_5m']['test']['ic']) <= 0.01
    fits = load_core_models(tmp_path/'output'/'core_models').fits   # verified and loaded as any Phase 2 models are
    assert isinstance(fits.lightgbm['fwd_ret_5m'].booster, lgb.Booster)
    html = (root/'reports'/'dask2'/'phase2_core_models.html').read_text()
    assert 'lightgbm.dask has no early stopping' in html


@pytest.mark.slow
def test_store_blocks_read_on_the_workers_are_the_rows_lightgbm_would_get(cluster, tmp_path):
    "The baseline's Dask blocks (one per store partition, read by the workers) equal the local LightGBM matrix."
    from pipeline_lib.models.lgbm_dask import dask_rows
    from pipeline_lib.models.store_rows import StoreRows
    from pipeline_lib.models.tabular import _lgbm_matrix
    b = realistic_bars(5, 900, seed=11)
    store = fc.build_store(b, cache_dir=tmp_path, partition_rows=1000, progress=False)
    keep = np.random.default_rng(0).random(len(b)) < 0.7
    cols = store.columns[::5]
    with dask_client(cluster) as client:
        blocks = dask_rows(StoreRows(store)[cols], cols, keep, client=client)
        assert blocks.numblocks[0] == len(store.partitions)
        got = blocks.compute()
    assert np.array_equal(got, _lgbm_matrix(store.read(cols), cols, keep), equal_nan=True)
