"""Reliability (issue 8): the same result twice, nothing half-written or orphaned when the driver is killed,
tampered or drifted artifacts refused before anything is unpickled, and bad input refused in seconds.

Everything runs in scratch roots (PIPELINE_ROOT -> a copy of settings.ini and configs/), never in the real
metadata/, output/ or reports/. The costly parts are shared: one module fixture runs Phase 1 + 2 of the quick
config twice in-process (determinism), and its metadata/ serves as the "previous complete artifacts" of the kill
test and as the tampering tests' subject.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest

from pipeline_lib.driver import cli, preflight
from pipeline_lib.driver.demo import write_demo_phase
from pipeline_lib.driver.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED
from pipeline_lib.driver.index import collect_runs
from pipeline_lib.core.artifacts import ArtifactError, ArtifactWarning, ArtifactWriter, verify_manifest
from pipeline_lib.core.config import load_config, load_settings
from synthetic import walk_bars
from test_data import _bad_cases
from test_runner import DRIVER, FAST_S, make_root

REPO = load_settings()['root']
QUICK = REPO/'configs'/'quick.yaml'
VOLATILE = {'seconds', 'cpu_seconds', 'timings', 'seconds_per_iteration', 'output_dir', 'metadata_dir', 'reports_dir',
            'fit_seconds', 'windows_per_second', 'train_seconds'}


# ------------------------------------------------------------------------------------------------- helpers
def main_in(root: Path, *args) -> tuple[int, str, str]:
    "Run the driver's `main` in-process in the scratch `root`; (exit status, stdout, stderr)."
    out, err = io.StringIO(), io.StringIO()
    old = os.environ.get('PIPELINE_ROOT')
    os.environ['PIPELINE_ROOT'] = str(root)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            if '--nbs-dir' not in args: args = (*args, '--nbs-dir', REPO/'nbs')
            rc = cli.main([str(a) for a in args])
    finally:
        if old is None: os.environ.pop('PIPELINE_ROOT', None)
        else: os.environ['PIPELINE_ROOT'] = old
    return rc, out.getvalue(), err.getvalue()


def written(root: Path) -> list[str]:
    "Files a run would have written under `root` (reports, logs, artifacts)."
    return sorted(str(p.relative_to(root)) for d in ('reports', 'logs', 'metadata', 'output', 'runs')
                  if (root/d).exists() for p in (root/d).rglob('*') if p.is_file() and p.name != '.gitkeep')


def alive(pids) -> list[int]:
    "The pids among `pids` still running (zombies awaiting their reaper count as dead)."
    out = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE: out.append(pid)
    return out


def wait_gone(pids, timeout=5.0) -> list[int]:
    t0 = time.monotonic()
    while (left := alive(pids)) and time.monotonic() - t0 < timeout: time.sleep(0.1)
    return left


def start_driver(root: Path, *args) -> subprocess.Popen:
    env = {**os.environ, 'PIPELINE_ROOT': str(root)}
    env.pop('IN_TEST', None)
    return subprocess.Popen([sys.executable, str(DRIVER), *map(str, args), '--no-progress'], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_kernel(proc: subprocess.Popen, timeout=60.0) -> psutil.Process:
    "The kernel process the driver started (a child running the kernel guard)."
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        assert proc.poll() is None, proc.stdout.read()
        with contextlib.suppress(psutil.NoSuchProcess):
            for c in psutil.Process(proc.pid).children(recursive=True):
                with contextlib.suppress(psutil.NoSuchProcess):
                    if '_pipeline_guard' in ' '.join(c.cmdline()): return c
        time.sleep(0.1)
    raise AssertionError('no kernel started')


def volatile(key: str) -> bool:
    "Wall-clock measurements and what is derived from them (speed ratios, the verdict sentences quoting them)."
    return key in VOLATILE or any(w in key for w in ('seconds', 'speed', 'timing', 'per_second')) or key == 'verdict'


def numbers_close(a, b, path='', tol=1e-6) -> list[str]:
    "Where nested metrics `a` and `b` differ (numbers beyond `tol`, anything else unequal); volatile keys skipped."
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f'{path}: keys {sorted(set(a) ^ set(b))}'] if set(a) != set(b) else []
        return out + [x for k in a.keys() & b.keys() if not volatile(k) for x in numbers_close(a[k], b[k], f'{path}.{k}', tol)]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b): return [f'{path}: lengths {len(a)} != {len(b)}']
        return [x for i, (u, v) in enumerate(zip(a, b)) for x in numbers_close(u, v, f'{path}[{i}]', tol)]
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        if math.isnan(a) and math.isnan(b): return []
        return [] if abs(a - b) <= tol*max(1.0, abs(a)) else [f'{path}: {a!r} != {b!r}']
    return [] if a == b else [f'{path}: {a!r} != {b!r}']


# ------------------------------------------------------------------------- determinism (shared two runs)
@pytest.fixture(scope='module')
def twice(tmp_path_factory):
    "Phase 1 + 2 of the quick config, twice, each from scratch (its own data, artifacts and reports)."
    from pipeline_lib.phases.phase1 import run_phase1
    from pipeline_lib.phases.phase2 import run_phase2
    cfg = load_config(QUICK)
    out = []
    for i in (1, 2):
        root = tmp_path_factory.mktemp(f'det{i}')
        t0 = time.perf_counter()
        p1 = run_phase1(cfg, artifact_root=root, reports_dir=root/'reports', run_name=f'det{i}', progress=False)
        p2 = run_phase2(cfg, artifact_root=root, reports_dir=root/'reports', run_name=f'det{i}', progress=False)
        out.append({'root': root, 'p1': p1, 'p2': p2, 'cfg': cfg, 'seconds': time.perf_counter() - t0})
    print(f"determinism runs: {out[0]['seconds']:.1f} s and {out[1]['seconds']:.1f} s")
    return out


@pytest.mark.e2e
def test_same_config_and_seed_give_the_same_result(twice):
    a, b = twice
    assert a['p1'].data.fingerprint == b['p1'].data.fingerprint  # the embedded market itself is reproducible
    sel = a['p1'].transformer.selected_features_
    assert list(sel) == list(b['p1'].transformer.selected_features_) and len(sel) >= 5  # same features, same order
    pa, pb = a['p2'].predictions, b['p2'].predictions
    lgb = [c for c in pa.columns if c.startswith('lightgbm__')]
    assert lgb and list(pa.columns) == list(pb.columns)
    for c in lgb:  # LightGBM: bit for bit
        assert np.array_equal(pa[c].to_numpy(), pb[c].to_numpy(), equal_nan=True), c
    for c in [c for c in pa.columns if '__' in c]:  # every model: 1e-6
        np.testing.assert_allclose(pa[c].to_numpy(float), pb[c].to_numpy(float), rtol=0, atol=1e-6, err_msg=c)
    np.testing.assert_allclose(a['p1'].transformed.to_numpy(float), b['p1'].transformed.to_numpy(float), atol=1e-6)
    ma = json.loads((a['root']/'reports'/'metrics.json').read_text())
    mb = json.loads((b['root']/'reports'/'metrics.json').read_text())
    diffs = numbers_close({k: ma[k] for k in ('phase1', 'phase2', 'oracle')}, {k: mb[k] for k in ('phase1', 'phase2', 'oracle')})
    assert not diffs, diffs[:10]
    # the verdict sentences differ only in the timings they quote (and whether a timing crossed its 3x bar)
    strip = lambda v: [re.sub(r'[0-9.]+', '#', x) for x in v if not re.search(r'faster|slower|time|second', x, re.I)]
    assert strip(ma['phase2'].get('verdict') or []) == strip(mb['phase2'].get('verdict') or [])
    # the artifacts that decide later phases are byte-identical too (the selected-feature list)
    fa, fb = (verify_manifest(x['root']/'metadata')['files'] for x in (a, b))
    top = a['p1'].manifest['meta']['top_features_file']
    assert fa[top]['sha256'] == fb[top]['sha256']


# ------------------------------------------------------------------------------ interruption: no orphans
@pytest.mark.e2e
def test_sigkill_of_a_real_quick_run_leaves_no_kernel_and_complete_artifacts(twice, tmp_path):
    root = make_root(tmp_path/'root')
    shutil.copytree(twice[0]['root']/'metadata', root/'metadata')  # the previous complete Phase 1 artifacts
    before = verify_manifest(root/'metadata')
    proc = start_driver(root, '--config', 'configs/quick.yaml', '--phases', '1', '2', '--run-name', 'k', '--nbs-dir', REPO/'nbs')
    try:
        kernel = wait_for_kernel(proc)
        time.sleep(4)  # part-way through Phase 1 (data, features, selection)
        family = [kernel.pid] + [c.pid for c in kernel.children(recursive=True)]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None: proc.kill()
    assert wait_gone(family, 5.0) == [], 'kernel processes survived the driver'
    # previous complete artifacts or a complete new set, never a mix: the manifest verifies every file
    after = verify_manifest(root/'metadata')
    assert after['files'] == before['files'] or after['created'] != before['created']
    # the next run starts cleanly: Phase 2 alone accepts the metadata, and the dead run is shown as killed
    rc, out, err = main_in(root, '--config', 'configs/quick.yaml', '--phases', '2', '--dry-run')
    assert rc == 0, err
    rc, out, err = main_in(root, '--list')
    assert rc == 0 and 'killed' in out, out


@pytest.mark.e2e
@pytest.mark.parametrize('sig', [signal.SIGINT, signal.SIGKILL], ids=['SIGINT', 'SIGKILL'])
def test_kill_mid_write_stops_kernel_and_children_and_keeps_the_old_artifacts(tmp_path, sig):
    """A phase stopped while its ArtifactWriter is staging (its kernel also runs a child process): the kernel and
    its child are gone within seconds, the old folder stays, the staging folder is cleaned by the next writer."""
    root = make_root(tmp_path/'root')
    with ArtifactWriter(root/'metadata', 'demo', {'v': 1}) as w: w.save_json('a.json', {'v': 1})
    body = ("import subprocess, time, pathlib\nfrom pipeline_lib.core.artifacts import ArtifactWriter\n"
            "child = subprocess.Popen(['sleep', '120'])\nprint('CHILD', child.pid, flush=True)\n"
            "with ArtifactWriter(pathlib.Path(artifact_root)/'metadata', 'demo', {'v': 2}) as w:\n"
            "    w.save_json('a.json', {'v': 2}); w.save_json('b.json', {'half': True})\n"
            "    pathlib.Path(artifact_root, 'STAGED').write_text('1')\n    time.sleep(120)\n")
    nbs = tmp_path/'nbs'
    write_demo_phase(nbs/'10_phase1_demo.ipynb', body=body)
    proc = start_driver(root, '--phases', '1', '--run-name', 'i', '--nbs-dir', nbs)
    try:
        kernel = wait_for_kernel(proc)
        t0 = time.monotonic()
        while not (root/'STAGED').exists():
            assert time.monotonic() - t0 < 60 and proc.poll() is None, proc.stdout.read() if proc.poll() is not None else 'timeout'
            time.sleep(0.1)
        family = [kernel.pid] + [c.pid for c in kernel.children(recursive=True)]
        assert len(family) >= 2  # the kernel and its `sleep` child
        t0 = time.monotonic()
        proc.send_signal(sig)
        rc = proc.wait(30)
        out = proc.stdout.read()
    finally:
        if proc.poll() is None: proc.kill()
    if sig == signal.SIGINT:
        assert rc == EXIT_INTERRUPTED and 'nterrupted' in out, out
        assert time.monotonic() - t0 < 15
    else:
        assert rc == -signal.SIGKILL
    assert wait_gone(family, 5.0) == [], f'a kernel or its child survived {sig.name}'
    m = verify_manifest(root/'metadata')
    assert m['meta'] == {'v': 1} and sorted(m['files']) == ['a.json'] and not (root/'metadata'/'b.json').exists()
    run = json.loads((root/'reports'/'i'/'metrics.json').read_text())['run']
    if sig == signal.SIGINT:
        assert run['status'] == 'interrupted' and run['phases']['1']['status'] == 'interrupted'
    else:  # nothing could be recorded; the index and --list show the dead run as killed
        assert run['status'] == 'running' and collect_runs(root/'reports')[0]['run']['status'] == 'killed'
    staged = list(root.glob('.metadata.staging-*'))
    t0 = time.monotonic()  # a killed kernel is a zombie until init reaps it (~2 s here); a zombie's pid still "exists"
    while any(psutil.pid_exists(p) for p in family) and time.monotonic() - t0 < 8: time.sleep(0.1)
    with ArtifactWriter(root/'metadata', 'demo', {'v': 3}) as w: w.save_json('a.json', {'v': 3})  # the next writer
    assert not list(root.glob('.metadata.staging-*')) and verify_manifest(root/'metadata')['meta'] == {'v': 3}, staged


# -------------------------------------------------------------- tampering and drift: refused before unpickling
@pytest.fixture
def meta_copy(twice, tmp_path):
    "A scratch root holding a copy of the quick run's Phase 1 artifacts."
    root = make_root(tmp_path/'root')
    shutil.copytree(twice[0]['root']/'metadata', root/'metadata')
    return root


@pytest.fixture
def no_unpickling(monkeypatch):
    import joblib
    def boom(*a, **k): raise AssertionError('something was unpickled')
    monkeypatch.setattr(joblib, 'load', boom)


@pytest.mark.e2e
def test_modified_artifact_is_refused(meta_copy, no_unpickling):
    from pipeline_lib.phases.phase1 import phase1_expect
    from pipeline_lib.phases.transformer import FeatureTransformer
    gmm = next(p for p in (meta_copy/'metadata').iterdir() if 'gmm' in p.name)
    data = bytearray(gmm.read_bytes()); data[len(data)//2] ^= 0xFF; gmm.write_bytes(bytes(data))
    rc, out, err = main_in(meta_copy, '--config', 'configs/quick.yaml', '--phases', '2', '--dry-run')
    assert rc == EXIT_BAD_INPUT and gmm.name in err and 'modified' in err and 'Phase 1' in err, err
    with pytest.raises(ArtifactError, match='modified after it was written'):
        FeatureTransformer.load(meta_copy/'metadata', expect=phase1_expect(load_config(QUICK)))


@pytest.mark.e2e
def test_artifacts_of_another_feature_config_are_refused(meta_copy, no_unpickling):
    from pipeline_lib.phases.phase1 import phase1_expect
    from pipeline_lib.phases.transformer import FeatureTransformer
    rc, out, err = main_in(meta_copy, '--config', 'configs/quick.yaml', '--set', 'features.exclude=[rsi]', '--phases', '2', '--dry-run')
    assert rc == EXIT_BAD_INPUT and 'different Phase 1 config' in err and 'features.exclude' in err, err
    other = load_config(QUICK, {'features': {'exclude': ['rsi']}})
    with pytest.raises(ArtifactError, match='another feature config'):
        FeatureTransformer.load(meta_copy/'metadata', expect=phase1_expect(other))


@pytest.mark.e2e
def test_artifacts_of_another_library_version_warn_clearly(meta_copy, monkeypatch):
    "Another pipeline_lib version: a warning (the hashes and config still match, so they are usable), or a refusal on request."
    from pipeline_lib.phases.phase1 import phase1_expect
    from pipeline_lib.phases.transformer import FeatureTransformer
    mp = meta_copy/'metadata'/'manifest.json'
    m = json.loads(mp.read_text()); m['versions']['pipeline_lib'] = '9.9.9'; mp.write_text(json.dumps(m))
    rc, out, err = main_in(meta_copy, '--config', 'configs/quick.yaml', '--phases', '2', '--dry-run')
    assert rc == 0 and 'warning:' in err and 'pipeline_lib 9.9.9' in err and 'run Phase 1 again' in err, err
    m['versions']['sklearn'] = '0.1.0'; mp.write_text(json.dumps(m))  # a pickle from another scikit-learn
    rc, out, err = main_in(meta_copy, '--config', 'configs/quick.yaml', '--phases', '2', '--dry-run')
    assert rc == 0 and 'sklearn 0.1.0 (now' in err, err
    cfg = load_config(QUICK)
    with pytest.warns(ArtifactWarning, match='pipeline_lib 9.9.9'):
        FeatureTransformer.load(meta_copy/'metadata', expect=phase1_expect(cfg))
    import joblib
    monkeypatch.setattr(joblib, 'load', lambda *a, **k: pytest.fail('unpickled before the version check'))
    with pytest.raises(ArtifactError, match='pipeline_lib 9.9.9'):
        FeatureTransformer.load(meta_copy/'metadata', expect=phase1_expect(cfg), on_version='error')


@pytest.mark.e2e
def test_data_that_changed_since_phase1_is_refused(meta_copy, no_unpickling, tmp_path):
    "Same path, other rows: the driver's reuse check compares data fingerprints; FeatureTransformer.load with expect too."
    from pipeline_lib.features.store import data_fingerprint
    from pipeline_lib.data.load import load_bars
    from pipeline_lib.data.market import make_market
    from pipeline_lib.phases.phase1 import phase1_expect
    from pipeline_lib.phases.transformer import FeatureTransformer
    bars, _ = make_market(n_symbols=2, n_days=3, seed=3)
    path = tmp_path/'bars.parquet'
    bars.to_parquet(path)
    fp = data_fingerprint(load_bars(path))
    mp = meta_copy/'metadata'/'manifest.json'
    m = json.loads(mp.read_text())
    m['meta']['config']['data']['source'] = str(path.resolve())   # as if Phase 1 had been trained on this file ...
    m['meta']['data_source'] = str(path.resolve())
    m['meta']['data_fingerprint'] = fp
    mp.write_text(json.dumps(m))
    args = ('--config', 'configs/quick.yaml', '--data-dir', path, '--phases', '2', '--dry-run')
    rc, out, err = main_in(meta_copy, *args)
    assert rc == 0, err  # ... then it is accepted
    bars.assign(close=bars['close']*1.001, high=bars['high']*1.001, open=bars['open']*1.001, low=bars['low']*1.001).to_parquet(path)
    rc, out, err = main_in(meta_copy, *args)  # ... and once the file changes, refused
    assert rc == EXIT_BAD_INPUT and 'trained on different data' in err and fp in err, err
    with pytest.raises(ArtifactError, match='data_fingerprint'):
        FeatureTransformer.load(meta_copy/'metadata', expect=phase1_expect(load_config(QUICK), fingerprint='0'*32))


# ----------------------------------------------------------------------------- bad input, end to end
BAD = _bad_cases(walk_bars())


@pytest.fixture(scope='module')
def bad_root(tmp_path_factory):
    return make_root(tmp_path_factory.mktemp('bad'))


@pytest.mark.parametrize('case', list(BAD))
def test_malformed_data_is_refused_by_the_driver(bad_root, tmp_path, case):
    write, want = BAD[case]
    path = write(tmp_path)
    t0 = time.perf_counter()
    listed = (want.get('kw') or {}).get('user_columns')   # what load_bars is given, the driver gets as a setting
    sets = ['--set', f"features.user_columns=[{', '.join(listed)}]"] if listed else []
    rc, out, err = main_in(bad_root, '--config', 'configs/quick.yaml', '--data-dir', path, '--run-name', 'bad', *sets)
    assert rc == EXIT_BAD_INPUT, (out, err)
    assert time.perf_counter() - t0 < FAST_S
    assert err.startswith('error: ') and want['msg'] in err and 'Traceback' not in err, err
    for key in ('column', 'symbol'):
        if key in want: assert repr(want[key]) in err, err
    assert written(bad_root) == []


@pytest.mark.slow
def test_malformed_data_through_run_notebooks_py(tmp_path):
    "The real entry point: exit status 2 within seconds, the problem named, nothing written."
    root = make_root(tmp_path/'root')
    write, want = BAD['high < low']
    path = write(tmp_path)
    env = {**os.environ, 'PIPELINE_ROOT': str(root)}
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, str(DRIVER), '--data-dir', str(path), '--nbs-dir', str(REPO/'nbs')], cwd=root, env=env, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2 and want['msg'] in p.stderr and "column 'high'" in p.stderr, p.stderr
    assert time.perf_counter() - t0 < FAST_S and written(root) == []


@pytest.mark.parametrize('sets, expect', [
    (['phase1.n_features=abc'], 'phase1.n_features must be an integer'),
    (['split.valid=1.5'], 'split.valid = 1.5 is out of range'),
    (['phase1.n_features=500'], 'more than the 421 features'),
    (['targets.horizons=[-5]'], 'targets.horizons = [-5] is out of range'),
    (['phase2.models=[lightgbm, xgboost]'], "Unknown model 'xgboost'"),
    (['primary_target=fwd_ret_7m'], 'the available targets are: fwd_ret_5m, mfe, mdd, tth'),
])
def test_bad_config_values_are_refused_with_a_clear_message(bad_root, sets, expect):
    args = [a for s in sets for a in ('--set', s)]
    rc, out, err = main_in(bad_root, '--config', 'configs/quick.yaml', *args)
    assert rc == EXIT_BAD_INPUT and expect in err and 'Traceback' not in err, err
    assert written(bad_root) == []


# ---------------------------------------------------------------------------------------------- resources
def test_too_much_data_is_refused_before_it_is_read(bad_root, tmp_path, monkeypatch):
    monkeypatch.setattr(preflight, 'available_memory', lambda: 64*2**20)
    rc, out, err = main_in(bad_root, '--config', 'configs/quick.yaml')  # the embedded market: 4 x 10 x 390 rows
    assert rc == EXIT_BAD_INPUT and '15,600 rows' in err and '64 MiB is available' in err and 'rows would fit' in err, err
    # a file: estimated from its size, refused before load_bars reads it
    from pipeline_lib.data.market import make_market
    bars, _ = make_market(n_symbols=2, n_days=2, seed=1)
    bars.to_parquet(tmp_path/'big.parquet')
    import pipeline_lib.data.load
    monkeypatch.setattr(pipeline_lib.data.load, 'load_bars', lambda *a, **k: pytest.fail('the data was read'))
    monkeypatch.setattr(preflight, 'available_memory', lambda: 2**20)
    rc, out, err = main_in(bad_root, '--data-dir', tmp_path/'big.parquet')
    assert rc == EXIT_BAD_INPUT and f'about {len(bars):,} rows, estimated from the file sizes' in err, err
    assert written(bad_root) == []
    # plenty of memory: no complaint; tight memory: a warning, not a refusal
    assert preflight.memory_check(15_600, load_config(QUICK), 421, 'x', available=2**40) is None
    need = preflight.estimate_bytes(15_600, 421, 5, 61)
    assert 'more than half' in preflight.memory_check(15_600, load_config(QUICK), 421, 'x', available=int(need*1.5))


def test_data_size_options_are_validated_and_counted():
    assert preflight.data_option_problems({'data': {'max_rows': 0}}) and preflight.data_option_problems({'data': {'max_rows': 2.5}})
    assert preflight.data_option_problems({'data': {'sample': 0}}) and preflight.data_option_problems({'data': {'sample': True}})
    assert not preflight.data_option_problems({'data': {'max_rows': 1000, 'sample': 0.25}})
    assert preflight.effective_rows(10_000, {'data': {'sample': 0.25}}) == 2_500
    assert preflight.effective_rows(10_000, {'data': {'max_rows': 3_000, 'sample': 0.5}}) == 3_000
    cfg = load_config(QUICK)
    with pytest.raises(preflight.ResourceError):   # 4 GiB: a phase's libraries and torch's working memory take 1.4
        preflight.memory_check(10**7, cfg, 421, 'x', available=2**32)
    assert preflight.memory_check(10**7, {**cfg, 'data': {'max_rows': 10_000}}, 421, 'x', available=2**32) is None


def test_a_grid_worker_exits_when_the_driver_dies():
    "`--workers N` runs grid points in worker processes; `_guard_parent` makes one exit as soon as its driver is killed."
    child = ("import time; from pipeline_lib.driver.execute import _guard_parent; _guard_parent(); print('guarded', flush=True); "
             "time.sleep(60)")
    code = (f"import subprocess, sys, time\np = subprocess.Popen([sys.executable, '-c', {child!r}])\n"
            "print(p.pid, flush=True); time.sleep(60)")
    driver = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, text=True)
    try:
        worker = int(driver.stdout.readline())
        assert driver.stdout.readline().strip() == 'guarded'
        assert alive([worker]) == [worker]
        driver.kill(); driver.wait(10)
        assert wait_gone([worker], 3.0) == []
    finally:
        if driver.poll() is None: driver.kill()
        with contextlib.suppress(Exception): os.kill(worker, signal.SIGKILL)
