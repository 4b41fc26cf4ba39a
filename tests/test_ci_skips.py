"""Under CI=1 (.ci/run) a skipped test fails, unless its reason says the machine forbids what it needs
(conftest.ENVIRONMENT_SKIPS): each such skip in the suite must be accepted, a skip for missing data must not."""

import re
from pathlib import Path
from types import SimpleNamespace

import pytest

import conftest

TESTS = Path(__file__).parent


def _report_after_hook(reason: str, monkeypatch, ci: bool = True):
    """The report conftest's hook leaves for a test skipped with `reason`."""
    if ci:
        monkeypatch.setenv("CI", "1")
    else:
        monkeypatch.delenv("CI", raising=False)
    report = SimpleNamespace(skipped=True, outcome="skipped", longrepr=("test_x.py", 1, f"Skipped: {reason}"))
    hook = conftest.pytest_runtest_makereport(None, None)
    next(hook)
    with pytest.raises(StopIteration):
        hook.send(SimpleNamespace(get_result=lambda: report))
    return report


def _machine_skip_reasons() -> list[str]:
    """The reasons of the suite's own skips that are not for data (the literal reason of every skip call in tests/)."""
    found = []
    for path in TESTS.glob("test_*.py"):
        found += re.findall(r'pytest\.skip\(\s*"([^"]+)"', path.read_text())
    return found


def test_every_skip_in_the_suite_is_one_the_machine_forces_and_ci_accepts_it(monkeypatch):
    reasons = _machine_skip_reasons()
    assert any("read-only" in r for r in reasons) and any("another user" in r for r in reasons), reasons
    for reason in reasons:
        assert _report_after_hook(reason, monkeypatch).outcome == "skipped", reason


def test_a_skip_for_missing_data_fails_under_ci_only(monkeypatch):
    report = _report_after_hook("no MNIST files here", monkeypatch)
    assert report.outcome == "failed" and "make data" in report.longrepr
    assert _report_after_hook("no MNIST files here", monkeypatch, ci=False).outcome == "skipped"
