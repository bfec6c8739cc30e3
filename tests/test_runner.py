"""The batch driver (run_notebooks.py / pipeline_lib.driver).

Every driver run here happens in a scratch repo root (a copy of settings.ini and configs/ under a tmp folder,
selected with PIPELINE_ROOT), so the real metadata/, output/, reports/ and logs/ are never touched. One quick run
is shared by the report tests (session fixture); failure tests run the driver on bad input and check it stops in
seconds, before any kernel starts.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipeline_lib.core.artifacts import ArtifactWriter
from pipeline_lib.core.config import DependencyError, PipelineError, config_hash, flatten, load_settings
from pipeline_lib.driver.demo import write_demo_phase
from pipeline_lib.driver.errors import ConfigError, NotebookError
from pipeline_lib.driver.notebooks import check_notebook, discover_phases
from pipeline_lib.driver.plan import Options, grid_run_name, plan_runs
from pipeline_lib.driver.reports import RUN_KEYS, report_problems
from pipeline_lib.core.schema import range_problems, type_problems, unknown_keys
from pipeline_lib.driver.schema import parse_assignment, parse_grid, target_problems
from synthetic import realistic_bars

REPO = load_settings()['root']
DRIVER = REPO/'run_notebooks.py'
FAST_S = 10.0  # bad input must fail within this (the import of the driver included)


def make_root(path: Path) -> Path:
    "A scratch repo root: settings.ini (cache shared with the real repo, so features are not rebuilt) and configs/."
    path.mkdir(parents=True, exist_ok=True)
    text = (REPO/'settings.ini').read_text()
    text = re.sub(r'(?m)^cache_dir\s*=.*$', f'cache_dir = {REPO/".cache"}', text)
    (path/'settings.ini').write_text(text)
    shutil.copytree(REPO/'configs', path/'configs', dirs_exist_ok=True)
    return path


def drive(root: Path, *args, timeout=600):
    "Run the driver as a user would, in the scratch root; returns (CompletedProcess, seconds)."
    env = {**os.environ, 'PIPELINE_ROOT': str(root)}
    env.pop('IN_TEST', None)
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, str(DRIVER), *map(str, args)], cwd=root, env=env, capture_output=True,
                       text=True, timeout=timeout)
    return p, time.perf_counter() - t0


def demo_nbs(path: Path, **phase_kw) -> Path:
    "A notebooks folder with tiny phase 1 and phase 2 notebooks that report the kernel's environment."
    body = ("import os, sys\nprint('IN_TEST', os.environ.get('IN_TEST'))\nprint('CWD', os.getcwd())\n"
            "print('PYTHON', sys.executable)")
    write_demo_phase(path/'10_phase1_demo.ipynb', body=phase_kw.pop('body1', body), **phase_kw)
    write_demo_phase(path/'20_phase2_demo.ipynb', body=body)
    return path


def assert_no_kernel(root: Path, p):
    "Nothing was run: no traceback, no reports or logs written."
    assert 'Traceback' not in p.stderr, p.stderr
    assert not (root/'reports').exists() or not any((root/'reports').iterdir())
    assert not (root/'logs').exists() or not any((root/'logs').iterdir())


# ---------------------------------------------------------------------------------------------- the shared quick run
@pytest.fixture(scope='session')
def quick(tmp_path_factory):
    "One quick run shared by the report tests: Phase 1 and 2 of the real notebooks. Phase 3 is left out to keep the suite fast."
    root = make_root(tmp_path_factory.mktemp('quick'))
    nbs_before = sorted(p.name for p in (REPO/'nbs').iterdir())
    p, secs = drive(root, '--config', 'configs/quick.yaml', '--phases', '1', '2', '--run-name', 'quick', '--nbs-dir', REPO/'nbs')
    assert p.returncode == 0, p.stdout + p.stderr
    assert sorted(p.name for p in (REPO/'nbs').iterdir()) == nbs_before  # nothing executed lands in nbs/
    print(f'quick run: {secs:.1f} s')
    return {'root': root, 'run': root/'reports'/'quick', 'proc': p, 'seconds': secs}


@pytest.mark.e2e
def test_quick_run_writes_the_promised_reports(quick):
    run = quick['run']
    cfg = yaml.safe_load((run/'config.yaml').read_text())
    assert cfg['data']['market']['n_days'] == 10 and cfg['data']['source'] == 'embedded'  # quick.yaml merged, resolved
    m = json.loads((run/'metrics.json').read_text())
    r = m['run']
    assert set(RUN_KEYS) <= set(r)
    assert r['name'] == 'quick' and r['status'] == 'ok' and r['data'] == 'embedded' and r['primary_target'] == 'fwd_ret_5m'
    assert r['config_hash'] == config_hash(cfg) and r['seconds'] > 0
    assert all(ph['status'] == 'ok' for ph in r['phases'].values()) and r['config_diff'] == flatten(yaml.safe_load((REPO/'configs'/'quick.yaml').read_text()))
    assert 'phase1' in m and 'phase2' in m  # each phase merged its own key next to the driver's
    assert all((run/ph['html']).exists() for ph in r['phases'].values())
    assert report_problems(run) == []
    env = json.loads((run/'environment.json').read_text())
    assert env['packages']['pandas'] == pd.__version__ and env['python'].startswith('3.')
    assert env['git']['commit'] and isinstance(env['git']['dirty'], bool) and env['device']['resolved']
    # executed notebook and its HTML in reports/<run>/, a log per phase under the artifact root (the scratch root)
    html_files = list(run.glob('phase1_*.html'))
    assert len(html_files) == 1 and html_files[0].with_suffix('.ipynb').exists()
    logs = list((quick['root']/'logs').glob('phase1_*.log'))
    assert len(logs) == 1 and re.fullmatch(r'phase1_\d{8}_\d{6}\.log', logs[0].name)
    assert 'Executing Cell' in logs[0].read_text() and 'phase 1 ok after' in logs[0].read_text()
    assert not (REPO/'reports'/'quick').exists()  # the real reports/ was not touched
    index = (quick['root']/'reports'/'index.html').read_text()
    assert 'quick/' in index and html_files[0].name in index


def visible_text(html: str) -> str:
    "What a reader of the HTML sees (tags stripped, entities decoded): syntax highlighting splits code into spans."
    import html as _html
    body = html.split('<body', 1)[-1]
    body = re.sub(r'(?s)<(script|style)\b.*?</\1>', '', body)
    return _html.unescape(re.sub(r'<[^>]+>', '', body))


@pytest.mark.e2e
def test_report_html_is_self_contained_and_hides_plumbing(quick):
    html = next(quick['run'].glob('phase1_*.html')).read_text()
    text = visible_text(html)
    nb = json.loads(next(quick['run'].glob('phase1_*.ipynb')).read_text())
    injected = [c for c in nb['cells'] if 'injected-parameters' in c['metadata'].get('tags', [])]
    assert injected and "run_name = \"quick\"" in ''.join(injected[0]['source'])
    assert 'data:image/png;base64' in html and '<img src="http' not in html
    assert 'run_name = "quick"' not in text  # the injected-parameters cell is removed
    params = next(c for c in nb['cells'] if 'parameters' in c['metadata'].get('tags', []))
    first = next(l for l in ''.join(params['source']).splitlines() if '=' in l and not l.lstrip().startswith('#'))
    assert first.split('#')[0].strip() not in text  # the parameters cell's input is hidden


@pytest.mark.e2e
def test_phase1_report_has_shap_regime_and_overfitting_figures(quick):
    html = next(quick['run'].glob('phase1_*.html')).read_text()
    assert html.count('data:image/png;base64') >= 3
    for word in ('SHAP', 'regime', 'overfit'):
        assert re.search(word, html, re.I), f'no {word!r} in the Phase 1 report'


@pytest.mark.e2e
def test_phase2_alone_reuses_verified_phase1_artifacts_of_the_same_config(quick):
    p, secs = drive(quick['root'], '--config', 'configs/quick.yaml', '--phases', '2', '--dry-run', '--nbs-dir', REPO/'nbs')
    assert p.returncode == 0 and 'phase 2:' in p.stdout, p.stderr  # the quick run's metadata/ verifies and matches
    p, secs = drive(quick['root'], '--config', 'configs/quick.yaml', '--phases', '2', '--set', 'phase1.n_features=7',
                    '--nbs-dir', REPO/'nbs')
    assert p.returncode == 2 and secs < FAST_S and 'phase1.n_features' in p.stderr and '--phases 1 2' in p.stderr


@pytest.mark.e2e
def test_predictions_parquet_matches_the_contract(quick):
    df = pd.read_parquet(quick['run']/'predictions.parquet')
    assert {'symbol', 'timestamp', 'split'} <= set(df.columns)
    assert set(df['split'].unique()) <= {'train', 'valid', 'test'}
    assert not df.duplicated(['symbol', 'timestamp']).any()
    for c in df.columns:
        if '__' in c: assert c.split('__', 1)[1] in df.columns
    primary = yaml.safe_load((quick['run']/'config.yaml').read_text())['primary_target']
    assert primary in df.columns and f'oracle__{primary}' in df.columns  # embedded data: the oracle's predictions
    assert any(c.endswith(f'__{primary}') and not c.startswith('oracle') for c in df.columns)
    assert pd.api.types.is_datetime64_any_dtype(df['timestamp'])


# ---------------------------------------------------------------------------------------------------- runs of a grid
@pytest.mark.e2e
def test_grid_makes_separate_runs_and_one_index(tmp_path):
    root, nbs = make_root(tmp_path/'root'), demo_nbs(tmp_path/'nbs')
    p, _ = drive(root, '--config', 'configs/quick.yaml', '--phases', '1', '--run-name', 'g',
                 '--grid', 'phase1.n_features=5,8', '--workers', '2', '--nbs-dir', nbs)
    assert p.returncode == 0, p.stdout + p.stderr
    names = ['g__n_features=5', 'g__n_features=8']
    for name, n in zip(names, (5, 8)):
        m = json.loads((root/'reports'/name/'metrics.json').read_text())
        assert m['run']['status'] == 'ok' and m['phase1']['n_features'] == n
        assert m['run']['grid'] == {'group': 'g', 'params': {'phase1.n_features': n}}
        assert Path(m['run']['artifact_root']) == root/'runs'/name  # each grid run has its own artifact root
        log = next((root/'runs'/name/'logs').glob('phase1_*.log')).read_text()
        assert 'IN_TEST 1' in log and f'CWD {root}' in log  # kernel env and cwd
        assert f'PYTHON {sys.executable}' in log or f'PYTHON {Path(sys.executable).resolve()}' in log
    assert not (root/'metadata').exists() or not any((root/'metadata').iterdir())
    index = (root/'reports'/'index.html').read_text()
    assert all(f'href="{n}/"' in index for n in names) and 'Grid g' in index
    assert 'data:image/png;base64' in index  # the swept parameter's plot


# ----------------------------------------------------------------------------------------------- failing fast on input
@pytest.mark.slow
def test_bad_set_key_fails_fast_with_nearest_key(tmp_path):
    root = make_root(tmp_path/'root')
    p, secs = drive(root, '--set', 'phase1.n_featurs=30', '--nbs-dir', demo_nbs(tmp_path/'nbs'))
    assert p.returncode == 2 and secs < FAST_S, (p.returncode, secs)
    assert "Unknown config key 'phase1.n_featurs'" in p.stderr and 'phase1.n_features' in p.stderr
    assert_no_kernel(root, p)


@pytest.mark.slow
def test_wrong_type_and_range_fail_fast(tmp_path):
    root = make_root(tmp_path/'root')
    p, secs = drive(root, '--set', 'phase1.n_features=ten', '--set', 'split.train=1.5', '--nbs-dir', demo_nbs(tmp_path/'nbs'))
    assert p.returncode == 2 and secs < FAST_S
    assert 'phase1.n_features must be an integer' in p.stderr and 'split.train = 1.5 is out of range' in p.stderr
    assert_no_kernel(root, p)


@pytest.mark.slow
def test_missing_data_dir_fails_fast(tmp_path):
    root = make_root(tmp_path/'root')
    missing = tmp_path/'no_such_bars'
    p, secs = drive(root, '--data-dir', missing, '--nbs-dir', demo_nbs(tmp_path/'nbs'))
    assert p.returncode == 2 and secs < FAST_S, (p.returncode, secs)
    assert str(missing) in p.stderr and 'does not exist' in p.stderr
    assert_no_kernel(root, p)


@pytest.mark.slow
def test_unreadable_data_fails_fast_with_load_bars_message(tmp_path):
    root = make_root(tmp_path/'root')
    bad = tmp_path/'bars'; bad.mkdir()
    (bad/'AAA.csv').write_text('timestamp,open,high,low,close,volume\n2024-01-02 09:30,1,2,0.5,x,10\n')
    p, secs = drive(root, '--data-dir', bad, '--nbs-dir', demo_nbs(tmp_path/'nbs'))
    assert p.returncode == 2 and secs < FAST_S
    assert 'AAA.csv' in p.stderr
    assert_no_kernel(root, p)


@pytest.mark.slow
def test_daily_data_needs_a_daily_target(tmp_path):
    root = make_root(tmp_path/'root')
    bars = realistic_bars(n_symbols=2, n_bars=150, interval='1D', bars_per_day=1, missing=0.0)
    d = tmp_path/'daily'; d.mkdir()
    bars.to_csv(d/'bars.csv', index=False)
    p, secs = drive(root, '--data-dir', d, '--nbs-dir', demo_nbs(tmp_path/'nbs'))
    assert p.returncode == 2 and secs < FAST_S
    assert "Unknown target 'fwd_ret_5m'" in p.stderr and 'fwd_ret_5d' in p.stderr
    p, _ = drive(root, '--data-dir', d, '--set', 'primary_target=fwd_ret_5d', '--dry-run', '--nbs-dir', tmp_path/'nbs')
    assert p.returncode == 0 and str(d) in p.stdout, p.stderr
    assert_no_kernel(root, p)


@pytest.mark.slow
def test_phase2_without_phase1_artifacts_stops_with_a_clear_message(tmp_path):
    root = make_root(tmp_path/'root')
    p, secs = drive(root, '--phases', '2', '--nbs-dir', demo_nbs(tmp_path/'nbs'))
    assert p.returncode == 2 and secs < FAST_S
    assert "Phase 2 reuses Phase 1's artifacts" in p.stderr and '--phases 1 2' in p.stderr
    assert_no_kernel(root, p)


@pytest.mark.slow
def test_notebook_without_parameters_tag_is_refused(tmp_path):
    root = make_root(tmp_path/'root')
    nbs = tmp_path/'nbs'
    write_demo_phase(nbs/'10_phase1_untagged.ipynb', tagged=False)
    p, secs = drive(root, '--phases', '1', '--nbs-dir', nbs)
    assert p.returncode == 2 and secs < FAST_S
    assert 'no cell tagged "parameters"' in p.stderr and '10_phase1_untagged.ipynb' in p.stderr
    assert_no_kernel(root, p)


def test_notebook_missing_an_injected_parameter_is_refused(tmp_path):
    nbs = tmp_path/'nbs'
    write_demo_phase(nbs/'10_phase1_x.ipynb', params='config_path = None\noverrides = {}\ndata_dir = None\n'
                                                     'artifact_root = None\nreports_dir = None')
    ph = discover_phases(nbs)[1]
    with pytest.raises(NotebookError, match='does not define run_name'):
        check_notebook(ph, ('config_path', 'run_name'))


@pytest.mark.slow
def test_dry_run_checks_and_writes_nothing(tmp_path):
    root = make_root(tmp_path/'root')
    p, secs = drive(root, '--config', 'configs/quick.yaml', '--grid', 'phase1.n_features=5,8', '--run-name', 'd',
                    '--dry-run', '--nbs-dir', demo_nbs(tmp_path/'nbs'))
    assert p.returncode == 0 and secs < FAST_S, p.stderr
    assert 'd__n_features=5' in p.stdout and 'd__n_features=8' in p.stdout and 'nothing executed' in p.stdout
    assert_no_kernel(root, p)
    assert not (root/'runs').exists()


# ----------------------------------------------------------------------------------------------------- a failing phase
@pytest.mark.e2e
def test_failing_phase_stops_its_dependents_and_is_rendered(tmp_path):
    root = make_root(tmp_path/'root')
    nbs = demo_nbs(tmp_path/'nbs', body1="raise ValueError('boom in phase one')")
    p, _ = drive(root, '--config', 'configs/quick.yaml', '--run-name', 'bad', '--nbs-dir', nbs)
    assert p.returncode == 1, p.stdout + p.stderr
    err = ' '.join(p.stderr.split())
    assert 'Phase 1' in err and 'ValueError: boom in phase one' in err and 'in cell In [' in err
    assert re.search(r'logs/phase1_\d{8}_\d{6}\.log', err) and 'Traceback' not in p.stderr.split('error:')[-1][:200]
    m = json.loads((root/'reports'/'bad'/'metrics.json').read_text())['run']
    assert m['status'] == 'failed' and m['phases']['1']['status'] == 'failed' and m['phases']['2']['status'] == 'skipped'
    assert m['phases']['1']['error']['ename'] == 'ValueError'
    html = (root/'reports'/'bad'/'phase1_demo.html').read_text()
    assert 'boom in phase one' in html and 'An Exception was encountered' in html  # the error is highlighted
    assert not (root/'reports'/'bad'/'phase2_demo.ipynb').exists()


# ------------------------------------------------------------------------------------------ validation, in process
def test_parsing_set_and_grid_values():
    assert parse_assignment('targets.horizons=[5, 10]') == ('targets.horizons', [5, 10])
    assert parse_assignment('phase1.leakage.allow=') == ('phase1.leakage.allow', None)
    assert parse_grid(['targets.horizons=[5],[5,10]', 'a.b=x,y']) == [('targets.horizons', [[5], [5, 10]]), ('a.b', ['x', 'y'])]
    assert grid_run_name('g', {'targets.horizons': [5, 10], 'phase1.n_features': 20}) == 'g__horizons=5,10__n_features=20'
    with pytest.raises(ConfigError): parse_assignment('no_equals_sign')
    with pytest.raises(ConfigError): parse_grid(['a=1', 'a=2'])


def test_types_follow_the_defaults():
    d = {'a': {'f': 0.5, 'i': 3, 'b': True, 's': 'x', 'l': [5]}}
    assert type_problems({'a': {'f': 1, 'i': 3, 'b': False, 's': 'y', 'l': [1, 2]}}, d) == []  # int ok for float
    bad = type_problems({'a': {'f': 'big', 'i': 2.5, 'b': 1, 's': 3, 'l': 5}}, d)
    assert len(bad) == 5 and all(k in ' '.join(bad) for k in ('a.f', 'a.i', 'a.b', 'a.s', 'a.l'))
    assert len(type_problems({'a': {'l': [1, 'x']}}, d)) == 1
    assert type_problems({'a': 3}, d)  # a section replaced by a scalar


def test_unknown_keys_name_the_nearest_valid_keys():
    d = {'phase1': {'n_features': 50}, 'split': {'train': 0.6}, 'features': {}}
    (msg,) = unknown_keys({'n_features': 3}, d, '--set')
    assert "'n_features'" in msg and 'phase1.n_features' in msg
    assert unknown_keys({'features': {'anything': 1}}, d, 'x') == []  # an open (empty) section


def test_ranges_and_targets():
    cfg = {'split': {'train': 0.6, 'valid': 0.3, 'test': 0.3}, 'phase1': {'n_features': 0},
           'targets': {'horizons': [5, 0], 'path_horizon': 30}}
    probs = ' '.join(range_problems(cfg))
    assert 'phase1.n_features = 0' in probs and 'targets.horizons' in probs and 'more than 1' in probs
    ok = {'primary_target': 'fwd_ret_5m', 'targets': {'horizons': [5, 10]}}
    assert target_problems(ok) == [] and target_problems({**ok, 'primary_target': 'mdd'}) == []
    (msg,) = target_problems({**ok, 'primary_target': 'fwd_ret_5d'})
    assert 'fwd_ret_10m' in msg and 'tth' in msg


def test_phase2_reuses_only_verified_metadata_of_the_same_phase1_config(tmp_path):
    root = make_root(tmp_path/'root')
    nbs = demo_nbs(tmp_path/'nbs')
    plan = plan_runs(Options(phases=[1], nbs_dir=str(nbs)), root=root)
    cfg = plan.runs[0].config
    with ArtifactWriter(root/'metadata', 'phase1', {'config': cfg}) as w:
        w.save_json('top_2_features.json', ['a', 'b'])
    plan = plan_runs(Options(phases=[2], nbs_dir=str(nbs)), root=root)
    assert plan.runs[0].phases == [2]
    with pytest.raises(DependencyError, match=r'phase1\.n_features'):
        plan_runs(Options(phases=[2], nbs_dir=str(nbs), sets=['phase1.n_features=7']), root=root)
    (root/'metadata'/'top_2_features.json').write_text('["a", "c"]')
    with pytest.raises(DependencyError, match='SHA-256|bytes'):
        plan_runs(Options(phases=[2], nbs_dir=str(nbs)), root=root)


def test_report_problems_catches_contract_breaks(tmp_path):
    (tmp_path/'metrics.json').write_text('{"run": {"name": "x"}, "phase2": {"models": {"lightgbm": '
                                         '{"fwd_ret_5m": {"valid": {"ic": NaN}}}}}}')
    assert 'NaN' in ' '.join(report_problems(tmp_path))
    (tmp_path/'metrics.json').write_text(json.dumps({'run': {'name': 'x'}, 'phase2': {'models': {'lightgbm': {
        'fwd_ret_5m': {'valid': {'ic': 0.1}}, 'seconds': 1.0}}}}))
    probs = ' '.join(report_problems(tmp_path))
    assert 'lacks primary_target' in probs and 'phase2.models.lightgbm.fwd_ret_5m.valid lacks ic_se' in probs
    pd.DataFrame({'symbol': ['A', 'A'], 'timestamp': pd.to_datetime(['2024-01-02', '2024-01-02']), 'split': ['train', 'oops'],
                  'lightgbm__fwd_ret_5m': [0.1, 0.2]}).to_parquet(tmp_path/'predictions.parquet')
    probs = ' '.join(report_problems(tmp_path))
    assert "split labels ['oops']" in probs and 'duplicate' in probs and 'no realised target column fwd_ret_5m' in probs


@pytest.mark.e2e
def test_readme_checklist_commands_work_on_a_run(quick, tmp_path):
    "Every command of the README's verification checklist runs, as written, in a run's root and says what it promises."
    text = (REPO/'README.md').read_text()
    block = text.split('<!-- checklist:start -->')[1].split('<!-- checklist:end -->')[0]
    commands = [l for l in block.strip().strip('`').splitlines() if l.strip() and not l.startswith(('```', 'bash'))]
    assert len(commands) >= 5
    bin_dir = tmp_path/'bin'
    bin_dir.mkdir()
    (bin_dir/'python').write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')  # the README's `python` is the venv's
    (bin_dir/'python').chmod(0o755)
    shutil.copy(DRIVER, quick['root']/'run_notebooks.py')
    env = {**os.environ, 'PIPELINE_ROOT': str(quick['root']), 'PATH': f'{bin_dir}{os.pathsep}{os.environ["PATH"]}'}
    out = {}
    for cmd in commands:
        p = subprocess.run(['bash', '-c', cmd], cwd=quick['root'], env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, f'{cmd}\n{p.stdout}\n{p.stderr}'
        out[cmd.split('#')[0].strip()] = p.stdout
    n = len(json.loads(next((quick['root']/'metadata').glob('top_*_features.json')).read_text())['features'])
    assert f'top_{n}_features.json' in out['ls metadata/'] and 'manifest.json' in out['ls metadata/']
    feature_line = next(v for k, v in out.items() if 'FeatureTransformer' in k)
    assert feature_line.split()[0] == str(n + 11) and f'features: {n} selected' in feature_line
    assert 'lightgbm_fwd_ret_5m.joblib' in out['ls output/core_models/']
    show = out['python run_notebooks.py --show']
    assert 'run quick' in show and re.search(r'lightgbm\s+-?\d\.\d{3}\s+-?\d\.\d{3}\s+-?\d\.\d{3}', show) and 'oracle' in show
    assert 'quick' in out['python run_notebooks.py --list']
