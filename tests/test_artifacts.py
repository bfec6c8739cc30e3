import json
import os
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import joblib
import numpy as np
import pytest
import torch

import pipeline_lib
from pipeline_lib.core.artifacts import (
    KEY_ENV, MANIFEST, SIGNATURE, ArtifactError, ArtifactWarning, ArtifactWriter, atomic_write_json, json_dumps_safe,
    library_versions, load_bytes, load_joblib, load_json, load_torch_state, merge_json_atomic, sha256_file, verify_manifest)
from pipeline_lib.core.config import PipelineError


def _dead_pid():
    "The pid of a process that has exited."
    p = subprocess.Popen([sys.executable, '-c', 'pass']); p.wait()
    return p.pid


class _Boom:
    "Unpickling this creates a marker file: proof that a pickle was (or was not) loaded."
    def __init__(self, marker): self.marker = str(marker)
    def __reduce__(self): return (os.makedirs, (self.marker,))


def _write(d, meta=None, kind='phase1'):
    with ArtifactWriter(d, kind, meta or {'feature_list_hash': 'abc', 'config': {'phase1': {'n_features': 50}}}) as w:
        w.save_json('top_2_features.json', ['a', 'b'])
        w.save_joblib('model.joblib', {'coef': np.arange(3.0)})
    return d


def test_round_trip_every_helper(tmp_path):
    d = tmp_path/'metadata'
    d.mkdir(); (d/'.gitkeep').write_text('')
    src = tmp_path/'src.txt'; src.write_text('hello')
    meta = {'config': {'phase1': {'n_features': 50}}, 'feature_list_hash': 'f1', 'data_fingerprint': 'd1', 'x': float('nan')}
    with ArtifactWriter(d, 'phase1', meta) as w:
        w.save_json('top.json', {'ic': float('nan'), 'names': ['a']})
        w.save_joblib('sub/model.joblib', {'w': np.arange(4.0)})
        w.save_torch_state('net.pt', torch.nn.Linear(3, 2).state_dict())
        w.save_bytes('raw.bin', b'\x00\x01')
        w.copy_file('copy.txt', src)
        w.path('by_path.txt').write_text('via path')
    m = verify_manifest(d, {'feature_list_hash': 'f1', 'config.phase1.n_features': 50}, kind='phase1')
    assert set(m['files']) == {'top.json', 'sub/model.joblib', 'net.pt', 'raw.bin', 'copy.txt', 'by_path.txt'}
    assert m['files']['raw.bin'] == {'sha256': sha256_file(d/'raw.bin'), 'size': 2}
    assert set(m['versions']) == {'python', 'numpy', 'pandas', 'sklearn', 'lightgbm', 'torch', 'pipeline_lib'}
    assert m['meta']['x'] is None and m['created']
    assert (d/'.gitkeep').exists()  # preserved, not listed
    assert load_json(d, 'top.json', m) == {'ic': None, 'names': ['a']}
    assert np.array_equal(load_joblib(d, 'sub/model.joblib', m)['w'], np.arange(4.0))
    assert set(load_torch_state(d, 'net.pt', m)) == {'weight', 'bias'}
    assert load_bytes(d, 'raw.bin', m) == b'\x00\x01' and load_bytes(d, 'copy.txt', m) == b'hello'
    assert not [p for p in tmp_path.iterdir() if '.staging-' in p.name or '.trash-' in p.name]


def test_tampered_pickle_is_never_unpickled(tmp_path):
    d = _write(tmp_path/'metadata')
    marker = tmp_path/'pwned'
    evil = tmp_path/'evil.joblib'; joblib.dump(_Boom(marker), evil)
    m = verify_manifest(d, kind='phase1')               # verified while intact ...
    (d/'model.joblib').write_bytes(evil.read_bytes())   # ... then replaced (same name, other bytes)
    with pytest.raises(ArtifactError, match=r'model\.joblib has .*manifest says .*re-run Phase 1'):
        verify_manifest(d, kind='phase1')
    with pytest.raises(ArtifactError, match=r'model\.joblib has SHA-256'):
        load_joblib(d, 'model.joblib', m)               # stale verified manifest: the loader hashes the bytes itself
    with pytest.raises(ArtifactError):
        load_joblib(d, 'model.joblib')
    assert not marker.exists()
    joblib.load(evil)  # the control: loading it directly does have the side effect
    assert marker.exists()


def test_one_flipped_byte_is_refused_with_what_to_do(tmp_path):
    d = _write(tmp_path/'metadata')
    b = bytearray((d/'top_2_features.json').read_bytes()); b[2] ^= 0x01
    (d/'top_2_features.json').write_bytes(bytes(b))
    with pytest.raises(ArtifactError) as e: verify_manifest(d)
    msg = str(e.value)
    assert 'top_2_features.json has SHA-256' in msg and 'modified after it was written' in msg
    assert 'python run_notebooks.py --phases 1' in msg
    assert isinstance(e.value, PipelineError)


def test_missing_file_manifest_and_folder_are_refused(tmp_path):
    d = _write(tmp_path/'metadata')
    (d/'model.joblib').unlink()
    with pytest.raises(ArtifactError, match=r'model\.joblib is listed in the manifest but missing'): verify_manifest(d)
    (d/MANIFEST).unlink()
    with pytest.raises(ArtifactError, match='manifest.json is missing'): verify_manifest(d)
    with pytest.raises(ArtifactError, match='does not exist'): verify_manifest(tmp_path/'nope', wait_s=0)
    d2 = _write(tmp_path/'m2')
    with pytest.raises(ArtifactError, match='not listed in the manifest'): load_json(d2, 'other.json', verify_manifest(d2))


def test_wrong_kind_and_expect_mismatches(tmp_path, monkeypatch):
    d = _write(tmp_path/'metadata')
    with pytest.raises(ArtifactError, match="holds a 'phase1' artifact, not the 'phase2'"): verify_manifest(d, kind='phase2')
    with pytest.raises(ArtifactError, match='different feature_list_hash'): verify_manifest(d, {'feature_list_hash': 'zzz'})
    with pytest.raises(ArtifactError, match='config.phase1.n_features'): verify_manifest(d, {'config.phase1.n_features': 20})
    with pytest.raises(ArtifactError, match='has no such entry'): verify_manifest(d, {'data_fingerprint': 'x'})
    with pytest.warns(ArtifactWarning, match='feature_list_hash'):
        m = verify_manifest(d, {'feature_list_hash': 'zzz', 'config.phase1.n_features': 50},
                            on_mismatch={'feature_list_hash': 'warn'})
    assert m['kind'] == 'phase1'
    with pytest.warns(ArtifactWarning), pytest.raises(ArtifactError):  # per-key: the other key is still an error
        verify_manifest(d, {'feature_list_hash': 'zzz', 'config.phase1.n_features': 20}, on_mismatch={'feature_list_hash': 'warn'})
    monkeypatch.setattr(pipeline_lib, '__version__', '99.0')
    with pytest.warns(ArtifactWarning, match='pipeline_lib'): verify_manifest(d)
    with pytest.raises(ArtifactError, match='pipeline_lib'): verify_manifest(d, on_version='error')
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        verify_manifest(d, on_version='ignore')


def test_exception_inside_writer_keeps_previous_version(tmp_path):
    d = _write(tmp_path/'metadata')
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    with pytest.raises(RuntimeError, match='diverged'):
        with ArtifactWriter(d, 'phase1', {'feature_list_hash': 'new'}) as w:
            w.save_json('top_2_features.json', ['x', 'y'])
            w.save_joblib('model.joblib', {'coef': None})
            raise RuntimeError('fit diverged')
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ['metadata']  # staging removed
    verify_manifest(d, {'feature_list_hash': 'abc'})


def test_second_write_replaces_whole_folder(tmp_path):
    d = _write(tmp_path/'metadata')
    with ArtifactWriter(d, 'phase1', {'feature_list_hash': 'v2'}) as w: w.save_json('only.json', 1)
    m = verify_manifest(d, {'feature_list_hash': 'v2'})
    assert sorted(p.name for p in d.iterdir()) == [MANIFEST, 'only.json'] and list(m['files']) == ['only.json']


def test_stale_staging_and_trash_are_cleaned(tmp_path):
    d = _write(tmp_path/'art')
    dead = _dead_pid()
    for what in ('staging', 'trash'):
        s = tmp_path/f'.art.{what}-{dead}-abcd1234'; s.mkdir(); (s/'half.joblib').write_bytes(b'x')
    live = tmp_path/f'.art.staging-{os.getppid()}-abcd1234'; live.mkdir()  # a running writer's: kept
    other = tmp_path/f'.other.staging-{dead}-abcd1234'; other.mkdir()    # another artifact's: not ours to judge
    _write(d)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(['art', live.name, other.name])


def test_reader_recovers_from_writer_killed_mid_swap(tmp_path):
    d = _write(tmp_path/'art')
    trash = tmp_path/f'.art.trash-{_dead_pid()}-00ff00ff'
    os.rename(d, trash)  # the state after the first rename of a swap whose writer died
    with pytest.warns(ArtifactWarning, match='restored the previous version'):
        m = verify_manifest(d, kind='phase1', wait_s=0.05)
    assert d.is_dir() and not trash.exists() and 'model.joblib' in m['files']


def test_reader_waits_for_a_swap_in_progress(tmp_path):
    d = _write(tmp_path/'art')
    os.rename(d, tmp_path/f'.art.trash-{os.getpid()}-00ff00ff')  # a live writer between its renames
    with pytest.raises(ArtifactError, match='in progress or was interrupted'): verify_manifest(d, wait_s=0.05)


def test_bad_names_refused(tmp_path):
    with pytest.raises(ArtifactError):
        with ArtifactWriter(tmp_path/'a', 'k') as w: w.save_json('../escape.json', 1)
    with pytest.raises(ArtifactError):
        with ArtifactWriter(tmp_path/'a', 'k') as w: w.save_json(MANIFEST, 1)
    assert not (tmp_path/'escape.json').exists() and not (tmp_path/'a').exists()


def test_json_helpers_write_null_not_nan(tmp_path):
    s = json_dumps_safe({'a': float('nan'), 'b': [np.float64('inf'), np.int32(2)], 'c': np.bool_(True)})
    assert json.loads(s) == {'a': None, 'b': [None, 2], 'c': True}
    p = atomic_write_json(tmp_path/'m.json', {'ic': float('-inf')})
    assert 'Infinity' not in p.read_text() and json.loads(p.read_text()) == {'ic': None}
    assert [x.name for x in tmp_path.iterdir()] == ['m.json']
    assert library_versions()['pipeline_lib'] == pipeline_lib.__version__


_MERGER = textwrap.dedent('''
    import sys, time
    from pipeline_lib.core.artifacts import merge_json_atomic
    path, tag, start = sys.argv[1], sys.argv[2], float(sys.argv[3])
    while time.time() < start: time.sleep(0.001)
    for i in range(40): merge_json_atomic(path, f'{tag}{i}', {'i': i, 'x': float('nan')})
''')


@pytest.mark.slow
def test_concurrent_merges_lose_no_key(tmp_path):
    path = tmp_path/'reports'/'metrics.json'
    merge_json_atomic(path, 'run', {'name': 'r'})
    start = time.time() + 1.5  # both start together, after their imports
    procs = [subprocess.Popen([sys.executable, '-c', _MERGER, str(path), tag, str(start)]) for tag in ('p2_', 'p3_')]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    data = json.loads(path.read_text())
    assert set(data) == {'run'} | {f'{t}{i}' for t in ('p2_', 'p3_') for i in range(40)}
    assert data['p3_39'] == {'i': 39, 'x': None}
    assert [p.name for p in path.parent.iterdir()] == ['metrics.json']


def test_other_library_versions_warn_or_refuse_before_unpickling(tmp_path, monkeypatch):
    d = _write(tmp_path/'metadata')
    manifest = json.loads((d/MANIFEST).read_text())
    manifest['versions']['sklearn'] = '0.1.0'
    (d/MANIFEST).write_text(json.dumps(manifest))
    monkeypatch.setattr(joblib, 'load', lambda *a, **k: pytest.fail('unpickled before the version check'))
    with pytest.warns(ArtifactWarning, match='sklearn 0.1.0'): verify_manifest(d)
    with pytest.raises(ArtifactError, match='sklearn 0.1.0, this is'): verify_manifest(d, on_version='error')
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        verify_manifest(d, on_version={'sklearn': 'ignore', 'pipeline_lib': 'error', '*': 'error'})


def test_keyed_signature_refuses_a_manifest_forged_with_recomputed_hashes(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    unsigned = _write(tmp_path/'unsigned')
    assert not (unsigned/SIGNATURE).exists()
    monkeypatch.setenv(KEY_ENV, 'test key')
    d = _write(tmp_path/'metadata')
    assert (d/SIGNATURE).is_file() and SIGNATURE not in json.loads((d/MANIFEST).read_text())['files']
    m = verify_manifest(d, {'feature_list_hash': 'abc'}, kind='phase1')              # signed artifacts verify
    assert np.array_equal(load_joblib(d, 'model.joblib', m)['coef'], np.arange(3.0))
    # a forger swaps in a malicious pickle and recomputes its hash and size in the manifest
    marker = tmp_path/'unpickled'
    joblib.dump(_Boom(marker), d/'model.joblib')
    forged = json.loads((d/MANIFEST).read_text())
    forged['files']['model.joblib'] = {'sha256': sha256_file(d/'model.joblib'), 'size': (d/'model.joblib').stat().st_size}
    atomic_write_json(d/MANIFEST, forged)
    with pytest.raises(ArtifactError, match='does not match its signature'):
        load_joblib(d, 'model.joblib')
    assert not marker.exists()
    with pytest.raises(ArtifactError, match=f'{SIGNATURE} is missing.*written without the key'):
        verify_manifest(unsigned)
    monkeypatch.setenv(KEY_ENV, 'another key')
    fresh = _write(tmp_path/'fresh')
    monkeypatch.setenv(KEY_ENV, 'test key')
    with pytest.raises(ArtifactError, match='signed with another key'):
        verify_manifest(fresh)
    with pytest.raises(ArtifactError, match='written by ArtifactWriter itself'):
        with ArtifactWriter(tmp_path/'x', 'phase1') as w: w.save_text(SIGNATURE, 'f' * 64)
    monkeypatch.delenv(KEY_ENV)                                # no key: hashes only, as before, so the forgery passes
    assert verify_manifest(d)['files']['model.joblib'] == forged['files']['model.joblib']
    assert verify_manifest(unsigned)
