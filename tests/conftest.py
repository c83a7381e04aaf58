"""Test configuration: the failure-mode suites get a per-test watchdog, so a
hang in logq fails the test instead of stalling the run.  The whole suite is
run twice by CI, once as is (native codec when built) and once with
LOGQ_PURE=1; child processes inherit the variable (see helpers.child_env)."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import helpers  # noqa: E402

WATCHED = {"test_crash", "test_powercut", "test_tamper", "test_concurrency", "test_bad_input",
           "test_consumer_crash", "test_pool", "test_forward"}
TEST_TIMEOUT = float(os.environ.get("LOGQ_TEST_TIMEOUT", "120"))


@pytest.fixture(autouse=True)
def _watchdog(request: pytest.FixtureRequest):
    if request.module.__name__.rpartition(".")[2] not in WATCHED:
        yield
        return
    with helpers.deadline(TEST_TIMEOUT, f"test {request.node.name}"):
        yield


def pytest_report_header(config: pytest.Config) -> str:
    import logq
    return f"logq codec: {'native' if logq.native_enabled() else 'pure'} (LOGQ_PURE={os.environ.get('LOGQ_PURE', '')!r}), test seed {helpers.SEED}"


@pytest.fixture
def app(tmp_path):
    """The tasks suites' App (tests/task_app.py) on a fresh queue."""
    import task_app
    a = task_app.app
    a.close()
    a.path = str(tmp_path / "q")
    yield a
    a.close()
