"""Property-based fuzzing with hypothesis (issue 13).

Two profiles: ``ci`` (the default: 200 examples per target, in the normal test run) and
``fuzz`` (10,000 per target: ``make fuzz``, which sets ``HYPOTHESIS_PROFILE=fuzz``). Each
target counts the inputs it really ran; the counts and times are printed at the end.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

CI_EXAMPLES = 200
FUZZ_EXAMPLES = 10_000
_COMMON = {
    "deadline": None,
    "database": None,  # no example database written into the work tree
    "suppress_health_check": [
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
        HealthCheck.function_scoped_fixture,  # the fixtures here are per-test on purpose
    ],
    "print_blob": True,  # a failure prints the blob to reproduce it with @reproduce_failure
}
settings.register_profile("ci", max_examples=CI_EXAMPLES, **_COMMON)
settings.register_profile("fuzz", max_examples=FUZZ_EXAMPLES, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def share(fraction: float) -> settings:
    """Settings for one of several tests of a target: ``fraction`` of the profile's
    examples, so the tests of one target add up to the profile's count per target."""
    return settings(max_examples=max(1, round(settings().max_examples * fraction)))


#: target name -> inputs run; target name -> seconds
INPUTS: Counter[str] = Counter()
SECONDS: Counter[str] = Counter()


@pytest.fixture
def count_inputs(request: pytest.FixtureRequest) -> Iterator[Counter[str]]:
    started = time.perf_counter()
    yield INPUTS
    SECONDS[request.node.name] += time.perf_counter() - started


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not INPUTS:
        return
    terminalreporter.section("fuzz inputs per target")
    for target, count in sorted(INPUTS.items()):
        terminalreporter.write_line(f"{target}: {count} inputs")
    for test, seconds in sorted(SECONDS.items()):
        terminalreporter.write_line(f"{test}: {seconds:.1f} s")
