"""Property-based fuzzing with hypothesis (issue 13): the input counting fixture and the
end-of-run summary (inputs and seconds per target). Profiles: ``tests/fuzz/profiles.py``.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator

import pytest

from tests.fuzz.profiles import INPUTS, PROFILE, SECONDS


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
        short = (
            "" if count >= PROFILE.max_examples else f"  (fewer than the profile's {PROFILE.max_examples})"
        )
        terminalreporter.write_line(f"{target}: {count} inputs{short}")
    for test, seconds in sorted(SECONDS.items()):
        terminalreporter.write_line(f"{test}: {seconds:.1f} s")
