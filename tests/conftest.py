"""Shared pytest hooks: with REFSLM_REQUIRE_TORCH=1 (set by CI's cross-check step, after it installed torch
and transformers) a test or module skipped because torch or transformers cannot be imported fails
instead, so the independent cross-checks cannot silently not run."""

import os

import pytest


def _fail_torch_skip(report, excinfo) -> None:
    if report.skipped and excinfo is not None and os.environ.get("REFSLM_REQUIRE_TORCH") == "1":
        reason = str(excinfo.value)
        if "'torch'" in reason or "'transformers'" in reason:
            report.outcome = "failed"
            report.longrepr = f"REFSLM_REQUIRE_TORCH=1 but this was skipped: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_torch_skip(outcome.get_result(), call.excinfo)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    _fail_torch_skip(report, getattr(report, "call", None) and report.call.excinfo)
