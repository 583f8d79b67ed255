"""Golden error messages: each folder under tests/golden/config is one mistake a user can make.

A case is ``gateway.yaml`` (plus any CSV it names) and ``expected.err``, the exact issue lines
with paths relative to the case folder. ``UPDATE_GOLDEN=1`` rewrites ``expected.err`` from the
current output; read every rewritten file before committing it, since the point of these cases
is that a person checked each message is right and helpful.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway.config import load_config
from gateway.errors import ConfigError

CASES = Path(__file__).resolve().parents[1] / "golden" / "config"
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"


def case_dirs() -> list[Path]:
    return sorted(p for p in CASES.iterdir() if (p / "gateway.yaml").is_file())


def rendered(case: Path) -> str:
    """The issues as the user sees them, with the case folder cut from every path."""
    try:
        load_config(case / "gateway.yaml")
    except ConfigError as err:
        # Paths also appear inside messages ("first at lathe3.csv:7"), so strip them everywhere.
        prefix = f"{case}{os.sep}"
        return "".join(f"{issue}\n".replace(prefix, "") for issue in err.issues)
    pytest.fail(f"{case.name}: gateway.yaml loaded without errors; a golden case must fail")


def test_there_are_golden_cases() -> None:
    assert len(case_dirs()) >= 8


@pytest.mark.parametrize("case", case_dirs(), ids=lambda p: p.name)
def test_golden_config_errors(case: Path) -> None:
    actual = rendered(case)
    expected_file = case / "expected.err"
    if UPDATE:
        expected_file.write_text(actual, encoding="utf-8")
    assert expected_file.is_file(), "no expected.err: run with UPDATE_GOLDEN=1 and review it"
    assert actual == expected_file.read_text(encoding="utf-8")
