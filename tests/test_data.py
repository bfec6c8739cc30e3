import os
import warnings

import numpy as np
import pandas as pd
import pytest

from pipeline_lib.data.load import MIN_ROWS, DataError, DataWarning, infer_interval, load_bars
from synthetic import walk_bars


def same(got, want):
    pd.testing.assert_frame_equal(got, want, check_exact=False, rtol=1e-12)


@pytest.fixture(scope='module')
def bars():
    return walk_bars()


def listing(d):
    return sorted((p, os.path.getmtime(os.path.join(d, p))) for p in os.listdir(d))


# ---------------------------------------------------------------- layouts and spellings round-trip

def test_layouts_and_spellings_round_trip(tmp_path, bars):
    made = {}
    bars.to_csv(tmp_path/'long.csv', index=False)
    made['long csv'] = tmp_path/'long.csv'
    spelled = bars.rename(columns={'symbol': 'Ticker', 'timestamp': 'Datetime', 'open': 'OPEN', 'high': 'High',
                                   'close': 'Close', 'volume': 'Vol'})
    spelled.to_csv(tmp_path/'spelled.csv.gz', index=True)   # with a pandas 'Unnamed: 0' index column
    made['spelled csv.gz'] = tmp_path/'spelled.csv.gz'
    bars.to_parquet(tmp_path/'long.parquet')
    made['long parquet'] = tmp_path/'long.parquet'
    for layout in ('csvdir', 'pqdir'):
        (tmp_path/layout).mkdir()
    (tmp_path/'csvdir'/'README.txt').write_text('ignored')
    for sym, g in bars.groupby('symbol'):
        g = g.drop(columns='symbol')
        split = g.assign(Date=g['timestamp'].dt.strftime('%Y-%m-%d'), Time=g['timestamp'].dt.strftime('%H:%M'))
        split.drop(columns='timestamp').to_csv(tmp_path/'csvdir'/f'{sym}.csv', index=False)
        g.rename(columns={'timestamp': 'Date', 'open': 'Open'}).set_index('Date').to_parquet(tmp_path/'pqdir'/f'{sym}.parquet')
    made['dir of csv, date + time'] = tmp_path/'csvdir'
    made['dir of parquet, DatetimeIndex'] = tmp_path/'pqdir'
    epoch = bars.assign(timestamp=bars['timestamp'].astype('int64') // 10**6)   # epoch milliseconds
    epoch.to_csv(tmp_path/'epoch.csv', index=False)
    made['epoch ms'] = tmp_path/'epoch.csv'
    tz = bars.assign(timestamp=bars['timestamp'].dt.tz_localize('UTC').dt.tz_convert('America/New_York'))
    tz.to_csv(tmp_path/'tz.csv', index=False)
    made['tz-aware csv'] = tmp_path/'tz.csv'
    tz.to_parquet(tmp_path/'tz.parquet')
    made['tz-aware parquet'] = tmp_path/'tz.parquet'
    for name, path in made.items():
        got = load_bars(path, timezone='UTC' if 'tz-aware' in name else None)   # aware values to one clock: UTC here
        assert list(got.columns) == list(bars.columns), name
        same(got, bars)


def test_single_file_without_symbol_column_uses_stem(tmp_path, bars):
    one = bars[bars['symbol'] == 'AAA'].drop(columns='symbol')
    one.to_csv(tmp_path/'XYZ.csv', index=False)
    got = load_bars(tmp_path/'XYZ.csv')
    assert set(got['symbol']) == {'XYZ'} and len(got) == len(one)


def test_mixed_time_zones_across_files(tmp_path, bars):
    "With data.timezone every file is converted to that zone; without it each file keeps its own wall-clock time."
    (tmp_path/'d').mkdir()
    a = bars[bars['symbol'] == 'AAA'].drop(columns='symbol')
    b = bars[bars['symbol'] == 'BBB'].drop(columns='symbol')
    a.assign(timestamp=a['timestamp'].dt.tz_localize('UTC').dt.tz_convert('Asia/Tokyo')).to_csv(tmp_path/'d'/'AAA.csv', index=False)
    b.assign(timestamp=b['timestamp'].dt.strftime('%Y-%m-%dT%H:%M:%SZ')).to_csv(tmp_path/'d'/'BBB.csv', index=False)
    same(load_bars(tmp_path/'d', timezone='UTC'), bars)
    local = load_bars(tmp_path/'d')
    tokyo = bars['symbol'].eq('AAA').to_numpy()
    shift = pd.to_timedelta(np.where(tokyo, 9, 0), unit='h')   # Tokyo is UTC+9 all year
    same(local, bars.assign(timestamp=(bars['timestamp'] + shift).astype('datetime64[ns]')))
    assert {r['zone'] for r in local.attrs['timestamps']} == {'local time of the file'}


def test_symbol_strings_are_not_parsed_as_numbers(tmp_path, bars):
    bars.assign(symbol=bars['symbol'].map({'AAA': '0700', 'BBB': '0005'})).to_csv(tmp_path/'hk.csv', index=False)
    assert sorted(set(load_bars(tmp_path/'hk.csv')['symbol'])) == ['0005', '0700']


def test_unsorted_input_is_sorted(tmp_path, bars):
    shuffled = bars.sample(frac=1.0, random_state=3)
    assert not shuffled.index.is_monotonic_increasing
    shuffled.to_csv(tmp_path/'shuffled.csv', index=False)
    got = load_bars(tmp_path/'shuffled.csv')
    same(got, bars)
    assert isinstance(got.index, pd.RangeIndex)


def test_extra_numeric_columns_kept_as_float64(tmp_path, bars):
    extra = bars.assign(spread=np.linspace(0, 1, len(bars)), n_trades=np.arange(len(bars)), halted=np.arange(len(bars)) % 2 == 0)
    extra.to_csv(tmp_path/'x.csv', index=False)
    extra.to_parquet(tmp_path/'x.parquet')
    for f in ('x.csv', 'x.parquet'):
        assert list(load_bars(tmp_path/f).columns) == list(bars.columns)   # not listed: ignored
        got = load_bars(tmp_path/f, user_columns=['spread', 'n_trades', 'halted'])
        assert list(got.columns) == list(bars.columns) + ['spread', 'n_trades', 'halted']
        assert (got[['spread', 'n_trades', 'halted']].dtypes == 'float64').all()
        np.testing.assert_allclose(got['n_trades'], np.arange(len(bars)))
        assert got['halted'].sum() == len(bars) // 2


def test_inf_in_user_feature_becomes_nan_with_warning(tmp_path, bars):
    bars.assign(ratio=np.where(np.arange(len(bars)) == 4, np.inf, 1.0)).to_parquet(tmp_path/'r.parquet')
    with pytest.warns(DataWarning, match="'ratio'.*row 5"):
        got = load_bars(tmp_path/'r.parquet', user_columns=['ratio'])
    assert got['ratio'].isna().sum() == 1 and np.isfinite(got['ratio'].dropna()).all()


def test_daily_data_works(tmp_path):
    daily = walk_bars(n=150, freq='B', start='2023-01-02')
    daily.to_csv(tmp_path/'daily.csv', index=False)
    got = load_bars(tmp_path/'daily.csv')
    same(got, daily)
    assert infer_interval(got) == pd.Timedelta('1D')
    daily.assign(timestamp=daily['timestamp'].dt.strftime('%Y%m%d').astype(int)).to_csv(tmp_path/'yyyymmdd.csv', index=False)
    same(load_bars(tmp_path/'yyyymmdd.csv'), daily)   # 20230102 is a date, not an epoch second in 1970


def test_adjusted_close(tmp_path, bars):
    adj = bars.assign(**{'Adj Close': bars['close'] * 0.5})
    adj.to_csv(tmp_path/'adj.csv', index=False)
    same(load_bars(tmp_path/'adj.csv'), bars)   # ignored by default: neither a price nor a feature
    got = load_bars(tmp_path/'adj.csv', adj_close=True)
    for c in ('open', 'high', 'low', 'close'):
        np.testing.assert_allclose(got[c], bars[c] * 0.5, rtol=1e-12)
    np.testing.assert_array_equal(got['volume'], bars['volume'])
    bars.to_csv(tmp_path/'plain.csv', index=False)
    with pytest.raises(DataError, match='adj_close=True') as e:
        load_bars(tmp_path/'plain.csv', adj_close=True)
    assert "columns found: ['symbol', 'timestamp'" in str(e.value)


def test_tolerance_clips_rounding_and_rejects_more(tmp_path, bars):
    tiny = bars.copy()
    tiny.loc[3, 'close'] = tiny.loc[3, 'high'] * (1 + 1e-8)
    tiny.to_parquet(tmp_path/'tiny.parquet')
    got = load_bars(tmp_path/'tiny.parquet')
    assert got.loc[3, 'high'] == got.loc[3, 'close']
    assert ((got['low'] <= got[['open', 'close']].min(axis=1)) & (got[['open', 'close']].max(axis=1) <= got['high'])).all()
    big = bars.copy()
    big.loc[3, 'close'] = big.loc[3, 'high'] * (1 + 1e-4)
    big.to_parquet(tmp_path/'big.parquet')
    with pytest.raises(DataError, match='outside'):
        load_bars(tmp_path/'big.parquet')
    load_bars(tmp_path/'big.parquet', tol=1e-3)


def test_min_rows(tmp_path):
    short = walk_bars(n=50)
    short.to_csv(tmp_path/'short.csv', index=False)
    assert len(load_bars(tmp_path/'short.csv', min_rows=50)) == 100
    with pytest.raises(DataError, match=f'50 rows, fewer than min_rows={MIN_ROWS}') as e:
        load_bars(tmp_path/'short.csv')
    assert e.value.symbol == 'AAA' and 'BBB (50)' in str(e.value)


def test_different_intervals_rejected(tmp_path):
    mixed = pd.concat([walk_bars(('AAA',)), walk_bars(('BBB',), freq='5min')], ignore_index=True)
    mixed.to_csv(tmp_path/'mixed.csv', index=False)
    with pytest.raises(DataError, match='different bar intervals') as e:
        load_bars(tmp_path/'mixed.csv')
    assert 'AAA: 0 days 00:01:00' in str(e.value) and 'BBB: 0 days 00:05:00' in str(e.value)


# ---------------------------------------------------------------- bad input: each names file, symbol, column, row

def _bad_cases(bars):
    "name -> (function writing the bad input into a folder and returning the path to load, expected fields)."
    a = bars[bars['symbol'] == 'AAA'].reset_index(drop=True)

    def csv_with(edit, name='bad.csv', frame=bars):
        def write(d):
            df = frame.copy()
            df['timestamp'] = df['timestamp'].astype(str)
            df = edit(df) if edit else df
            df.to_csv(d/name, index=False)
            return d/name
        return write

    def setval(row, col, val):   # row: 1-based data row
        def edit(df):
            df = df.astype({col: object}) if isinstance(val, str) else df
            df.loc[row - 1, col] = val
            return df
        return edit

    def raw(name, content):
        def write(d):
            (d/name).write_bytes(content)
            return d/name
        return write

    def blank_lines(d):
        df = bars.copy()
        df.loc[5, 'volume'] = -3.0
        text = df.to_csv(index=False).splitlines()
        text.insert(2, '')          # a blank line after data row 1 (line 3), skipped by the reader
        (d/'blank.csv').write_text('\n'.join(text) + '\n')
        return d/'blank.csv'

    def two_files(d):
        (d/'two').mkdir()
        a.drop(columns='symbol').assign(spread=1.0).to_csv(d/'two'/'AAA.csv', index=False)
        a.drop(columns='symbol').to_csv(d/'two'/'BBB.csv', index=False)
        return d/'two'

    def dup_across_files(d):
        (d/'dup').mkdir()
        a.to_csv(d/'dup'/'a.csv', index=False)
        a.iloc[[7]].to_csv(d/'dup'/'b.csv', index=False)
        return d/'dup'

    def empty_dir(d):
        (d/'empty').mkdir()
        (d/'empty'/'notes.txt').write_text('no data here')
        return d/'empty'

    return {
        'missing path': (lambda d: d/'nope.csv', dict(msg='does not exist', file='nope.csv')),
        'empty directory': (empty_dir, dict(msg='no data files', file='empty')),
        'empty file': (raw('empty.csv', b''), dict(msg='File is empty', file='empty.csv')),
        'header only': (raw('head.csv', b'timestamp,open,high,low,close,volume\n'), dict(msg='no data rows', file='head.csv')),
        'corrupt parquet': (raw('bad.parquet', b'PAR1 this is not parquet'), dict(msg='Cannot read the file as parquet', file='bad.parquet')),
        'ragged csv': (raw('rag.csv', b'timestamp,open,high,low,close,volume\n2024-01-02,1,1,1,1,1\n2024-01-03,1,1,1,1,1,7,8\n'),
                       dict(msg='Expected 6 fields in line 3', file='rag.csv')),
        'missing column': (csv_with(lambda df: df.drop(columns='volume')),
                           dict(msg="Missing required column 'volume'", column='volume',
                                also="columns found: ['symbol', 'timestamp', 'open', 'high', 'low', 'close']")),
        'doubled column': (csv_with(lambda df: df.assign(Close=df['close'])), dict(msg="both mean 'close'", column='Close')),
        'bad timestamp': (csv_with(setval(3, 'timestamp', 'not a date')),
                          dict(msg="Cannot parse timestamp 'not a date'", symbol='AAA', column='timestamp', row=3, line=4)),
        'missing timestamp': (csv_with(setval(4, 'timestamp', None)), dict(msg='Missing timestamp', column='timestamp', row=4, line=5)),
        'duplicate timestamp': (csv_with(lambda df: df.assign(timestamp=np.where(df.index == 4, df['timestamp'].shift(), df['timestamp']))),
                                dict(msg='Duplicate timestamp 2024-01-02 09:33:00', symbol='AAA', column='timestamp', row=5, line=6,
                                     also='first seen at row 4 (file line 5)')),
        'duplicate across files': (dup_across_files, dict(msg='Duplicate timestamp 2024-01-02 09:37:00', file='b.csv', symbol='AAA',
                                                          row=1, line=2, also="row 8 (file line 9) of '")),
        'NaN price': (csv_with(setval(7, 'close', np.nan)), dict(msg='Price is missing (NaN)', symbol='AAA', column='close', row=7, line=8)),
        'inf price': (csv_with(setval(8, 'high', np.inf)), dict(msg='Price is infinite', column='high', row=8, line=9)),
        'zero price': (csv_with(setval(2, 'low', 0.0)), dict(msg='Price 0.0 is not positive', column='low', row=2, line=3)),
        'negative price, second symbol': (csv_with(setval(130, 'open', -1.0)),
                                          dict(msg='Price -1.0 is not positive', symbol='BBB', column='open', row=130, line=131)),
        'text in a price': (csv_with(setval(6, 'close', 'abc')), dict(msg="'abc' is not a number", symbol='AAA', column='close', row=6, line=7)),
        'high < low': (csv_with(lambda df: df.assign(high=np.where(df.index == 9, df['low'] * 0.99, df['high']))),
                       dict(msg='is below low', column='high', row=10, line=11)),
        'close > high': (csv_with(lambda df: df.assign(close=np.where(df.index == 10, df['high'] * 1.01, df['close']))),
                         dict(msg='close', column='close', row=11, line=12, also='is outside [low')),
        'open < low': (csv_with(lambda df: df.assign(open=np.where(df.index == 11, df['low'] * 0.99, df['open']))),
                       dict(msg='open', column='open', row=12, line=13, also='is outside [low')),
        'negative volume': (csv_with(setval(13, 'volume', -5.0)), dict(msg='Volume -5.0 is negative', column='volume', row=13, line=14)),
        'NaN volume': (csv_with(setval(14, 'volume', np.nan)), dict(msg='Volume is missing (NaN)', column='volume', row=14, line=15)),
        'blank line before bad row': (blank_lines, dict(msg='is negative', file='blank.csv', column='volume', row=6, line=8)),
        'spelled column named as in file': (csv_with(lambda df: df.rename(columns={'volume': 'Vol'}).assign(
                                                Vol=np.where(df.index == 2, -1.0, df['volume']))),
                                            dict(msg='negative', column='Vol', row=3, line=4)),
        'parquet row': (lambda d: (bars.assign(close=np.where(bars.index == 20, np.nan, bars['close'])).to_parquet(d/'p.parquet'), d/'p.parquet')[1],
                        dict(msg='NaN', file='p.parquet', column='close', row=21, line=None)),
        'non-numeric user column': (csv_with(lambda df: df.assign(sector=np.where(df.index < 4, '1.5', 'tech'))),
                                    dict(msg='User feature column is not numeric', column='sector', row=5, line=6, also="'tech'",
                                         kw=dict(user_columns=['sector']))),
        'listed user column missing in one file': (two_files, dict(msg="User column 'spread' (listed in features.user_columns) "
                                                                   'is not in this file', file='BBB.csv', column='spread',
                                                                   kw=dict(user_columns=['spread']))),
        'too few rows': (csv_with(None, frame=walk_bars(n=40)), dict(msg='40 rows, fewer than min_rows', symbol='AAA')),
        'different intervals': (csv_with(None, frame=pd.concat([walk_bars(('AAA',)), walk_bars(('BBB',), freq='2min')], ignore_index=True)),
                                dict(msg='different bar intervals', file='bad.csv')),
    }


@pytest.mark.parametrize('case', list(_bad_cases(walk_bars())))
def test_bad_input_raises_data_error_naming_where(tmp_path, bars, case):
    write, want = _bad_cases(bars)[case]
    path = write(tmp_path)
    before = listing(tmp_path)
    with pytest.raises(DataError) as e:
        load_bars(path, **want.get('kw', {}))
    err, msg = e.value, str(e.value)
    assert want['msg'] in msg, msg
    if 'also' in want: assert want['also'] in msg, msg
    assert err.file is not None and err.file.endswith(want.get('file', 'bad.csv')), msg
    assert f"file {err.file!r}" in msg
    for key in ('symbol', 'column'):
        if key in want:
            assert getattr(err, key) == want[key], msg
            assert f'{key} {want[key]!r}' in msg, msg
    if 'row' in want:
        assert (err.row, err.line) == (want['row'], want['line']), msg
        assert f"row {want['row']}" + (f" (file line {want['line']})" if want['line'] else '') in msg, msg
    assert listing(tmp_path) == before   # nothing written


def test_error_row_is_the_first_bad_row_in_file_order(tmp_path, bars):
    df = bars.copy()
    df.loc[[30, 90], 'close'] = np.nan
    df.iloc[::-1].to_csv(tmp_path/'rev.csv', index=False)   # reversed: the sort must not change which row is named
    with pytest.raises(DataError, match=r'2 such rows') as e:
        load_bars(tmp_path/'rev.csv')
    assert e.value.row == len(df) - 90 and e.value.line == len(df) - 90 + 1
