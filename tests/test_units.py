"""Sizes, durations and rates: parsing, formatting, and the errors people see."""

from __future__ import annotations

import math

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from gpugate import ConfigError
from gpugate._units import (
    _size_from_text,
    format_duration,
    format_rate,
    format_size,
    parse_duration,
    parse_rate,
    parse_size,
)

KiB, MiB, GiB, TiB = 1024, 1024**2, 1024**3, 1024**4


class TestParseSize:
    """parse_size reads bytes from whole numbers and number-and-unit strings."""

    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("0", 0),
            ("1024", 1024),
            ("17B", 17),
            ("1KB", 1000),
            ("1MB", 1000**2),
            ("512MB", 512 * 1000**2),
            ("4GB", 4 * 1000**3),
            ("2TB", 2 * 1000**4),
            ("1KiB", KiB),
            ("512MiB", 512 * MiB),
            ("4GiB", 4 * GiB),
            ("2TiB", 2 * TiB),
        ],
    )
    def test_decimal_units_are_powers_of_1000_and_binary_ones_of_1024(
        self, text: str, expected: int
    ) -> None:
        assert parse_size(text) == expected

    @pytest.mark.parametrize("text", ["4gib", "4GIB", "4Gib", "4 GiB", " 4GiB ", "4\tGiB"])
    def test_units_forgive_letter_case_and_spaces(self, text: str) -> None:
        assert parse_size(text) == 4 * GiB

    def test_fractional_sizes_round_up_to_whole_bytes(self) -> None:
        assert parse_size("1.5GiB") == 3 * GiB // 2
        assert parse_size("0.1KiB") == 103  # 102.4: a part of a byte is memory too
        assert parse_size(".5MB") == 500_000
        assert (parse_size(0.5), parse_size(1.5), parse_size("2.5")) == (1, 2, 3)

    @pytest.mark.parametrize(
        "value", [2**50 + 1, 2**64 - 1, 10**20, "1025TiB", "2000000GB", "2PiB", "1.2PB", 1e300]
    )
    def test_sizes_past_a_pebibyte_are_refused(self, value: object) -> None:
        # The scripts hold numbers as doubles and write records with %d.
        with pytest.raises(ConfigError, match="more than 1PiB"):
            parse_size(value, key="vram")  # type: ignore[arg-type]
        assert parse_size(2**50) == parse_size("1024TiB") == parse_size("1PiB") == 2**50

    def test_the_limit_is_written_in_its_own_unit(self) -> None:
        assert parse_size("1pib") == 2**50
        assert parse_size("1PB") == 10**15

    def test_whole_numbers_are_bytes(self) -> None:
        assert parse_size(0) == 0
        assert parse_size(80 * GiB) == 80 * GiB

    def test_integral_floats_are_bytes(self) -> None:
        assert parse_size(8e9) == 8_000_000_000

    @pytest.mark.parametrize("letter", ["K", "M", "G", "T", "P", "g"])
    def test_single_letter_units_are_refused_as_ambiguous(self, letter: str) -> None:
        with pytest.raises(ConfigError, match="ambiguous") as caught:
            parse_size(f"4{letter}")
        upper = letter.upper()
        assert f'"4{upper}iB"' in str(caught.value)
        assert f'"4{upper}B"' in str(caught.value)

    @pytest.mark.parametrize(
        ("value", "shown"),
        [
            ("12 gigs", '"12 gigs"'),
            ("", '""'),
            ("nan", '"nan"'),
            ("GiB", '"GiB"'),
            ("4 PiB", '"4 PiB"'),
            ("1e9", '"1e9"'),
            ("-5GiB", '"-5GiB"'),
            (-1, "-1"),
            (math.nan, "nan"),
            (math.inf, "inf"),
            (True, "True"),
            ([4], "[4]"),
        ],
    )
    def test_a_non_size_is_refused_naming_the_value_and_a_good_example(
        self, value: object, shown: str
    ) -> None:
        with pytest.raises(ConfigError) as caught:
            parse_size(value)  # type: ignore[arg-type]
        message = str(caught.value)
        assert shown in message
        assert '"4GiB"' in message
        assert caught.value.value is value

    def test_negative_sizes_are_called_negative(self) -> None:
        with pytest.raises(ConfigError, match="negative"):
            parse_size("-5GiB")

    def test_the_error_names_key_and_source(self) -> None:
        with pytest.raises(ConfigError) as caught:
            parse_size("lots", key="classes.batch.reserve", source="gpugate.toml")
        err = caught.value
        assert (err.key, err.source, err.value) == ("classes.batch.reserve", "gpugate.toml", "lots")
        assert str(err).startswith('gpugate.toml: classes.batch.reserve: "lots" is not a size')

    def test_repeated_strings_are_parsed_once(self) -> None:
        parse_size("3GiB")
        hits = _size_from_text.cache_info().hits
        parse_size("3GiB")
        assert _size_from_text.cache_info().hits == hits + 1


class TestParseDuration:
    """parse_duration reads seconds from numbers and unit strings."""

    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("500ms", 0.5),
            ("30s", 30.0),
            ("5m", 300.0),
            ("5min", 300.0),
            ("2h", 7200.0),
            ("1d", 86400.0),
            ("1.5h", 5400.0),
            ("1h30m", 5400.0),
            ("1m30s", 90.0),
            ("1d2h3m4s5ms", 93784.005),
            ("1h 30m", 5400.0),
            ("30S", 30.0),
            ("30", 30.0),
            ("0", 0.0),
        ],
    )
    def test_unit_strings_are_seconds(self, text: str, expected: float) -> None:
        assert parse_duration(text) == expected

    @pytest.mark.parametrize(("value", "expected"), [(30, 30.0), (0.25, 0.25), (0, 0.0)])
    def test_numbers_are_seconds(self, value: float, expected: float) -> None:
        result = parse_duration(value)
        assert result == expected
        assert isinstance(result, float)

    @pytest.mark.parametrize(
        ("value", "shown"),
        [
            ("5 mins", '"5 mins"'),
            ("30m1h", '"30m1h"'),
            ("5m5m", '"5m5m"'),
            ("1y", '"1y"'),
            ("", '""'),
            ("ms", '"ms"'),
            ("-5s", '"-5s"'),
            (-1, "-1"),
            (math.inf, "inf"),
            (False, "False"),
        ],
    )
    def test_a_non_duration_is_refused_naming_the_value_and_a_good_example(
        self, value: object, shown: str
    ) -> None:
        with pytest.raises(ConfigError) as caught:
            parse_duration(value, key="pool.lease_ttl")  # type: ignore[arg-type]
        message = str(caught.value)
        assert message.startswith("pool.lease_ttl: ")
        assert shown in message
        assert '"30s"' in message

    def test_negative_durations_are_called_negative(self) -> None:
        with pytest.raises(ConfigError, match="negative"):
            parse_duration("-5s")

    @pytest.mark.parametrize("value", [10**16, "3651d", 1e300])
    def test_durations_past_ten_years_are_refused(self, value: object) -> None:
        with pytest.raises(ConfigError, match="longer than ten years"):
            parse_duration(value, key="classes.batch.max_duration")  # type: ignore[arg-type]
        assert parse_duration("3650d") == 3650 * 86400


class TestParseRate:
    """parse_rate reads events per second from "COUNT/DURATION" and numbers."""

    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("20/s", 20.0),
            ("100/min", 100 / 60),
            ("6/m", 0.1),
            ("5/h", 5 / 3600),
            ("24/d", 24 / 86400),
            ("1/500ms", 2.0),
            ("3/2s", 1.5),
            ("1/1m30s", 1 / 90),
            ("0.5/s", 0.5),
            ("20 / s", 20.0),
            ("20", 20.0),
        ],
    )
    def test_counts_per_duration_are_per_second(self, text: str, expected: float) -> None:
        assert parse_rate(text) == pytest.approx(expected, rel=1e-15)

    def test_plain_numbers_are_per_second(self) -> None:
        assert parse_rate(20) == 20.0
        assert parse_rate(0.5) == 0.5

    @pytest.mark.parametrize("value", ["1000001/s", 1e7, "2000/1ms"])
    def test_rates_past_a_million_per_second_are_refused(self, value: object) -> None:
        with pytest.raises(ConfigError, match="more than a million per second"):
            parse_rate(value, key="classes.batch.rate")  # type: ignore[arg-type]
        assert parse_rate("1000000/s") == 1e6

    @pytest.mark.parametrize("value", ["0/s", "0/h", 0, "0"])
    def test_zero_is_a_rate_meaning_never(self, value: str | int) -> None:
        assert parse_rate(value) == 0.0

    @pytest.mark.parametrize(
        ("value", "shown", "why"),
        [
            ("fast", '"fast"', "not a rate"),
            ("10 per second", '"10 per second"', "not a rate"),
            ("/s", '"/s"', "not a rate"),
            ("1/x", '"1/x"', "not a rate"),
            ("-1/s", '"-1/s"', "negative"),
            ("1/0s", '"1/0s"', "zero time"),
            (-2, "-2", "negative"),
            (math.nan, "nan", "not a rate"),
            (True, "True", "not a rate"),
        ],
    )
    def test_a_non_rate_is_refused_naming_the_value_and_a_good_example(
        self, value: object, shown: str, why: str
    ) -> None:
        with pytest.raises(ConfigError) as caught:
            parse_rate(value, key="classes.batch.rate")  # type: ignore[arg-type]
        message = str(caught.value)
        assert message.startswith("classes.batch.rate: ")
        assert shown in message
        assert why in message
        assert '"20/s"' in message


class TestFormatSize:
    """format_size shows bytes in binary units, exactly where it can."""

    @pytest.mark.parametrize(
        ("n", "text"),
        [
            (0, "0B"),
            (512, "512B"),
            (1023, "1023B"),
            (KiB, "1KiB"),
            (1000 * KiB, "1000KiB"),
            (1025 * KiB, "1025KiB"),
            (1500, "1500B"),
            (100_000, "97.7KiB"),
            (512 * MiB, "512MiB"),
            (4 * GiB, "4GiB"),
            (3 * GiB // 2, "1.5GiB"),
            (4 * GiB + 1, "4.0GiB"),
            (MiB - 1, "1.0MiB"),
            (3 * 1024 * TiB, "3072TiB"),
            (-2 * GiB, "-2GiB"),
        ],
    )
    def test_examples(self, n: int, text: str) -> None:
        assert format_size(n) == text

    @given(st.integers(min_value=0, max_value=2**50 - 2**46))
    def test_parse_size_reads_it_back_within_rounding(self, n: int) -> None:
        assert abs(parse_size(format_size(n)) - n) <= 0.05 * n + 1

    @given(
        st.integers(min_value=0, max_value=99_999),
        st.sampled_from([1, KiB, MiB, GiB, TiB]),
    )
    def test_exact_multiples_read_back_exactly(self, count: int, unit: int) -> None:
        assume(count * unit <= 2**50)
        assert parse_size(format_size(count * unit)) == count * unit


class TestFormatDuration:
    """format_duration shows seconds as compact parts, to the millisecond."""

    @pytest.mark.parametrize(
        ("seconds", "text"),
        [
            (0, "0s"),
            (0.25, "250ms"),
            (0.0005, "0.5ms"),
            (1e-9, "0.000001ms"),
            (30, "30s"),
            (300, "5m"),
            (5400, "1h30m"),
            (90.5, "1m30.5s"),
            (86400, "1d"),
            (1e6, "11d13h46m40s"),
            (-30, "-30s"),
            (math.inf, "inf"),
        ],
    )
    def test_examples(self, seconds: float, text: str) -> None:
        assert format_duration(seconds) == text

    @given(st.floats(min_value=0, max_value=1e8))
    def test_parse_duration_reads_it_back_to_the_millisecond(self, seconds: float) -> None:
        assert abs(parse_duration(format_duration(seconds)) - seconds) <= 0.0005 + 1e-6

    @given(st.integers(min_value=0, max_value=10**11))
    def test_whole_milliseconds_read_back_exactly(self, ms: int) -> None:
        assert parse_duration(format_duration(ms / 1000)) == ms / 1000


class TestFormatRate:
    """format_rate prefers a short exact count per second, minute or hour."""

    @pytest.mark.parametrize(
        ("per_second", "text"),
        [
            (0, "0/s"),
            (20, "20/s"),
            (2.5, "2.5/s"),
            (0.1, "6/min"),
            (100 / 60, "100/min"),
            (1 / 3600, "1/h"),
            (1 / 7200, "0.5/h"),
            (123456.789, "123457/s"),
            (1 / 3, "20/min"),
            (1e-7, "0.00036/h"),
        ],
    )
    def test_examples(self, per_second: float, text: str) -> None:
        assert format_rate(per_second) == text

    @given(st.floats(min_value=1e-9, max_value=9.9e5))
    def test_parse_rate_reads_it_back_within_three_digits(self, per_second: float) -> None:
        assert parse_rate(format_rate(per_second)) == pytest.approx(per_second, rel=5e-3)
