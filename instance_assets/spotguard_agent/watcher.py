"""IMDS watcher: turns instance metadata notices into normalised ``contracts.Signal``s.

It polls ``spot/instance-action``, ``events/recommendations/rebalance`` and
``autoscaling/target-lifecycle-state`` every ``poll_seconds``. A 404 means "no notice";
every IMDS error or timeout is logged (once per streak, not once per poll) and survived.
Each notice is handed to the one callback (the worker's drain path) once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from spotguard_core.contracts import RebalancePolicy, Signal, SignalKind, SignalSource

from spotguard_agent.imds import ImdsClient, ImdsError

LOG = logging.getLogger("spotguard.watcher")
#: A rebalance recommendation has no deadline; when the policy drains, assume a spot
#: warning's two minutes could follow at any moment.
REBALANCE_DRAIN_WINDOW = timedelta(minutes=2)
TERMINATED_LIFECYCLE_STATES = frozenset({"Terminated", "Terminating", "Terminating:Wait"})


def parse_imds_time(value: str) -> datetime:
    """IMDS times look like ``2026-11-24T22:50:00Z``."""
    return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC)


class Watcher:
    def __init__(
        self,
        imds: ImdsClient,
        on_signal: Callable[[Signal], None],
        *,
        instance_id: str | None = None,
        poll_seconds: float = 1.0,
        rebalance_policy: RebalancePolicy = RebalancePolicy.REPLACE,
    ) -> None:
        self.imds = imds
        self.on_signal = on_signal
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
        try:
            if self.instance_id is None:
                self.instance_id = self.imds.instance_id()
            for check in (self._spot, self._lifecycle, self._rebalance):
                signal = check()
                if signal is not None:
                    emitted.append(signal)
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
        for signal in emitted:
            try:
                self.on_signal(signal)
            except Exception:
                LOG.exception("drain callback failed for %s", signal.kind.value)
        return emitted

    def _signal(self, kind: SignalKind, deadline: datetime | None, state: str | None, **attrs: str) -> Signal:
        received = datetime.now(UTC)
        assert self.instance_id is not None
        self._signalled.add(kind)
        signal = Signal(
            instance_id=self.instance_id,
            kind=kind,
            source=SignalSource.IMDS,
            event_id=f"imds:{self.instance_id}:{kind.value}:{int(received.timestamp())}",
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
        try:
            deadline: datetime | None = parse_imds_time(str(document["time"]))
        except (KeyError, ValueError):
            LOG.warning("spot notice without a readable time: %s; assuming two minutes", document)
            deadline = datetime.now(UTC) + timedelta(minutes=2)
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
