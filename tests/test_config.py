import os
from pathlib import Path

import pytest

from pipeline_lib.core.config import PipelineError, config_hash, deep_merge, load_config, load_settings, repo_root


def test_repo_root_is_found_from_any_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv('PIPELINE_ROOT', raising=False)
    root = repo_root()
    assert (root/'settings.ini').is_file() and (root/'nbs').is_dir()


def test_settings_paths_are_absolute_from_root():
    s = load_settings()
    assert s['metadata_dir'] == s['root']/'metadata'
    assert all(Path(s[k]).is_absolute() for k in ('output_dir', 'reports_dir', 'cache_dir'))


def test_override_file_merges_over_defaults(tmp_path):
    f = tmp_path/'few.yaml'
    f.write_text('phase1:\n  n_features: 20\n')
    cfg = load_config(f)
    assert cfg['phase1']['n_features'] == 20
    assert cfg['primary_target'] == load_config()['primary_target']
    assert config_hash(cfg) != config_hash(load_config())


def test_bad_config_files_raise_clear_errors(tmp_path):
    with pytest.raises(PipelineError, match='does not exist'): load_config(tmp_path/'nope.yaml')
    (tmp_path/'list.yaml').write_text('- 1\n- 2\n')
    with pytest.raises(PipelineError, match='mapping'): load_config(tmp_path/'list.yaml')
    (tmp_path/'bad.yaml').write_text('a: [1, 2\n')
    with pytest.raises(PipelineError, match='not valid YAML'): load_config(tmp_path/'bad.yaml')


def test_deep_merge_does_not_mutate_inputs():
    base = {'a': {'b': [1]}}
    out = deep_merge(base, {'a': {'c': 2}})
    out['a']['b'].append(9)
    assert base == {'a': {'b': [1]}}
