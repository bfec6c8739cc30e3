"""The feature store: keys, hits without rebuilding, detection and rebuild of damaged stores, atomic writes,
partitioned builds equal to one build, and a build killed mid-way."""
import io
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from synthetic import realistic_bars
from pipeline_lib.features import store as fc
from pipeline_lib import features as F
from pipeline_lib.core.writer import sha256_file


@pytest.fixture
def bars():
    return realistic_bars(2, 400, seed=3)


@pytest.fixture
def counted_build(monkeypatch):
    "Replace build_features by a cheap deterministic fake that counts its calls."
    calls = []
    def fake(bars, config=None, cross_section=None):
        calls.append(len(bars))
        c = bars['close'].to_numpy()
        return pd.DataFrame({f'fake_{i}': (np.log(c) * i).astype('float32') for i in range(1, 6)}, index=bars.index)
    monkeypatch.setattr(F, 'build_features', fake)
    return calls


def _entry_files(cache_dir):
    "Every file under the cache's feature folder, as paths relative to it."
    root = fc.feature_cache_dir(cache_dir)
    return sorted(str(p.relative_to(root)) for p in root.rglob('*') if p.is_file())


def _only_partition(bars, cache_dir):
    "(parquet, sidecar) of the single partition of `bars`' default store."
    store = fc.open_store(fc.cache_key(bars), cache_dir)
    assert len(store.partitions) == 1
    p = store.path / store.partitions[0]['file']
    return p, p.with_suffix('.json')


def test_fingerprint_sees_every_kind_of_change(bars):
    fp = fc.data_fingerprint(bars)
    assert fp == fc.data_fingerprint(bars.copy())
    variants = {
        'value': bars.assign(close=bars['close'].where(bars.index != 77, bars['close'] * (1 + 1e-12))),
        'volume': bars.assign(volume=bars['volume'].where(bars.index != 5, bars['volume'] + 1)),
        'timestamp': bars.assign(timestamp=bars['timestamp'].where(bars.index != 9, bars['timestamp'] + pd.Timedelta('1s'))),
        'symbol': bars.assign(symbol=bars['symbol'].replace({'S01': 'S99'})),
        'dtype': bars.astype({'volume': 'float32'}),
        'column name': bars.rename(columns={'volume': 'vol'}),
        'extra column': bars.assign(user_0=0.0),
        'fewer rows': bars.iloc[:-1],
        'index': bars.set_index(bars.index + 1),
        'column order': bars[['symbol', 'timestamp', 'open', 'high', 'low', 'volume', 'close']],
    }
    fps = {k: fc.data_fingerprint(v) for k, v in variants.items()}
    assert fp not in fps.values(), [k for k, v in fps.items() if v == fp]
    assert len(set(fps.values())) == len(fps)


def test_key_changes_with_data_config_and_library_version(bars, monkeypatch):
    key = fc.cache_key(bars)
    assert key == fc.cache_key(bars.copy()) == fc.cache_key(bars, None)
    assert fc.cache_key(bars, F.normalise_feature_config(None)) == key  # explicit defaults share the entry
    assert fc.cache_key(bars.assign(close=bars['close'] * 1.001)) != key
    assert fc.cache_key(bars, _other_config()) != key
    monkeypatch.setattr(F, 'FEATURE_LIBRARY_VERSION', str(F.FEATURE_LIBRARY_VERSION) + '+test')
    assert fc.cache_key(bars) != key


def _other_config():
    "A valid feature config that differs from the default: the default without its first family."
    norm = F.normalise_feature_config(None)
    fams = list(F.FEATURE_FAMILIES)
    other = F.normalise_feature_config({'families': fams[1:]}) if 'families' in str(norm) else None
    assert other is not None and other != norm, 'could not construct a non-default feature config'
    return other


@pytest.mark.slow
def test_hit_returns_identical_frame_without_rebuilding(bars, tmp_path, monkeypatch):
    real, calls = F.build_features, []
    def counting(b, config=None, cross_section=None):
        calls.append(1)
        return real(b, config, cross_section=cross_section)
    monkeypatch.setattr(F, 'build_features', counting)
    first = fc.cached_features(bars, cache_dir=tmp_path, progress=False)
    assert len(calls) == 1
    pd.testing.assert_frame_equal(first, real(bars))
    second = fc.cached_features(bars, cache_dir=tmp_path, progress=False)
    assert len(calls) == 1, 'a cache hit must not build features again'
    pd.testing.assert_frame_equal(second, first, check_exact=True)
    assert second.index.equals(bars.index)
    key = fc.cache_key(bars)
    part = fc.partition_name(0, len(bars))
    assert _entry_files(tmp_path) == [f'{key}/manifest.json', f'{key}/{part[:-8]}.json', f'{key}/{part}']
    manifest = json.loads((fc.store_dir(key, tmp_path) / 'manifest.json').read_text())
    assert manifest['rows'] == len(bars) and manifest['columns'] == list(map(str, first.columns))
    assert manifest['partitions'][0]['sha256'] == sha256_file(fc.store_dir(key, tmp_path) / part)
    # a different config or different data is a different store, built once
    fc.cached_features(bars.iloc[:len(bars) // 2], cache_dir=tmp_path, progress=False)
    assert len(calls) == 2 and len(_entry_files(tmp_path)) == 6


def _truncate(p, s): p.write_bytes(p.read_bytes()[:-500])
def _flip_byte(p, s):
    raw = bytearray(p.read_bytes()); raw[len(raw) // 2] ^= 0x10; p.write_bytes(bytes(raw))
def _drop_manifest(p, s): (p.parent / 'manifest.json').unlink()
def _garble_manifest(p, s): (p.parent / 'manifest.json').write_text('{"key": ')
def _drop_parquet(p, s): p.unlink()
def _rehash(p, s, **changes):
    "Record the damaged file's size and hash as if it were good, in its sidecar and in the manifest."
    new = dict(bytes=p.stat().st_size, sha256=sha256_file(p), **changes)
    for f in (s, p.parent / 'manifest.json'):
        info = json.loads(f.read_text())
        target = info if f == s else info['partitions'][0]
        target.update({k: v for k, v in new.items() if k != 'columns'})
        if 'columns' in new: info['columns'] = new['columns']
        f.write_text(json.dumps(info))
def _wrong_rows(p, s):  # a consistent (hash-valid) partition for a frame of another length
    t = pq.read_table(p); pq.write_table(t.slice(0, t.num_rows - 3), p); _rehash(p, s, rows=t.num_rows - 3)
def _wrong_columns(p, s):  # the parquet's columns differ from the manifest's though its hash was updated
    t = pq.read_table(p); pq.write_table(t.rename_columns(['x_' + c for c in t.column_names]), p); _rehash(p, s)


@pytest.mark.parametrize('damage', [_truncate, _flip_byte, _drop_manifest, _garble_manifest, _drop_parquet,
                                    _wrong_rows, _wrong_columns])
def test_damaged_store_is_detected_logged_and_rebuilt(bars, tmp_path, counted_build, caplog, damage):
    good = fc.cached_features(bars, cache_dir=tmp_path, progress=False)
    p, s = _only_partition(bars, tmp_path)
    damage(p, s)
    with pytest.raises(fc.FeatureCacheError):
        fc.open_store(fc.cache_key(bars), tmp_path, rows=len(bars))
    with caplog.at_level(logging.WARNING, logger=fc.log.name):
        again = fc.cached_features(bars, cache_dir=tmp_path, progress=False)
    # a store without its manifest keeps its verified partition (an interrupted build's work is not redone)
    builds = 1 if damage in (_drop_manifest, _garble_manifest) else 2
    assert len(counted_build) == builds, 'a damaged partition must be rebuilt, a verified one kept'
    assert any('rebuilding' in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    pd.testing.assert_frame_equal(again, good)
    frame = fc.open_store(fc.cache_key(bars), tmp_path, rows=len(bars)).read()  # the rebuilt store verifies
    pd.testing.assert_frame_equal(frame.set_axis(bars.index), good)
    fc.cached_features(bars, cache_dir=tmp_path, progress=False)
    assert len(counted_build) == builds, 'the repaired store is a hit'


def test_crash_while_writing_leaves_no_store_and_no_temp_file(bars, tmp_path, counted_build, monkeypatch, caplog):
    real_write = pq.write_table
    def dying(table, where, **kw):
        buf = io.BytesIO(); real_write(table, buf, **kw)
        with open(where, 'wb') as f: f.write(buf.getvalue()[:len(buf.getvalue()) // 2])
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(fc.pq, 'write_table', dying)
    with caplog.at_level(logging.WARNING, logger=fc.log.name):
        out = fc.cached_features(bars, cache_dir=tmp_path, progress=False)
    assert len(out) == len(bars) and any('could not store' in r.getMessage() for r in caplog.records)
    assert _entry_files(tmp_path) == [], 'neither a partial parquet nor a temp file may remain'
    monkeypatch.setattr(fc.pq, 'write_table', real_write)
    fc.cached_features(bars, cache_dir=tmp_path, progress=False)
    fc.open_store(fc.cache_key(bars), tmp_path, rows=len(bars))


def test_unwritable_cache_still_returns_features(bars, tmp_path, counted_build, caplog):
    blocker = tmp_path / 'file'
    blocker.write_text('not a folder')
    with caplog.at_level(logging.WARNING, logger=fc.log.name):
        out = fc.cached_features(bars, cache_dir=blocker, progress=False)
    assert len(out) == len(bars) and len(counted_build) == 1
    assert any('could not store' in r.getMessage() for r in caplog.records)


def test_a_store_that_would_not_fit_on_disk_is_refused_before_anything_is_written(bars, tmp_path, counted_build, monkeypatch):
    """The estimate (rows x columns x STORE_BYTES_PER_VALUE) is checked against the free space first: a clear
    DiskSpaceError naming the folder, no partition, no empty folder, and no fall-back to building in memory (which
    is what an OSError from a full disk would get)."""
    import shutil
    from pipeline_lib.core import atomic
    from pipeline_lib.core.errors import DiskSpaceError
    need = len(bars) * len(F.feature_names()) * fc.STORE_BYTES_PER_VALUE
    real = shutil.disk_usage
    monkeypatch.setattr(atomic.shutil, 'disk_usage', lambda p: real(p)._replace(free=int(need + 2**30 - 1)))
    with pytest.raises(DiskSpaceError, match=r'feature store of 800 rows needs about .* GiB under .*features'):
        fc.cached_store(bars, cache_dir=tmp_path, progress=False)
    assert counted_build == [] and _entry_files(tmp_path) == []
    assert not fc.store_dir(fc.cache_key(bars), tmp_path).exists()
    monkeypatch.setattr(atomic.shutil, 'disk_usage', lambda p: real(p)._replace(free=int(need + 2**30 + 1)))
    assert fc.cached_store(bars, cache_dir=tmp_path, progress=False).n_rows == len(bars)


def test_concurrent_writers_never_expose_a_partial_file(tmp_path, monkeypatch):
    "Writers trickle their parquet out slowly; a reader polling the final name only ever sees complete files."
    bars = realistic_bars(3, 3000, seed=5)
    def fake(b, config=None, cross_section=None):
        c = np.log(b['close'].to_numpy())
        return pd.DataFrame({f'fake_{i}': (c * i).astype('float32') for i in range(1, 40)}, index=b.index)
    monkeypatch.setattr(F, 'build_features', fake)
    real_write = pq.write_table
    def slow(table, where, **kw):
        buf = io.BytesIO(); real_write(table, buf, **kw)
        data = buf.getvalue()
        with open(where, 'wb') as f:
            for i in range(0, len(data), len(data) // 8 + 1):
                f.write(data[i:i + len(data) // 8 + 1]); f.flush(); time.sleep(0.01)
    monkeypatch.setattr(fc.pq, 'write_table', slow)
    p = fc.store_dir(fc.cache_key(bars), tmp_path) / fc.partition_name(0, len(bars))
    seen = {'complete': 0, 'partial_temp': 0, 'bad': []}
    done = threading.Event()
    def poll():
        while not done.is_set():
            if p.exists():
                try:
                    n = pq.read_table(p).num_rows
                    if n == len(bars): seen['complete'] += 1
                    else: seen['bad'].append(f'{n} rows')
                except Exception as e:  # noqa: BLE001 - any unreadable file under the final name is the failure
                    seen['bad'].append(repr(e))
            if p.parent.exists():
                for t in p.parent.glob(f".{p.name}.tmp-*"):
                    try:
                        if 0 < t.stat().st_size: seen['partial_temp'] += 1
                    except FileNotFoundError: pass
            time.sleep(0.002)
    results, errors = [], []
    def work():
        try: results.append(fc.cached_features(bars, cache_dir=tmp_path, progress=False))
        except Exception as e: errors.append(e)  # noqa: BLE001
    poller = threading.Thread(target=poll); poller.start()
    workers = [threading.Thread(target=work) for _ in range(4)]
    for w in workers: w.start()
    for w in workers: w.join()
    time.sleep(0.05); done.set(); poller.join()
    assert not errors and len(results) == 4
    for r in results[1:]: pd.testing.assert_frame_equal(r, results[0])
    assert seen['bad'] == [], f'a partial or foreign file was visible under the final name: {seen["bad"][:3]}'
    assert seen['partial_temp'] > 0, 'the poller never saw a write in progress, so this test proved nothing'
    assert seen['complete'] > 0
    assert [n for n in _entry_files(tmp_path) if '.tmp-' in n] == []
    fc.open_store(fc.cache_key(bars), tmp_path, rows=len(bars))


# --- partitioned builds -------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def five_symbols():
    "Five symbols of different lengths (staggered starts, missing bars) and their features from one in-memory build."
    b = realistic_bars(5, 900, seed=11)
    return b, F.build_features(b)


def _symbol_lengths(b):
    return b.groupby('symbol', sort=False).size().to_numpy()


@pytest.mark.slow
@pytest.mark.parametrize('partition_rows', [1000, 2200])
def test_partitioned_store_equals_the_in_memory_features(five_symbols, tmp_path, partition_rows):
    b, whole = five_symbols
    store = fc.build_store(b, cache_dir=tmp_path, partition_rows=partition_rows, progress=False)
    assert len(store.partitions) > 1 and all(p['rows'] <= max(partition_rows, _symbol_lengths(b).max()) for p in store.partitions)
    pd.testing.assert_frame_equal(store.read().set_axis(b.index), whole, check_exact=True)
    rows = np.sort(np.random.default_rng(0).choice(len(b), 300, replace=False))
    cols = list(whole.columns[::37])
    pd.testing.assert_frame_equal(store.read(cols, rows), whole.iloc[rows][cols].reset_index(drop=True), check_exact=True)
    chunks = [(lo, hi, f) for lo, hi, f in store.iter_partitions(cols)]
    assert [c[0] for c in chunks][0] == 0 and chunks[-1][1] == len(b)
    pd.testing.assert_frame_equal(pd.concat([f for *_, f in chunks], ignore_index=True), whole[cols].reset_index(drop=True))


@pytest.mark.slow
def test_more_partitions_than_symbols_give_the_same_features(five_symbols, tmp_path):
    "Symbols cut into pieces (each built from its symbol's first row) give the values of one build, on a process pool too."
    from pipeline_lib.core.executor import local_executor
    b, whole = five_symbols
    with local_executor(2) as pool:
        store = fc.build_store(b, cache_dir=tmp_path, partition_rows=300, executor=pool, progress=False)
    assert len(store.partitions) > 2 * b['symbol'].nunique()
    assert any(p['lo'] not in set(np.r_[0, np.cumsum(_symbol_lengths(b))]) for p in store.partitions), 'no symbol was cut'
    pd.testing.assert_frame_equal(store.read().set_axis(b.index), whole, check_exact=True)
    assert fc.open_store(fc.cache_key(b), tmp_path).n_rows == len(b)


_KILLED_BUILD = """
import os, signal, sys
import pyarrow.parquet as pq
sys.path.insert(0, {tests!r})
from synthetic import realistic_bars
from pipeline_lib.features import store as fc
real, written = pq.write_table, []
def dying(table, where, **kw):
    if len(written) == 2:   # the third partition: half its bytes reach the disk, then the process is killed
        import io
        buf = io.BytesIO(); real(table, buf, **kw)
        with open(where, 'wb') as f: f.write(buf.getvalue()[:len(buf.getvalue()) // 2]); f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    written.append(where); real(table, where, **kw)
fc.pq.write_table = dying
fc.build_store(realistic_bars(5, 900, seed=11), cache_dir={cache!r}, partition_rows=1000, progress=False)
"""


@pytest.mark.slow
def test_a_build_killed_mid_way_leaves_nothing_a_later_run_would_use(five_symbols, tmp_path, monkeypatch):
    b, whole = five_symbols
    script = _KILLED_BUILD.format(tests=str(Path(__file__).parent), cache=str(tmp_path))
    proc = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    key = fc.cache_key(b)
    with pytest.raises(fc.FeatureCacheError, match='no manifest'):
        fc.open_store(key, tmp_path)
    left = sorted(p.name for p in fc.store_dir(key, tmp_path).iterdir())
    parts = [n for n in left if n.startswith('part-') and n.endswith('.parquet')]
    assert len(parts) == 2, left   # the killed partition is only a temp file, never under its final name
    for n in parts: fc.verify_partition(fc.store_dir(key, tmp_path) / n)
    # the next build keeps the two verified partitions, builds the rest, and equals one in-memory build
    real, built = F.build_features, []
    def counting(bb, config=None, cross_section=None):
        built.append(len(bb)); return real(bb, config, cross_section=cross_section)
    monkeypatch.setattr(F, 'build_features', counting)
    store = fc.build_store(b, cache_dir=tmp_path, partition_rows=1000, progress=False)
    assert len(built) == len(store.partitions) - 2, 'only the missing partitions are built'
    pd.testing.assert_frame_equal(store.read().set_axis(b.index), whole, check_exact=True)
    assert [n for n in os.listdir(store.path) if '.tmp-' in n] == [], "the killed process's temp file is swept"


_UNGUARDED_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from synthetic import realistic_bars
from pipeline_lib.core.executor import local_executor
from pipeline_lib.features import store as fc
with local_executor(2) as pool:   # no `if __name__ == '__main__':`: each spawned process runs this file again
    s = fc.build_store(realistic_bars(5, 900, seed=11), cache_dir={cache!r}, partition_rows=1000, executor=pool,
                       progress=False)
print('ROWS', s.n_rows)
"""


@pytest.mark.slow
def test_a_script_without_a_main_guard_still_gets_its_store(five_symbols, tmp_path):
    "Spawned processes re-run an unguarded script and the pool breaks; the build warns and finishes in the process."
    b, whole = five_symbols
    script = tmp_path / 'unguarded.py'
    script.write_text(_UNGUARDED_SCRIPT.format(tests=str(Path(__file__).parent), cache=str(tmp_path / 'cache')))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f'ROWS {len(b)}' in proc.stdout and "__name__ == '__main__'" in proc.stderr
    store = fc.open_store(fc.cache_key(b), tmp_path / 'cache')
    pd.testing.assert_frame_equal(store.read().set_axis(b.index), whole, check_exact=True)
