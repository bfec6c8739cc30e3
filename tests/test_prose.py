"""Notebook prose quotes no measured result: a figure typed into markdown goes stale with the next run.

The notebooks read like a short paper, and a paper's numbers must be the run's. A result is either computed
in a visible cell (the prose points to its output) or measured by a benchmark (the prose names the command);
the generator's and the models' *settings* are definitions and may be written down. These checks look for
the shapes measured results take in prose: IC-like decimals, approximate decimals, and tables of figures."""
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
NOTEBOOKS = sorted((ROOT/'nbs').glob('*.ipynb'))


def markdown_cells():
    "(notebook name, cell id, text) of every markdown cell of every notebook."
    for nb in NOTEBOOKS:
        for cell in json.loads(nb.read_text())['cells']:
            if cell['cell_type'] == 'markdown':
                yield nb.name, cell.get('id'), ''.join(cell['source'])


def quoted(pattern):
    return [f'{nb} cell {cid}: {m.group(0)!r}' for nb, cid, text in markdown_cells() for m in re.finditer(pattern, text)]


IC_LIKE = r'(?<![\w.])\d*\.0[1-9]\d+'                      # 0.060, .045: how ICs are quoted
APPROXIMATE = r'(?:\b(?:about|near|nearly|roughly|around|approximately)\s+|[≈~]\s*)[-+]?\d*\.\d+'  # a definition is exact
NUMBER_CELL = re.compile(r'^[*~]*[-+]?\d[\d,]*(?:\.\d+)?[*]*\s*(?:%|s|ms|x|MiB|GiB|MB|GB)?(?:\s|\(|$)')


def figure_tables():
    "Markdown tables whose body cells are mostly numbers, at least one a decimal or a measured unit."
    out = []
    for nb, cid, text in markdown_cells():
        for table in re.findall(r'(?:^\|.*\|[ \t]*\n?)+', text, flags=re.M):
            rows = [r.strip().strip('|').split('|') for r in table.strip().split('\n')]
            body = [c.strip() for r in rows[1:] if not set(''.join(r)) <= set('-: ') for c in r]
            numeric = [c for c in body if NUMBER_CELL.match(c)]
            if body and len(numeric) > len(body) / 2 and any(re.search(r'\d\.\d|MiB|GiB| s\b', c) for c in numeric):
                out.append(f'{nb} cell {cid}: table {rows[0]!r}')
    return out


def test_notebook_prose_quotes_no_ic_like_number():
    found = quoted(IC_LIKE)
    assert not found, 'IC-like numbers hard-coded in notebook prose (compute them in a cell or point to a bench): ' + '; '.join(found)


def test_notebook_prose_quotes_no_approximate_decimal():
    found = quoted(APPROXIMATE)
    assert not found, 'approximate (measured) figures hard-coded in notebook prose: ' + '; '.join(found)


def test_notebook_prose_has_no_table_of_measured_figures():
    found = figure_tables()
    assert not found, 'tables of measured figures in notebook prose (print them from a cell or a bench): ' + '; '.join(found)


@pytest.mark.parametrize('text, ic_like, approximate, table', [
    ('the IC rose from 0.060 to 0.065', True, False, False),
    ('an oracle IC near 0.11', False, True, False),
    ('wall times ~1.4 GiB', False, True, False),
    ('| seed | IC |\n|---|---|\n| 1 | 0.124 |\n| 2 | 0.096 |\n', True, False, True),
    ('| rows | build |\n|---|---|\n| 200,000 | 2.8 s |\n', False, False, True),
    ('an AR(1) with coefficient 0.995, jumps with probability 0.001 per bar', False, False, False),   # definitions
    ('| kind | warm-up |\n|---|---|\n| `bar` | 0 |\n| `rolling` | the window |\n', False, False, False)])
def test_the_prose_checks_tell_measured_figures_from_definitions(text, ic_like, approximate, table, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], 'markdown_cells', lambda: iter([('x.ipynb', 'c', text)]))
    assert bool(quoted(IC_LIKE)) == ic_like and bool(quoted(APPROXIMATE)) == approximate
    assert bool(figure_tables()) == table


def _bench_selection():
    spec = importlib.util.spec_from_file_location('bench_selection', ROOT/'bench'/'bench_selection.py')
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_bench_selection_prints_each_models_fraction_of_the_oracle_and_the_mean_over_seeds(tmp_path, monkeypatch, capsys):
    "What 102_data.market's prose used to quote as a table is printed by the bench, per seed and over seeds."
    bench = _bench_selection()
    T = 'fwd_ret_5m'
    def metrics(oracle, n, all_):
        return {'checks': {'primary_target': T, 'oracle_test_ic': oracle},
                'models': {'lightgbm': {T: {'test': {'ic': n}}}, 'baseline_all_features': {T: {'test': {'ic': all_}}}}}
    assert bench.oracle_fractions(metrics(0.10, 0.08, 0.06)) == pytest.approx({'oracle_ic': 0.10, 'frac_n': 0.8, 'frac_all': 0.6})
    assert bench.oracle_fractions(metrics(None, 0.08, 0.06)) == {'oracle_ic': None, 'frac_n': None, 'frac_all': None}
    assert bench.oracle_fractions(metrics(0.0, 0.08, 0.06))['frac_n'] is None       # no planted signal: no fraction
    per_seed = {1: (0.10, 0.08, 0.06), 2: (0.12, 0.06, 0.06)}
    base = {'ic_n': 0.07, 'ic_all': 0.06, 'diff': 0.01, 'se': 0.01, 't': 1.0, 'speed_ratio_wall': 4.0,
            'within_one_se': True, 'speed_ok': True, 'seconds': 1.0}
    monkeypatch.setattr(bench, 'one_seed', lambda cfg, s, root: {'seed': s, **base, **bench.oracle_fractions(metrics(*per_seed[s]))})
    monkeypatch.setattr(bench, 'scratch_root', lambda name: tmp_path)
    assert bench.main(['--seeds', '1', '2', '--json', str(tmp_path/'out.json')]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] in (['1'], ['2'])}
    assert rows['1'][7:10] == ['0.1000', '0.80', '0.60'] and rows['2'][7:10] == ['0.1200', '0.50', '0.50']
    o = json.loads((tmp_path/'out.json').read_text())['summary']['oracle']
    assert o['frac_n']['mean'] == pytest.approx(0.65) and o['frac_all']['mean'] == pytest.approx(0.55)
    assert o['oracle_ic']['mean'] == pytest.approx(0.11) and o['frac_n']['lo'] < 0.65 < o['frac_n']['hi']
    assert 'N features 0.65 [' in out and 'all features 0.55 [' in out
