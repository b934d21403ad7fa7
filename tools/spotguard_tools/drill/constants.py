"""Values the drill's parts share: the AWS stand-in, the chaos executor and the run loop."""

from __future__ import annotations

from typing import Final

from spotguard_core import contracts

#: EC2 states after which an instance's agent is gone (or going).
ENDING_STATES: Final = contracts.ENDING_EC2_STATES
#: States in which EC2 has taken the machine (its processes are dead).
GONE_STATES: Final = frozenset({"terminated", "stopped"})
#: How often the run loop wakes up.
TICK_SECONDS: Final = 0.2
#: How often the stand-in compares the emulated ASG with its simulated instances.
FLEET_POLL_SECONDS: Final = 0.5
#: The chaos plan starts when the initial fleet works, or this long after the tasks at the latest.
CHAOS_CLOCK_FALLBACK_SECONDS: Final = 90.0
#: Interruption kind of a termination by the control plane (the watchdog), not by the plan.
WATCHDOG_KIND: Final = "watchdog"
