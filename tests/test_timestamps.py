"""Timestamps are read with one format per file, decided from all its values, and put on one clock.

Each case writes a file of timestamp strings (a few symbols, valid bars) and compares what `load_bars` made of them
with an explicit `pd.to_datetime(..., format=...)` parse of the same strings."""
import numpy as np
import pandas as pd
import pytest

from pipeline_lib.data.load import DataError, describe_load, load_bars, load_options, load_summary
from synthetic import walk_bars

SYMBOLS = ('AAA', 'BBB', 'CCC')


def write_bars(path, stamps, symbols=SYMBOLS, **extra):
    "A CSV whose timestamp column holds `stamps` (the same list for every symbol), with valid OHLCV; returns `path`."
    walk_bars(symbols, timestamps=stamps).assign(**extra).to_csv(path, index=False)
    return path


def loaded_times(bars, symbol='AAA') -> np.ndarray:
    return bars.loc[bars['symbol'] == symbol, 'timestamp'].to_numpy('datetime64[ns]')


def expected(stamps, **to_datetime) -> np.ndarray:
    "The explicit parse, sorted as load_bars sorts each symbol's rows."
    t = pd.to_datetime(pd.Series(stamps), **to_datetime)
    if t.dt.tz is not None: t = t.dt.tz_localize(None)
    return np.sort(t.to_numpy('datetime64[ns]'))


DAILY = pd.date_range('2017-01-02 09:30', periods=40, freq='D')           # crosses the 12th: decidable
ONE_MORNING = pd.date_range('2017-01-02 09:30', periods=40, freq='min')   # 02/01/2017 only: undecidable


@pytest.mark.parametrize('name, fmt, stamps', [
    ('day-first dotted', '%d.%m.%Y %H:%M:%S.%f', [t.strftime('%d.%m.%Y %H:%M:%S.000') for t in DAILY]),
    ('day-first slashed', '%d/%m/%Y %H:%M', [t.strftime('%d/%m/%Y %H:%M') for t in DAILY]),
    ('month-first slashed', '%m/%d/%Y %H:%M', [t.strftime('%m/%d/%Y %H:%M') for t in DAILY]),
    ('ISO with T', '%Y-%m-%dT%H:%M:%S', [t.strftime('%Y-%m-%dT%H:%M:%S') for t in DAILY]),
    ('ISO without T', '%Y-%m-%d %H:%M', [t.strftime('%Y-%m-%d %H:%M') for t in DAILY]),
    ('ISO with fractional seconds', '%Y-%m-%d %H:%M:%S.%f', [t.strftime('%Y-%m-%d %H:%M:%S.250') for t in DAILY]),
])
def test_one_format_per_file_matches_the_explicit_parse(tmp_path, name, fmt, stamps):
    bars = load_bars(write_bars(tmp_path/'bars.csv', stamps), min_rows=10)
    want = expected(stamps, format=fmt)
    for sym in SYMBOLS: np.testing.assert_array_equal(loaded_times(bars, sym), want)
    how = bars.attrs['timestamps']
    assert len(how) == 1 and how[0]['zone'] == 'local time of the file'
    if name.startswith(('day', 'month')): assert how[0]['reading'] == name.split()[0] and how[0]['format'] == fmt


def test_day_first_file_is_not_read_month_first_row_by_row(tmp_path):
    "The bug: 02.01.2017 read as 1 February while 13.01.2017 is read as 13 January, so bars land at wrong dates."
    stamps = [t.strftime('%d.%m.%Y %H:%M:%S.000') for t in DAILY]
    bars = load_bars(write_bars(tmp_path/'bars.csv', stamps), min_rows=10)
    got = loaded_times(bars)
    assert got[0] == np.datetime64('2017-01-02T09:30') and (np.diff(got) == np.timedelta64(1, 'D')).all()


def test_each_file_decides_its_own_reading(tmp_path):
    (tmp_path/'d').mkdir()
    write_bars(tmp_path/'d'/'eu.csv', [t.strftime('%d/%m/%Y %H:%M') for t in DAILY], symbols=('EU1', 'EU2'))
    write_bars(tmp_path/'d'/'us.csv', [t.strftime('%m/%d/%Y %H:%M') for t in DAILY], symbols=('US1', 'US2'))
    bars = load_bars(tmp_path/'d', min_rows=10)
    for sym in ('EU1', 'EU2', 'US1', 'US2'): np.testing.assert_array_equal(loaded_times(bars, sym), DAILY.to_numpy('datetime64[ns]'))
    assert sorted(r['reading'] for r in bars.attrs['timestamps']) == ['day-first', 'month-first']


def test_undecidable_file_is_refused_then_loads_when_told(tmp_path):
    stamps = [t.strftime('%d/%m/%Y %H:%M') for t in ONE_MORNING]
    path = write_bars(tmp_path/'ambiguous.csv', stamps)
    with pytest.raises(DataError) as e:
        load_bars(path, min_rows=10)
    msg = str(e.value)
    assert e.value.file == str(path) and 'ambiguous.csv' in msg
    assert '2017-01-02 (day-first' in msg and '2017-02-01 (month-first' in msg   # the two readings of '02/01/2017 09:30'
    assert 'data.dayfirst' in msg and 'data.date_format' in msg
    for kw, fmt in ((dict(dayfirst=True), '%d/%m/%Y %H:%M'), (dict(dayfirst=False), '%m/%d/%Y %H:%M'),
                    (dict(date_format='%d/%m/%Y %H:%M'), '%d/%m/%Y %H:%M')):
        np.testing.assert_array_equal(loaded_times(load_bars(path, min_rows=10, **kw)), expected(stamps, format=fmt))


def test_a_file_mixing_formats_is_refused_naming_the_row(tmp_path):
    stamps = [t.strftime('%Y-%m-%d %H:%M') for t in DAILY]
    stamps[6] = DAILY[6].strftime('%d/%m/%Y %H:%M')
    with pytest.raises(DataError, match='one format') as e:
        load_bars(write_bars(tmp_path/'mixed.csv', stamps), min_rows=10)
    assert (e.value.row, e.value.line, e.value.column) == (7, 8, 'timestamp')
    assert DAILY[6].strftime('%d/%m/%Y %H:%M') in str(e.value)


def test_day_first_and_month_first_rows_in_one_file_are_refused(tmp_path):
    stamps = [t.strftime('%d/%m/%Y %H:%M') for t in DAILY]
    stamps[20] = DAILY[20].strftime('%m/%d/%Y %H:%M')    # 01/22/2017: only month-first, while 13/01/2017 is only day-first
    with pytest.raises(DataError, match='day-first and month-first') as e:
        load_bars(write_bars(tmp_path/'both.csv', stamps), min_rows=10)
    assert e.value.row == 21 and DAILY[20].strftime('%m/%d/%Y %H:%M') in str(e.value)


def test_offsets_keep_local_time_by_default_and_convert_with_timezone(tmp_path):
    "New York bars across the March DST change: -05:00 then -04:00. By default they stay at 09:30 (time-of-day features)."
    ny = pd.date_range('2017-03-01 09:30', periods=30, freq='D', tz='America/New_York')
    stamps = [t.isoformat() for t in ny]
    assert {s[-6:] for s in stamps} == {'-05:00', '-04:00'}
    path = write_bars(tmp_path/'ny.csv', stamps)
    local = load_bars(path, min_rows=10)
    np.testing.assert_array_equal(loaded_times(local), expected([s[:19] for s in stamps], format='%Y-%m-%dT%H:%M:%S'))
    assert (pd.DatetimeIndex(loaded_times(local)).strftime('%H:%M') == '09:30').all()
    assert local.attrs['timestamps'][0]['zone'] == 'local time of the file'
    utc = load_bars(path, min_rows=10, timezone='UTC')
    np.testing.assert_array_equal(loaded_times(utc), expected(stamps, format='%Y-%m-%dT%H:%M:%S%z', utc=True))
    london = load_bars(path, min_rows=10, timezone='Europe/London')
    want = pd.to_datetime(pd.Series(stamps), format='%Y-%m-%dT%H:%M:%S%z', utc=True).dt.tz_convert('Europe/London')
    np.testing.assert_array_equal(loaded_times(london), np.sort(want.dt.tz_localize(None).to_numpy('datetime64[ns]')))
    assert london.attrs['timestamps'][0]['zone'] == 'converted to Europe/London' and london.attrs['timezone'] == 'Europe/London'


def test_epochs_get_their_unit_from_magnitude_and_are_utc(tmp_path):
    seconds = ((DAILY - pd.Timestamp('1970-01-01')) // pd.Timedelta('1s')).tolist()
    assert 1e9 < seconds[0] < 2e9
    for unit, values in (('s', seconds), ('ms', [s * 1000 for s in seconds])):
        bars = load_bars(write_bars(tmp_path/f'epoch_{unit}.csv', values), min_rows=10)
        np.testing.assert_array_equal(loaded_times(bars), expected(values, unit=unit))
        assert bars.attrs['timestamps'][0]['zone'] == 'UTC'
    ny = load_bars(tmp_path/'epoch_s.csv', min_rows=10, timezone='America/New_York')
    np.testing.assert_array_equal(loaded_times(ny), DAILY.tz_localize('UTC').tz_convert('America/New_York')
                                  .tz_localize(None).to_numpy('datetime64[ns]'))


def test_bad_time_zone_name_is_refused_with_the_nearest(tmp_path):
    path = write_bars(tmp_path/'b.csv', [t.strftime('%Y-%m-%d %H:%M') for t in DAILY])
    with pytest.raises(DataError, match='America/New_York'):
        load_bars(path, min_rows=10, timezone='America/NewYork')


def test_how_the_file_was_read_is_reported(tmp_path):
    path = write_bars(tmp_path/'b.csv', [t.strftime('%d.%m.%Y %H:%M:%S.000') for t in DAILY], spread=0.5, next_open=1.0)
    bars = load_bars(path, min_rows=10, **load_options({'features': {'user_columns': ['spread']}}))
    text = load_summary(describe_load(bars))
    assert 'timestamps: day-first %d.%m.%Y %H:%M:%S.%f, local time of the file, tz-naive' in text
    assert 'user columns used as features: spread' in text and 'ignored: next_open' in text
    assert 'user columns used as features: none' in load_summary(describe_load(load_bars(path, min_rows=10)))


def test_extra_columns_are_read_only_when_listed(tmp_path):
    path = write_bars(tmp_path/'b.csv', [t.strftime('%Y-%m-%d %H:%M') for t in DAILY], spread=0.5, next_open=1.0)
    assert 'next_open' not in load_bars(path, min_rows=10).columns
    assert list(load_bars(path, min_rows=10, user_columns=['spread']).columns)[-1] == 'spread'
    with pytest.raises(DataError, match="'imbalance'") as e:
        load_bars(path, min_rows=10, user_columns=['imbalance'])
    assert e.value.column == 'imbalance' and e.value.file == str(path)
    with pytest.raises(DataError, match='list of the extra file columns'):
        load_bars(path, min_rows=10, user_columns=True)


# ---- the driver reads the files with the config's settings, before any kernel starts ------------------------------

@pytest.mark.slow
def test_driver_refuses_an_ambiguous_file_fast_and_accepts_it_with_dayfirst(tmp_path):
    from test_runner import FAST_S, assert_no_kernel, demo_nbs, drive, make_root
    root = make_root(tmp_path/'root')
    d = tmp_path/'bars'; d.mkdir()
    stamps = [t.strftime('%d/%m/%Y %H:%M') for t in pd.date_range('2017-01-02 09:30', periods=400, freq='min')]
    write_bars(d/'eu.csv', stamps)
    nbs = demo_nbs(tmp_path/'nbs')
    p, secs = drive(root, '--data-dir', d, '--nbs-dir', nbs)
    assert p.returncode == 2 and secs < FAST_S, (p.returncode, secs, p.stderr)
    assert 'eu.csv' in p.stderr and 'day-first or month-first' in p.stderr and 'data.dayfirst' in p.stderr
    assert_no_kernel(root, p)
    p, _ = drive(root, '--data-dir', d, '--set', 'data.dayfirst=true', '--dry-run', '--nbs-dir', nbs)
    assert p.returncode == 0, p.stderr
    p, _ = drive(root, '--data-dir', d, '--set', "data.date_format='%d/%m/%Y %H:%M'", '--dry-run', '--nbs-dir', nbs)
    assert p.returncode == 0, p.stderr   # the README's spelling of the same fix
    p, _ = drive(root, '--data-dir', d, '--set', 'data.dayfirst=true', '--set', 'features.user_columns=true',
                 '--dry-run', '--nbs-dir', nbs)
    assert p.returncode == 2 and 'list of the extra file columns' in p.stderr, p.stderr


def test_run_data_reads_files_with_the_config_settings_and_says_how(tmp_path, capsys):
    "prepare_run_data passes data.dayfirst and features.user_columns to load_bars and records/prints what was done."
    from pipeline_lib.core.config import load_config
    from pipeline_lib.phases.run_data import prepare_run_data
    days = [pd.date_range(f'2017-01-0{d} 09:30', periods=390, freq='min') for d in (2, 3)]   # every day <= 12
    stamps = [t.strftime('%d/%m/%Y %H:%M') for t in days[0].append(days[1])]
    path = write_bars(tmp_path/'eu.csv', stamps, spread=0.5, next_open=1.0)
    cfg = load_config('configs/quick.yaml', {'data': {'dayfirst': True},
                                             'features': {'families': ['roc'], 'user_columns': ['spread']}})
    rd = prepare_run_data(cfg, data_dir=path, cache_dir=tmp_path/'cache')
    out = capsys.readouterr().out
    assert 'timestamps: day-first %d/%m/%Y %H:%M, local time of the file, tz-naive' in out
    assert 'user columns used as features: spread (extra columns ignored: next_open' in out
    assert rd.loading['timestamps'][0]['reading'] == 'day-first' and rd.loading['user_columns'] == ['spread']
    assert rd.bars['timestamp'].min() == pd.Timestamp('2017-01-02 09:30')
    assert 'user_spread' in rd.features and not any('next_open' in c for c in rd.features)
