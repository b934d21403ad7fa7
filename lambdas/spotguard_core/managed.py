"""Is this instance one of ours?

EventBridge cannot filter ``aws.ec2`` events by tag, so in a busy account most signals
are about other instances. The check must be cheap: the fleet record (one GetItem, read
anyway) answers for every instance spotguard has seen; only unknown ids cost one
``DescribeTags`` call (never a DescribeInstances per event), and its answer is kept in an
in-process LRU cache with a TTL, so a foreign instance's stream of events costs one call
per TTL per warm Lambda container.

The tag alone does not enrol an instance: anyone with ``ec2:CreateTags`` in the account can
put ``spotguard:fleet`` on any instance. Managed means a fleet record of this fleet (written
by spotguard: lifecycle launch, migration launch, the agent of a bootstrapped instance), or
the tag *and* membership of the fleet's ASG (one ``DescribeAutoScalingInstances``, only for
tagged instances, cached with the same answer).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

from spotguard_core.contracts import FLEET_TAG_KEY, FleetRecord

DEFAULT_CACHE_SIZE = 4096
DEFAULT_CACHE_TTL_SECONDS = 300.0


class TtlLru:
    """A small LRU map whose entries expire after ``ttl`` seconds."""

    def __init__(self, *, maxsize: int, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.maxsize = maxsize
        self.ttl = ttl
        self.clock = clock
        self._data: OrderedDict[str, tuple[float, bool]] = OrderedDict()

    def get(self, key: str) -> bool | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        stored_at, value = entry
        if self.clock() - stored_at > self.ttl:
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return value

    def put(self, key: str, value: bool) -> None:
        self._data[key] = (self.clock(), value)
        self._data.move_to_end(key)
        while len(self._data) > self.maxsize:
            self._data.popitem(last=False)

    def clear(self) -> None:
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


@dataclass(eq=False)
class ManagedCheck:
    """Decides "managed?" from the fleet record, else the fleet tag (cached)."""

    fleet: str
    _: KW_ONLY
    ec2: Any
    autoscaling: Any = None
    asg_name: str | None = None
    cache: TtlLru = field(
        default_factory=lambda: TtlLru(maxsize=DEFAULT_CACHE_SIZE, ttl=DEFAULT_CACHE_TTL_SECONDS)
    )
    #: DescribeTags calls made so far.
    tag_lookups: int = field(default=0, init=False)

    def is_managed(self, instance_id: str, record: FleetRecord | None) -> bool:
        if record is not None:
            return record.fleet == self.fleet
        cached = self.cache.get(instance_id)
        if cached is not None:
            return cached
        managed = self.has_fleet_tag(instance_id) and self.in_fleet_asg(instance_id)
        self.cache.put(instance_id, managed)
        return managed

    def in_fleet_asg(self, instance_id: str) -> bool:
        """One DescribeAutoScalingInstances call: is the instance a member of the fleet's ASG?"""
        if self.autoscaling is None or not self.asg_name:
            return False
        found = self.autoscaling.describe_auto_scaling_instances(InstanceIds=[instance_id])
        return any(
            group.get("AutoScalingGroupName") == self.asg_name
            for group in found.get("AutoScalingInstances", [])
        )

    def has_fleet_tag(self, instance_id: str) -> bool:
        """One DescribeTags call (uncached): does the instance carry this fleet's tag?"""
        self.tag_lookups += 1
        response = self.ec2.describe_tags(
            Filters=[
                {"Name": "resource-id", "Values": [instance_id]},
                {"Name": "key", "Values": [FLEET_TAG_KEY]},
            ]
        )
        return any(tag.get("Value") == self.fleet for tag in response.get("Tags", []))
