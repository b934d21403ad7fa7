"""The local drill: the whole system on one machine, interruptions injected, work counted.

``spotguard drill`` (``make demo``) starts an AWS emulator (moto server) on 127.0.0.1,
creates the fleet's queues, tables, ASG and EventBridge rules from the same contracts as
the stack, runs the real agent on every simulated instance and the real dispatcher and
watchdog in a local Lambda host, plays a seeded chaos plan, and reports what happened to every
task. See docs/drill.md.
"""

from spotguard_tools.drill.config import DrillConfig
from spotguard_tools.drill.run_loop import Drill

__all__ = ["Drill", "DrillConfig"]
