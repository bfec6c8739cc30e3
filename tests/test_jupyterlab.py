"""JupyterLab from the repo root opens our notebooks in a real browser, and they run top to bottom on their defaults.

Starts `jupyter lab --no-browser` (the venv's) on a free loopback port with a random token and the repo root as its
root, opens `nbs/000_core.config.ipynb` in headless Chromium (Debian's `chromium`, driven by Playwright's Python API; no
browser download), waits for its cells to render, runs every cell through JupyterLab's own "Run All" command in the
kernel JupyterLab started for it, and checks that no cell errored, that the kernel is the environment's Python with
cwd `nbs/`, that `settings.ini`'s paths resolve from the repo root, and that the notebook file was not modified.
Skips (with the reason) when Chromium or Playwright is missing, or fails instead where REQUIRE_BROWSER_TESTS=1;
`.ci/run` installs Chromium and sets it, so CI does run it.
"""
from __future__ import annotations

import configparser
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = 'nbs/000_core.config.ipynb'
CHROMIUM = os.environ.get('CHROMIUM') or shutil.which('chromium') or '/usr/bin/chromium'
CHROMIUM_FLAGS = ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--disable-background-networking',
                  '--disable-quic', '--no-first-run', '--disable-component-update', '--disable-sync',
                  '--disable-extensions', '--no-default-browser-check']
TIMEOUT_MS = 45_000  # any one wait; the whole test takes ~15 s on 2 cores

# Checked in the kernel after "Run All": where it runs, which Python, and what settings.ini resolves to.
PROBE = """
import json as _j, os as _o, sys as _s
from pipeline_lib.core.config import load_settings as _ls
_st = _ls()
print('PROBE' + _j.dumps({'cwd': _o.getcwd(), 'prefix': _s.prefix, 'root': str(_st['root']),
                          'cache_dir': str(_st['cache_dir']), 'in_test': _o.environ.get('IN_TEST')}))
"""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _jupyter_cmd() -> list[str]:
    "The environment's `jupyter lab` (the venv's when tests run from it), so its kernels use the same Python."
    exe = Path(sys.executable).parent/'jupyter'
    return [str(exe), 'lab'] if exe.exists() else [sys.executable, '-m', 'jupyterlab']


def _api(base: str, token: str, path: str, method: str = 'GET'):
    req = urllib.request.Request(f'{base}{path}', method=method, headers={'Authorization': f'token {token}'})
    with urllib.request.urlopen(req, timeout=5) as r:
        body = r.read()
    return json.loads(body) if body else None


def _tail(path: Path, n: int = 4000) -> str:
    try: return path.read_text(errors='replace')[-n:]
    except OSError: return '(no log)'


@pytest.fixture
def jupyterlab(tmp_path):
    "A running JupyterLab on loopback rooted at the repo: yields (base_url, token, log_path); always stopped after."
    port, token = _free_port(), secrets.token_hex(24)
    settings = tmp_path/'lab-settings'
    # Never write into the repo or $HOME: autosave off (running cells dirties the notebook); workspaces, runtime,
    # user data and checkpoints (JupyterLab makes one when it opens a notebook) in tmp.
    # No news or update checks either (nothing to reach from CI).
    for plugin, value in (('docmanager-extension/plugin', {'autosave': False}),
                          ('apputils-extension/notification', {'checkForUpdates': False, 'fetchNews': 'false'})):
        f = settings/'@jupyterlab'/f'{plugin}.jupyterlab-settings'
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(value))
    env = {**os.environ, 'JUPYTERLAB_SETTINGS_DIR': str(settings), 'JUPYTERLAB_WORKSPACES_DIR': str(tmp_path/'ws'),
           'JUPYTER_RUNTIME_DIR': str(tmp_path/'runtime'), 'JUPYTER_CONFIG_DIR': str(tmp_path/'jupyter-config'),
           'JUPYTER_DATA_DIR': str(tmp_path/'jupyter-data'),  # signing key + trust db; kernelspecs: the venv's
           'IN_TEST': '1'}  # the kernel inherits IN_TEST: the notebook's trailing nbdev_export() does nothing
    env.pop('PIPELINE_ROOT', None)  # the notebook must find the repo root by itself
    cmd = [*_jupyter_cmd(), '--no-browser', '--ServerApp.ip=127.0.0.1', f'--ServerApp.port={port}',
           '--ServerApp.port_retries=0', f'--IdentityProvider.token={token}', f'--ServerApp.root_dir={ROOT}',
           '--LabApp.expose_app_in_browser=True',
           f'--FileCheckpoints.checkpoint_dir={tmp_path/"checkpoints"}',
           # safety net if pytest is killed before teardown: idle kernels culled, then the server exits
           '--MappingKernelManager.cull_idle_timeout=600', '--ServerApp.shutdown_no_activity_timeout=60']
    if hasattr(os, 'geteuid') and os.geteuid() == 0: cmd.append('--allow-root')
    log = tmp_path/'jupyterlab.log'
    with open(log, 'wb') as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    base = f'http://127.0.0.1:{port}'
    try:
        deadline = time.monotonic() + 40
        while True:
            if proc.poll() is not None:
                pytest.fail(f'jupyter lab exited with {proc.returncode} before it was ready:\n{_tail(log)}')
            try:
                if 'started' in _api(base, token, '/api/status'): break
            except (urllib.error.URLError, ConnectionError, OSError, json.JSONDecodeError): pass
            if time.monotonic() > deadline: pytest.fail(f'jupyter lab not ready after 40 s:\n{_tail(log)}')
            time.sleep(0.25)
        yield base, token, log
    finally:
        try:  # shut the kernels down through the server, then the server, then anything left in its group
            for k in _api(base, token, '/api/kernels'): _api(base, token, f"/api/kernels/{k['id']}", 'DELETE')
        except Exception: pass
        if proc.poll() is None:
            proc.terminate()
            try: proc.wait(10)
            except subprocess.TimeoutExpired: pass
        try: os.killpg(proc.pid, signal.SIGKILL)  # our own process group (start_new_session): stray kernels
        except (ProcessLookupError, PermissionError): pass
        proc.wait(10)


def _skip(reason: str):
    "Skip, or fail where CI sets REQUIRE_BROWSER_TESTS=1 (so a missing browser cannot silently skip there)."
    if os.environ.get('REQUIRE_BROWSER_TESTS') == '1': pytest.fail(f'REQUIRE_BROWSER_TESTS=1 but {reason}')
    pytest.skip(reason)


@pytest.fixture
def browser_page(tmp_path):
    "A fresh headless Chromium page (Debian's chromium via Playwright; fresh profile); skips when either is absent."
    if not Path(CHROMIUM).is_file():
        _skip(f'Chromium not found at {CHROMIUM} (Debian: apt-get install chromium, or `make chromium`; or set '
              '$CHROMIUM to a Chromium binary); .ci/run installs it')
    try: from playwright import sync_api
    except ImportError: _skip('Playwright not installed (pip install -e ".[dev]"); it drives the system Chromium')
    with sync_api.sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(str(tmp_path/'chromium-profile'), executable_path=CHROMIUM,
                                                    headless=True, args=CHROMIUM_FLAGS,
                                                    viewport={'width': 1400, 'height': 1000})
        try:
            page = ctx.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            yield page
        finally:
            ctx.close()


def _sha(p: Path) -> str: return hashlib.sha256(p.read_bytes()).hexdigest()


def test_notebook_renders_and_runs_in_jupyterlab(browser_page, jupyterlab, tmp_path):  # browser first: skips fast
    base, token, log = jupyterlab
    page = browser_page
    nb_path = ROOT/NOTEBOOK
    nb = json.loads(nb_path.read_text())
    n_cells = len(nb['cells'])
    n_code = sum(c['cell_type'] == 'code' for c in nb['cells'])
    title = next(''.join(c['source']) for c in nb['cells'] if c['cell_type'] == 'markdown')
    title = next(l for l in title.splitlines() if l.startswith('# '))[2:].strip()
    before = _sha(nb_path)
    had_checkpoints = (nb_path.parent/'.ipynb_checkpoints').exists()
    console = []
    page.on('console', lambda m: console.append(f'{m.type}: {m.text}') if m.type == 'error' else None)
    step = 'open the notebook'
    try:
        page.goto(f'{base}/lab/tree/{NOTEBOOK}?token={token}')
        # 1. The notebook renders: every cell is in the DOM and the title (first markdown heading) is visible.
        page.wait_for_function('n => document.querySelectorAll(".jp-NotebookPanel .jp-Notebook .jp-Cell").length >= n',
                               arg=n_cells)
        page.locator('.jp-NotebookPanel .jp-MarkdownOutput h1', has_text=title).first.wait_for(state='visible')
        assert page.locator('.jp-NotebookPanel .jp-Notebook .jp-Cell').count() == n_cells
        assert page.locator('.jp-NotebookPanel .jp-CodeCell').count() == n_code

        step = "wait for the notebook's kernel"
        # 2. JupyterLab started the notebook's kernel (from its kernelspec) and it is idle.
        page.wait_for_function("""() => { const w = window.jupyterapp?.shell?.currentWidget;
            const k = w?.sessionContext?.session?.kernel; return !!k && k.status === 'idle'; }""")
        sessions = [s for s in _api(base, token, '/api/sessions') if s['path'] == NOTEBOOK]
        assert len(sessions) == 1 and sessions[0]['kernel']['name'] == nb['metadata']['kernelspec']['name'], sessions

        step = 'Run All'
        # 3. Run All through JupyterLab's own command, then read every cell's outputs from the notebook model.
        result = page.evaluate("""async () => {
            const app = window.jupyterapp, panel = app.shell.currentWidget;
            const ok = await app.commands.execute('notebook:run-all-cells');
            const cells = panel.content.model.toJSON().cells.filter(c => c.cell_type === 'code');
            return {ok, counts: cells.map(c => c.execution_count),
                    errors: cells.flatMap(c => c.outputs.filter(o => o.output_type === 'error')
                                                      .map(o => `${o.ename}: ${o.evalue}`))}; }""")
        assert result['errors'] == [], f'cells raised in JupyterLab: {result["errors"]}'
        assert result['ok'] is True, result
        assert all(isinstance(c, int) for c in result['counts']), f'cells left unexecuted: {result["counts"]}'
        assert result['counts'] == sorted(result['counts']), f'cells ran out of order: {result["counts"]}'

        step = 'probe the kernel'
        # 4. The same kernel: the environment's Python, cwd nbs/, settings.ini's paths from the repo root.
        out = page.evaluate("""async code => {
            const k = window.jupyterapp.shell.currentWidget.sessionContext.session.kernel;
            let text = ''; const f = k.requestExecute({code, store_history: false});
            f.onIOPub = m => { if (m.header.msg_type === 'stream') text += m.content.text;
                               if (m.header.msg_type === 'error') text += 'ERROR ' + m.content.evalue; };
            await f.done; return text; }""", PROBE)
        line = next((l for l in out.splitlines() if l.startswith('PROBE')), None)
        assert line, f'kernel probe printed nothing useful: {out!r}'
        probe = json.loads(line[len('PROBE'):])
        assert Path(probe['cwd']) == ROOT/'nbs', probe
        assert Path(probe['prefix']).resolve() == Path(sys.prefix).resolve(), (probe, sys.prefix)
        ini = configparser.ConfigParser()
        ini.read(ROOT/'settings.ini')
        assert Path(probe['root']) == ROOT, probe
        assert Path(probe['cache_dir']) == (ROOT/ini['pipeline']['cache_dir']).resolve(), (probe, 'not from the root')
        assert probe['in_test'] == '1', probe

        step = 'check the repo is untouched'
        # 5. Nothing was written back: the notebook is byte-for-byte unchanged, no checkpoint appeared.
        assert _sha(nb_path) == before, f'{NOTEBOOK} was modified by JupyterLab'
        if not had_checkpoints: assert not (nb_path.parent/'.ipynb_checkpoints').exists()
    except BaseException:
        shot = tmp_path/'jupyterlab_failure.png'
        try: page.screenshot(path=str(shot), full_page=True)
        except Exception as e: shot = f'(no screenshot: {e})'
        print(f'failed at step: {step}\nscreenshot: {shot}\nbrowser console errors:\n' + '\n'.join(console[-20:]) +
              f'\njupyter lab log:\n{_tail(log)}')
        raise
