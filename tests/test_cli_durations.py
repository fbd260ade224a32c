"""Durations as ollama writes them, parsed once (sllmctl.durations) for the CLI and the API."""

from __future__ import annotations

import pytest

from sllmctl.durations import format_duration, parse_duration


@pytest.mark.parametrize(("text", "seconds"), [
    ("300", 300.0), ("2.5", 2.5), ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0),
    ("1h30m", 5400.0), ("250ms", 0.25), (" 5M ", 300.0), ("0", 0.0), ("-1", -1.0),
    ("-5m", -1.0), (300, 300.0), (-1, -1.0), (1.5, 1.5),
])
def test_parse(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "lots", "5x", "m", "5m junk", "1.2.3", "nan", "inf"])
def test_bad_durations_name_the_forms(text: str) -> None:
    with pytest.raises(ValueError, match="5m"):
        parse_duration(text)


def test_bools_are_not_durations() -> None:
    with pytest.raises(ValueError):
        parse_duration(True)


def test_format() -> None:
    assert [format_duration(s) for s in (0, 59, 60, 90, 3600, 5400, -1)] == [
        "0s", "59s", "1m", "1m30s", "1h", "1h30m", "for ever"]
