"""Hypothesis profiles of the fuzz targets, and the per-target input counters.

Two profiles: ``ci`` (the default: 200 examples per target, in the normal test run) and
``fuzz`` (10,000 per target: ``make fuzz``, which sets ``HYPOTHESIS_PROFILE=fuzz``).
"""

from __future__ import annotations

import os
from collections import Counter

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
#: The profile of this run. Applied to the fuzz targets only (through ``share``), not loaded
#: globally, so the other property tests of the suite keep their own settings.
PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def share(fraction: float) -> settings:
    """Settings for one of several tests of a target: ``fraction`` of the profile's
    examples, so the tests of one target add up to the profile's count per target."""
    return settings(PROFILE, max_examples=max(1, round(PROFILE.max_examples * fraction)))


#: target name -> inputs run; target name -> seconds
INPUTS: Counter[str] = Counter()
SECONDS: Counter[str] = Counter()
