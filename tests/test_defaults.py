"""`configs/experiment_defaults.yaml` is the one home of every default: the code reads every key it holds, and
every key the code reads is there.

How the check works, and the bug each part catches:

- **Static reads (AST).** Every module of `pipeline_lib` is parsed. An expression denotes a config path when it is
  a whole config (a variable named `cfg`/`config`, `load_config(...)`, `experiment_defaults()`), a section
  (`config_defaults('phase1.vae')`, a phase's `phaseN_options(cfg)`), or a string-literal subscript, `.get`,
  `.pop` or `in` test on one of these (through `x or {}`, `dict(x)`, `deep_merge(x, ...)`, and through variables
  assigned from them in the same function or module). Every such read is a dotted path.
  * A read whose path is not in the YAML fails (*a typo'd read*, *a key renamed in code but not in the YAML*),
    unless the code wrote that key itself (a settings function adding a derived value) or it sits below an open
    section (a YAML default of `{}`/`null`, or `core.schema.OPEN_SECTIONS`).
- **Sections handed over whole.** Some sections are splatted into a callable (`VAEEncoder(**vae)`,
  `make_market(**market)`, LightGBM's parameters). `HANDED_OVER` names them with the callable; each of their keys
  must be a parameter of it (checked with `inspect.signature`, so a renamed parameter fails) or be read by name.
- **Every YAML key is read.** A YAML leaf counts as used when its exact path is read (above), when its section is
  handed over whole (above), or, as a fallback for reads the AST cannot attribute to a section (keys iterated from
  a tuple of names, values passed through helper arguments), when its last part appears as a string-literal key
  (subscript, `.get`, `.pop`, `in`) somewhere in the package. A key nobody reads fails (*a YAML key nobody reads*).
  The fallback is weaker for short shared names (`seed`), which is why exact paths come first.
- **Signature defaults (dynamic).** The public estimators (`VAEEncoder`, `RegimeModel`, `select_on_train`,
  `FeatureTransformer`, `MultiTaskModel`), `make_market`, `build_targets`, `make_split` and the training defaults take their defaults from the YAML; they must
  agree with it (`FeatureTransformer()` with the transformer a default run builds), so `help()` and a
  config-driven run never disagree.
- **Model names.** Each phase reads its models from `models.registry`, which the driver's check reads too, and
  every Phase 3 name has a sequence model class.

Proof that it bites (done by hand when this was written, each one restored after): a bogus YAML key
(`phase2.bogus_unused_key`) fails the "every YAML key is read" test; renaming `phase1.vae.epochs` in the YAML fails
the "code reads" and "handed over" tests; a typo in a LightGBM parameter of `phase1.importance.lgbm_params` fails the
LightGBM check; a typo'd read (`cfg['primary_targt']` in phases.phase1) and a key renamed in code only
(`s['look_back']` in phase3_options) fail the "code reads" test, naming file and line.
"""
import ast
import inspect
from pathlib import Path

import pytest

from pipeline_lib.core.config import config_defaults, experiment_defaults, flatten
from pipeline_lib.core.schema import OPEN_SECTIONS

PKG = Path(__file__).resolve().parents[1]/'pipeline_lib'
ROOT_NAMES = {'cfg', 'config'}                       # variables that hold a whole run config
ROOT_CALLS = {'load_config', 'experiment_defaults'}  # calls that return one
SECTION_CALLS = {f'phase{n}_options': f'phase{n}' for n in (1, 2, 3)}  # calls that return a merged section
SAME_DICT_CALLS = {'dict', 'deep_merge', 'deepcopy'}  # calls whose result holds their first argument's keys
# Packages where those names hold one section: in the features layer `cfg`/`config` is the `features` section.
SECTION_NAMES = {'features': {'cfg': 'features', 'config': 'features'}}


def _str(node):
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _keys(node):
    "The string keys an index expression can take: a literal, or either branch of `a if c else b`."
    if isinstance(node, ast.IfExp): return _keys(node.body) + _keys(node.orelse)
    return [] if _str(node) is None else [_str(node)]


def _join(path, key):
    return key if path == '' else f'{path}.{key}'


def _dict_path(node, env):
    "The config path `node` denotes ('' for a whole config), or None when it is not a config dict."
    if isinstance(node, ast.Name): return env.get(node.id, '' if node.id in ROOT_NAMES else None)
    if isinstance(node, ast.BoolOp) and isinstance(node.op, ast.Or): return _dict_path(node.values[0], env)
    if isinstance(node, ast.Dict):  # {**defaults, **section}: the section's keys
        return next((p for k, v in zip(node.keys, node.values) if k is None
                     and (p := _dict_path(v, env)) is not None), None)
    if isinstance(node, ast.Subscript) and _str(node.slice) is not None:
        base = _dict_path(node.value, env)
        return None if base is None else _join(base, _str(node.slice))
    if isinstance(node, ast.Call):
        f = node.func
        name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
        if name in ROOT_CALLS: return ''
        if name == 'config_defaults' and node.args: return _str(node.args[0])
        if name in SECTION_CALLS: return SECTION_CALLS[name]
        if name in SAME_DICT_CALLS and node.args: return _dict_path(node.args[0], env)
        if isinstance(f, ast.Attribute) and f.attr in ('get', 'pop') and node.args and _str(node.args[0]) is not None:
            base = _dict_path(f.value, env)
            return None if base is None else _join(base, _str(node.args[0]))
        if isinstance(f, ast.Attribute) and f.attr == 'copy': return _dict_path(f.value, env)
    return None


def _bind(env, target, value, outer):
    if isinstance(target, ast.Name):  # a name bound to anything else is not a config here (None), even if named cfg
        p = _dict_path(value, {**outer, **env})
        if env.get(target.id) is None: env[target.id] = p
    elif isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple) and len(target.elts) == len(value.elts):
        for t, v in zip(target.elts, value.elts): _bind(env, t, v, outer)


def _scope_env(scope, body_nodes, outer):
    """Variables of one scope bound to a config path (assignments, followed until nothing changes); in a function
    that returns a section (`SECTION_CALLS`) the returned variable is that section, so what it adds counts as written."""
    env = {}
    name = getattr(scope, 'name', None)
    if name in SECTION_CALLS:
        env.update({n.value.id: SECTION_CALLS[name] for n in body_nodes if isinstance(n, ast.Return) and isinstance(n.value, ast.Name)})
    for _ in range(4):
        before = dict(env)
        for node in body_nodes:
            if isinstance(node, ast.Assign):
                for t in node.targets: _bind(env, t, node.value, outer)
        if env == before: break
    return env


def _own_nodes(scope):
    "The nodes of a module or function, without those of the functions defined inside it."
    out, todo = [], list(ast.iter_child_nodes(scope))
    while todo:
        n = todo.pop()
        out.append(n)
        if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)): todo += ast.iter_child_nodes(n)
    return out


def code_reads():
    """(paths read, paths written, literal keys read anywhere) over every module of pipeline_lib;
    paths map to 'file:line' of one place that reads them."""
    reads, writes, literals = {}, set(), set()
    for path in sorted(PKG.rglob('*.py')):
        tree = ast.parse(path.read_text())
        scopes = [(tree, None)] + [(n, tree) for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        module_env = {**SECTION_NAMES.get(path.relative_to(PKG).parts[0], {}), **_scope_env(tree, _own_nodes(tree), {})}
        for scope, parent in scopes:
            nodes = _own_nodes(scope)
            env = module_env if parent is None else {**module_env, **_scope_env(scope, nodes, module_env)}
            for n in nodes:
                keys, base = [], None
                if isinstance(n, ast.Subscript) and _str(n.slice) is not None:
                    keys, base = [_str(n.slice)], n.value
                elif (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.args
                      and n.func.attr in ('get', 'pop', 'setdefault')):
                    keys, base = _keys(n.args[0]), n.func.value
                elif isinstance(n, ast.Compare) and len(n.ops) == 1 and isinstance(n.ops[0], (ast.In, ast.NotIn)):
                    keys, base = _keys(n.left), n.comparators[0]
                literals.update(keys)
                p = _dict_path(base, env) if keys else None
                if p is None: continue
                for key in keys:
                    full = _join(p, key)
                    if isinstance(n, ast.Subscript) and isinstance(n.ctx, ast.Store): writes.add(full)
                    else: reads.setdefault(full, f'{path.relative_to(PKG.parent)}:{n.lineno}')
    return reads, writes, literals


def _yaml_paths(d, prefix=''):
    "Every dotted key of the defaults, sections included, with its default."
    out = {}
    for k, v in d.items():
        key = _join(prefix, str(k))
        out[key] = v
        if isinstance(v, dict) and v and key not in OPEN_SECTIONS: out.update(_yaml_paths(v, key))
    return out


def _open(path, yaml_paths):
    "True when `path` sits below an open section: a default of {} or null, or one of OPEN_SECTIONS."
    parts = path.split('.')
    for i in range(1, len(parts)):
        head = '.'.join(parts[:i])
        if head in OPEN_SECTIONS or (head in yaml_paths and yaml_paths[head] in ({}, None)): return True
    return False


LIGHTGBM = 'LightGBM'  # sections handed to LightGBM as parameters: LightGBM itself says which names it knows


def _handed_over():
    "Sections splatted whole into a callable: {section: the callable its keys must be parameters of, or LIGHTGBM}."
    from pipeline_lib.data.market import make_market
    from pipeline_lib.models.regimes import RegimeModel
    from pipeline_lib.models.vae import VAEEncoder
    return {'phase1.vae': VAEEncoder, 'phase1.regimes': RegimeModel, 'data.market': make_market,
            'phase2.lightgbm': LIGHTGBM, 'phase1.importance.lgbm_params': LIGHTGBM}


def _lightgbm_unknown(params: dict, capfd) -> list[str]:
    "The names in `params` LightGBM warns are unknown parameters (its own check, through one tiny fit)."
    import lightgbm as lgb
    import numpy as np
    rng = np.random.default_rng(0)
    capfd.readouterr()
    lgb.train({**params, 'verbosity': 1, 'num_threads': 1}, lgb.Dataset(rng.random((40, 2)), label=rng.random(40)), 1)
    out = capfd.readouterr().out
    return sorted(k for k in params if f'Unknown parameter: {k}' in out)


@pytest.fixture(scope='module')
def analysis():
    yaml_paths = _yaml_paths(experiment_defaults())
    reads, writes, literals = code_reads()
    return yaml_paths, reads, writes, literals


def test_every_key_the_code_reads_is_in_the_yaml(analysis):
    yaml_paths, reads, writes, _ = analysis
    missing = {p: where for p, where in reads.items()
               if p not in yaml_paths and p not in writes and not _open(p, yaml_paths)}
    assert not missing, ('The code reads config keys that configs/experiment_defaults.yaml does not have '
                         f'(add them there with their default, or fix the read): {missing}')


def test_handed_over_sections_match_their_callables(capfd):
    for section, fn in _handed_over().items():
        keys = config_defaults(section)
        if fn is LIGHTGBM:  # early_stopping_rounds is the caller's (a callback), not a parameter of the booster
            extra = _lightgbm_unknown({k: v for k, v in keys.items() if k != 'early_stopping_rounds'}, capfd)
        else: extra = [k for k in keys if k not in inspect.signature(fn).parameters]
        assert not extra, f'{section} keys {extra} are not parameters of {getattr(fn, "__name__", fn)}; rename one side'


def test_every_yaml_key_is_read(analysis):
    yaml_paths, reads, _, literals = analysis
    handed = _handed_over()
    leaves = [p for p, v in yaml_paths.items() if not (isinstance(v, dict) and v and p not in OPEN_SECTIONS)]
    unread = [p for p in leaves
              if p not in reads and p.rsplit('.', 1)[0] not in handed and p.rsplit('.', 1)[-1] not in literals]
    assert not unread, f'configs/experiment_defaults.yaml has keys no code reads (remove them, or read them): {unread}'


@pytest.mark.parametrize('section, fn_path', [
    ('phase1.vae', 'pipeline_lib.models.vae.VAEEncoder'),
    ('phase1.regimes', 'pipeline_lib.models.regimes.RegimeModel'),
    ('data.market', 'pipeline_lib.data.market.make_market'),
    ('targets', 'pipeline_lib.data.targets.build_targets'),
    ('split', 'pipeline_lib.data.splits.make_split'),
])
def test_signature_defaults_agree_with_the_yaml(section, fn_path):
    import importlib
    mod, name = fn_path.rsplit('.', 1)
    params = inspect.signature(getattr(importlib.import_module(mod), name)).parameters
    d = config_defaults(section)
    diff = {k: (params[k].default, v) for k, v in d.items()
            if k in params and params[k].default != (tuple(v) if isinstance(v, list) else v)}
    assert not diff, f'{fn_path} signature defaults differ from the YAML {section} (signature, YAML): {diff}'


def test_selection_defaults_agree_with_the_yaml():
    from pipeline_lib.models.selection import select_on_train
    p = inspect.signature(select_on_train).parameters
    d = config_defaults('phase1')
    for k in ('n_features', 'min_importance', 'max_corr', 'n_controls'): assert p[k].default == d[k], k
    assert p['leakage_threshold'].default == d['leakage']['threshold']
    for k in ('n_folds', 'num_boost_round', 'early_stopping_rounds', 'shap_sample', 'max_rows'):
        assert p[k].default == d['importance'][k], k


def test_feature_transformer_defaults_are_the_default_runs():
    "`FeatureTransformer()` and the transformer a default run builds (`transformer_params`) take the same values."
    from pipeline_lib.core.config import load_config
    from pipeline_lib.phases.phase1 import transformer_params
    from pipeline_lib.phases.transformer import FeatureTransformer
    run = transformer_params(load_config())
    params = inspect.signature(FeatureTransformer).parameters
    # horizon comes from the target, seed/device from settings.ini; the dicts are passed whole (checked above)
    per_run = {'horizon', 'seed', 'device', 'vae_params', 'regime_params', 'lgbm_params'}
    diff = {k: (params[k].default, v) for k, v in run.items()
            if k in params and k not in per_run and params[k].default != v}
    assert not diff, f'FeatureTransformer signature defaults differ from the default run (signature, run): {diff}'


def test_each_phase_reads_its_models_from_the_registry():
    from pipeline_lib.models.registry import PHASE_MODELS
    from pipeline_lib.models.sequence_nets import MODELS
    from pipeline_lib.phases import phase2, phase3
    assert phase2.MODEL_NAMES is PHASE_MODELS['phase2'] and phase3.MODEL_NAMES is PHASE_MODELS['phase3']
    assert tuple(MODELS) == PHASE_MODELS['phase3']  # every Phase 3 name has a sequence model class, in order


def test_training_defaults_are_phase3s():
    from pipeline_lib.models.sequence import TRAIN_DEFAULTS
    p3 = config_defaults('phase3')
    assert TRAIN_DEFAULTS and all(TRAIN_DEFAULTS[k] == p3[k] for k in TRAIN_DEFAULTS)


def test_tabular_defaults_are_phase2s():
    from pipeline_lib.models.multitask import MultiTaskModel
    from pipeline_lib.models.tabular import EARLY_STOPPING_ROUNDS, LGBM_PARAMS, RIDGE_ALPHAS
    p2 = config_defaults('phase2')
    lgbm = dict(p2['lightgbm'])
    assert EARLY_STOPPING_ROUNDS == lgbm.pop('early_stopping_rounds')
    assert {k: LGBM_PARAMS[k] for k in lgbm} == lgbm and RIDGE_ALPHAS == tuple(p2['ridge']['alphas'])
    params = inspect.signature(MultiTaskModel).parameters
    # heads is required (the phase picks them; [] in the YAML means "the default heads"); time_limit is max_seconds
    mt = {('max_seconds' if k == 'time_limit' else k): v for k, v in p2['multitask'].items() if k != 'heads'}
    diff = {k: (params[k].default, v) for k, v in mt.items()
            if k in params and params[k].default != (tuple(v) if isinstance(v, list) else v)}
    assert not diff, f'MultiTaskModel signature defaults differ from phase2.multitask (signature, YAML): {diff}'
