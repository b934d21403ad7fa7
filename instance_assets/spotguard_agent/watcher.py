"""IMDS watcher: turns instance metadata notices into normalised ``contracts.Signal``s.

It polls ``spot/instance-action``, ``events/recommendations/rebalance``,
``autoscaling/target-lifecycle-state`` and ``events/maintenance/scheduled`` every
``poll_seconds``. A 404 means "no notice"; every IMDS error or timeout is logged (once per
streak, not once per poll) and survived. Each notice that drains is handed to the one
callback (the worker's drain path) once; notices that do not drain (a rebalance under a
non-draining policy, a scheduled reboot) are logged and handed to ``on_notice`` (the fleet
record) once.

Deadlines: a spot ``terminate``/``stop`` happens at the notice's ``time``; a ``hibernate``
starts at once (no two-minute lead), so its deadline is never later than the moment the
notice is seen. A scheduled ``instance-stop``/``instance-retirement`` drains by its
``NotBefore`` (``contracts.MAINTENANCE_DRAIN_CODES``); reboots and system maintenance keep
the instance and its work.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime

from spotguard_core.contracts import (
    MAINTENANCE_DRAIN_CODES,
    MAINTENANCE_PAST_STATES,
    SPOT_WARNING_LEAD,
    RebalancePolicy,
    Signal,
    SignalKind,
    SignalSource,
)

from spotguard_agent.imds import ImdsClient, ImdsError

LOG = logging.getLogger("spotguard.watcher")
#: A rebalance recommendation has no deadline; when the policy drains, assume a spot
#: warning's two minutes could follow at any moment.
REBALANCE_DRAIN_WINDOW = SPOT_WARNING_LEAD
TERMINATED_LIFECYCLE_STATES = frozenset({"Terminated", "Terminating", "Terminating:Wait"})
HIBERNATE_ACTION = "hibernate"


def parse_imds_time(value: str) -> datetime:
    """IMDS times look like ``2026-11-24T22:50:00Z``; scheduled events use
    ``21 Jan 2019 09:00:43 GMT``."""
    text = value.strip()
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)
    except ValueError:
        return datetime.strptime(text, "%d %b %Y %H:%M:%S %Z").replace(tzinfo=UTC)


class Watcher:
    def __init__(
        self,
        imds: ImdsClient,
        on_signal: Callable[[Signal], object],
        *,
        instance_id: str | None = None,
        poll_seconds: float = 1.0,
        rebalance_policy: RebalancePolicy = RebalancePolicy.REPLACE,
        on_notice: Callable[[Signal], object] | None = None,
    ) -> None:
        self.imds = imds
        self.on_signal = on_signal
        self.on_notice = on_notice
        self._maintenance_seen: set[str] = set()
        self.instance_id = instance_id
        self.poll_seconds = poll_seconds
        self.rebalance_policy = rebalance_policy
        self._signalled: set[SignalKind] = set()
        self._rebalance_logged = False
        self._failing = False
        self.errors = 0
        self.polls = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Watcher:
        self._thread = threading.Thread(target=self.run, name="imds-watcher", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def run(self) -> None:
        while not self._stop.is_set():
            self.poll_once()
            self._stop.wait(self.poll_seconds)

    # ------------------------------------------------------------------ one poll
    def poll_once(self) -> list[Signal]:
        self.polls += 1
        emitted: list[Signal] = []
        notices: list[Signal] = []
        try:
            if self.instance_id is None:
                self.instance_id = self.imds.instance_id()
            for check in (self._spot, self._lifecycle, self._rebalance):
                signal = check()
                if signal is not None:
                    emitted.append(signal)
            for signal in self._maintenance():
                (emitted if maintenance_drains(signal) else notices).append(signal)
            if self._failing:
                LOG.info("IMDS answers again")
                self._failing = False
        except ImdsError as error:
            self.errors += 1
            if not self._failing:
                LOG.warning("IMDS poll failed (will keep polling): %s", error)
                self._failing = True
        except Exception:  # the watcher must never die: a crashed watcher is worse than none
            self.errors += 1
            LOG.exception("unexpected error in the IMDS poll (will keep polling)")
        self._deliver(emitted, notices)
        return emitted + notices

    def _deliver(self, emitted: list[Signal], notices: list[Signal]) -> None:
        for signal in emitted:
            try:
                self.on_signal(signal)
            except Exception:
                LOG.exception("drain callback failed for %s", signal.kind.value)
        for signal in notices:
            LOG.warning("notice %s (%s): no drain", signal.kind.value, signal.state)
            if self.on_notice is not None:
                try:
                    self.on_notice(signal)
                except Exception:
                    LOG.exception("notice callback failed for %s", signal.kind.value)

    def _signal(
        self,
        kind: SignalKind,
        deadline: datetime | None,
        state: str | None,
        *,
        event_id: str | None = None,
        **attrs: str,
    ) -> Signal:
        received = datetime.now(UTC)
        assert self.instance_id is not None
        if kind is not SignalKind.MAINTENANCE_SCHEDULED:
            self._signalled.add(kind)
        signal = Signal(
            instance_id=self.instance_id,
            kind=kind,
            source=SignalSource.IMDS,
            event_id=event_id or f"imds:{self.instance_id}:{kind.value}:{int(received.timestamp())}",
            received_at=received,
            deadline=deadline,
            state=state,
            event_time=received,
            attributes=attrs,
        )
        LOG.warning("notice: %s, deadline %s", kind.value, deadline.isoformat() if deadline else "none")
        return signal

    def _spot(self) -> Signal | None:
        if SignalKind.SPOT_INTERRUPTION in self._signalled:
            return None
        document = self.imds.spot_instance_action()
        if document is None:
            return None
        action = str(document.get("action", "terminate"))
        seen = datetime.now(UTC)
        try:
            deadline = parse_imds_time(str(document["time"]))
        except (KeyError, ValueError):
            LOG.warning("spot notice without a readable time: %s; assuming the usual lead", document)
            deadline = seen if action == HIBERNATE_ACTION else seen + SPOT_WARNING_LEAD
        if action == HIBERNATE_ACTION:
            # Hibernation starts when the notice is given: there is no two-minute lead.
            deadline = min(deadline, seen)
        return self._signal(SignalKind.SPOT_INTERRUPTION, deadline, action, action=action)

    def _lifecycle(self) -> Signal | None:
        if SignalKind.LIFECYCLE_TERMINATE in self._signalled:
            return None
        state = self.imds.target_lifecycle_state()
        if state not in TERMINATED_LIFECYCLE_STATES:
            return None
        # Scale-in: the terminate hook waits for us (the worker sends heartbeats), so
        # there is no hard deadline; running tasks may finish.
        return self._signal(SignalKind.LIFECYCLE_TERMINATE, None, state, target_lifecycle_state=state)

    def _rebalance(self) -> Signal | None:
        if SignalKind.REBALANCE in self._signalled or self._rebalance_logged:
            return None
        document = self.imds.rebalance_recommendation()
        if document is None:
            return None
        notice_time = str(document.get("noticeTime", ""))
        if self.rebalance_policy != RebalancePolicy.DRAIN:
            LOG.warning(
                "rebalance recommendation at %s: policy %s, not draining",
                notice_time,
                self.rebalance_policy.value,
            )
            self._rebalance_logged = True
            return None
        deadline = datetime.now(UTC) + REBALANCE_DRAIN_WINDOW
        return self._signal(SignalKind.REBALANCE, deadline, None, notice_time=notice_time)

    def _maintenance(self) -> list[Signal]:
        """New scheduled events, each once; completed or canceled ones are history."""
        signals: list[Signal] = []
        for event in self.imds.scheduled_maintenance():
            event_id = str(event.get("EventId", ""))
            code = str(event.get("Code", ""))
            state = str(event.get("State", "active")).lower()
            if not event_id or event_id in self._maintenance_seen or state in MAINTENANCE_PAST_STATES:
                continue
            self._maintenance_seen.add(event_id)
            try:
                deadline: datetime | None = parse_imds_time(str(event["NotBefore"]))
            except (KeyError, ValueError):
                LOG.warning("scheduled event %s without a readable NotBefore: %s", event_id, event)
                deadline = None
            signals.append(
                self._signal(
                    SignalKind.MAINTENANCE_SCHEDULED,
                    deadline,
                    code,
                    event_id=f"imds:{self.instance_id}:{event_id}",
                    code=code,
                    maintenance_event_id=event_id,
                    not_after=str(event.get("NotAfter", "")),
                    description=str(event.get("Description", "")),
                )
            )
        return signals


def maintenance_drains(signal: Signal) -> bool:
    """Decided by the event's code: a stop or a retirement ends the instance (drain by
    ``NotBefore``); a reboot or system maintenance does not (``MAINTENANCE_DRAIN_CODES``)."""
    return signal.kind is SignalKind.MAINTENANCE_SCHEDULED and signal.state in MAINTENANCE_DRAIN_CODES
