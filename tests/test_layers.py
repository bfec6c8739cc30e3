"""The package is layered: core < data < features < evaluation < models < phases < driver < inference.

A module may import from its own layer or any layer below it, never above (lazy imports inside functions count
too: they are still a dependency). The public API names the README lists import from their layer packages.
"""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1]/'pipeline_lib'
LAYERS = ['core', 'data', 'features', 'evaluation', 'models', 'phases', 'driver', 'inference', 'targets']
# `targets` is the compatibility alias DESIGN section 5 names (pipeline_lib.targets -> pipeline_lib.data.targets).


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def layer(module: str) -> int | None:
    "Index of the layer `pipeline_lib.<layer>...` belongs to; None for the package root and nbdev's index."
    parts = module.split('.')
    if len(parts) < 2 or parts[1] in ('_modidx',): return None
    return LAYERS.index(parts[1]) if parts[1] in LAYERS else -1


def imports_of(path: Path) -> list[tuple[int, str]]:
    "Every pipeline_lib module `path` imports (absolute or relative, at top level or inside functions)."
    me = module_name(path).split('.')
    package = me if path.name == '__init__.py' else me[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith('pipeline_lib')]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = '.'.join(base + ([node.module] if node.module else []))
            else: target = node.module or ''
            if not target.startswith('pipeline_lib'): continue
            if target == 'pipeline_lib' or (node.level and not node.module):
                out += [(node.lineno, f'{target}.{a.name}') for a in node.names]
            else: out.append((node.lineno, target))
    return out


MODULES = sorted(p for p in PKG.rglob('*.py') if p.name != '_modidx.py')


def test_every_module_lives_in_a_layer():
    flat = [module_name(p) for p in MODULES if layer(module_name(p)) == -1]
    assert not flat, f'modules outside the layers {LAYERS}: {flat}'


@pytest.mark.parametrize('path', MODULES, ids=lambda p: module_name(p))
def test_imports_go_down_the_layers(path):
    me = layer(module_name(path))
    if me is None: return
    up = [f'line {n}: {t}' for n, t in imports_of(path) if (l := layer(t)) is not None and l > me]
    assert not up, f'{module_name(path)} ({LAYERS[me]}) imports from a layer above it: {up}'


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    "The rule would catch a real violation: a relative import from data up to the driver, inside a function."
    fake = PKG/'data'/'load.py'
    monkeypatch.setattr(Path, 'read_text', lambda self, *a, **k: 'def f():\n    from ..driver.cli import main\n')
    (line, target), = imports_of(fake)
    assert target == 'pipeline_lib.driver.cli' and layer(target) > layer(module_name(fake))


def test_public_api_imports_from_the_layer_packages():
    from pipeline_lib.data import build_targets, load_bars, make_market
    from pipeline_lib.features import build_features
    from pipeline_lib.inference import load_run
    from pipeline_lib.phases import FeatureTransformer
    import pipeline_lib.data.load, pipeline_lib.data.market, pipeline_lib.data.targets, pipeline_lib.features.build
    import pipeline_lib.phases.phase1, pipeline_lib.targets
    assert load_bars is pipeline_lib.data.load.load_bars and make_market is pipeline_lib.data.market.make_market
    assert build_targets is pipeline_lib.data.targets.build_targets is pipeline_lib.targets.build_targets
    assert build_features is pipeline_lib.features.build.build_features
    assert FeatureTransformer is pipeline_lib.phases.phase1.FeatureTransformer and callable(load_run)
