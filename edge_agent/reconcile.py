"""Desired -> applied: decide, apply once, persist, then report.

The decision is a pure function (``decide``); the loop around it (``Reconciler``) takes
desired-state messages off the agent's desired topic, checks them with
``protocol.codec.decode`` and runs them one at a time on its own worker thread, so a
slow apply never blocks the MQTT network thread (and so its keepalive).

Rules, in the order the worker follows them:

* A payload that does not decode (garbage, oversized, unsupported ``schema_version``)
  or that names another device is logged and counted through ``RejectCounter`` under
  channel ``desired`` and dropped; it never reaches ``decide`` and never crashes.
* A payload whose signature does not verify (``verify``: unsigned, unknown key, altered,
  no key configured) is dropped the same way, before its generation is looked at, so a
  forged message can neither apply a policy nor move the generation. It is also
  recorded (``rejected``) and the current state is re-reported with a
  ``desired_rejected`` section, so the controller sees the attempt.
* A generation newer than the applied one is applied: the ``PolicyApplier`` checks and
  prepares the policy, the new state is written to ``state_dir`` (atomic + fsync) and
  only then is ``ReportedState`` published (QoS 1). The state write is the commit point:
  a generation whose write landed is never applied again, across restarts too.
* A generation at or below the applied one (or below the last failed one) is not applied
  again; the current state is re-reported, so a controller that lost track (broker
  restart, its own restart) sees ``observed_generation`` again.
* A failed apply is reported with its error and recorded as ``last_failure``; the applied
  generation does not move. The same generation is tried again if it is delivered again
  (the retained desired message is, after every reconnect): a failure may be transient.

What this module must not know: paho (it publishes through the ``BrokerClient`` seam)
and what a policy means (that is the applier's business).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

from edge_agent.clock import Clock
from edge_agent.state import AppliedState, FailedApply, StateError, StateStore
from protocol.codec import DEFAULT_MAX_BYTES, DecodeError, RejectCounter, decode, encode
from protocol.messages import ApplyOutcome, DesiredState, ReportedState
from protocol.mqtt import BrokerClient, InboundMessage, MqttError
from protocol.signing import SignatureError
from protocol.topics import DeviceChannel, Topics

logger = logging.getLogger(__name__)

MAX_ERROR_CHARS = 2000
"""``ReportedState.error`` is capped at this length by the wire contract."""
REJECTED_KEY = "desired_rejected"
"""Reported-policy section describing desired state dropped for its signature."""

Verify = Callable[[DesiredState], None]
"""Raises ``protocol.signing.SignatureError`` for a message the agent must not act on."""


# -- the pure decision --------------------------------------------------------------


@dataclass(frozen=True)
class Apply:
    """The desired generation is new: apply it."""

    generation: int


@dataclass(frozen=True)
class AlreadyApplied:
    """The desired generation is the one running: re-report, do not apply."""

    generation: int


@dataclass(frozen=True)
class Stale:
    """The desired generation is older than what was acted on: re-report, do not apply."""

    generation: int
    current_generation: int


Decision = Apply | AlreadyApplied | Stale


def decide(
    desired_generation: int, applied_generation: int, *, failed_generation: int | None = None
) -> Decision:
    """What to do with ``desired_generation`` given what is applied (and last failed).

    A failed generation may be retried (it is not applied), but anything older than it is
    stale: generations only ever grow, so an older one is a late duplicate.
    """
    if desired_generation == applied_generation:
        return AlreadyApplied(desired_generation)
    current = max(applied_generation, (failed_generation or 0) - 1)
    if desired_generation <= current:
        return Stale(desired_generation, max(applied_generation, failed_generation or 0))
    return Apply(desired_generation)


# -- the applier seam --------------------------------------------------------------


class PolicyError(Exception):
    """Permanent for this generation: the policy cannot be applied; the message says why."""


class PolicyApplier(Protocol):
    """Checks and prepares one desired policy; returns the document that becomes active.

    It may run again for a generation whose state write did not land (a crash between
    apply and commit), so it must be safe to repeat. It raises ``PolicyError`` to fail.
    """

    def apply(self, generation: int, policy: object) -> dict[str, Any]: ...


class JsonPolicyApplier:
    """The placeholder applier: any JSON object is a valid policy.

    ``{"fail": true}`` (or a non-object) fails on purpose, so the failure path can be
    exercised end to end until real policy and model application plug in here.
    """

    def apply(self, generation: int, policy: object) -> dict[str, Any]:
        if not isinstance(policy, dict):
            raise PolicyError(f"policy must be a JSON object, got {type(policy).__name__}")
        if policy.get("fail") is True:
            raise PolicyError(f"policy for generation {generation} asked to fail")
        return dict(policy)


# -- the loop ----------------------------------------------------------------------

_REPORT = object()
_PROGRESS = object()
_STOP = object()


class Reconciler:
    """Receives desired state, applies it in generation order and reports the result."""

    CHANNEL = "desired"

    def __init__(
        self,
        *,
        device_id: str,
        topics: Topics,
        store: StateStore,
        publisher: BrokerClient,
        boot_epoch: int,
        clock: Clock,
        applier: PolicyApplier,
        rejects: RejectCounter,
        max_bytes: int = DEFAULT_MAX_BYTES,
        on_applied: Callable[[int], None] | None = None,
        report_policy: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        verify: Verify | None = None,
    ) -> None:
        """``report_policy`` turns the applied policy into the reported one (the model
        installer puts its status there); ``verify`` checks signatures (None: none are
        checked - the agent always passes one)."""
        self._device_id = device_id
        self._verify = verify
        self._rejected: dict[str, Any] | None = None
        self._report_policy = report_policy
        self._reported_topic = topics.device(device_id, DeviceChannel.REPORTED)
        self._store = store
        self._publisher = publisher
        self._boot_epoch = boot_epoch
        self._clock = clock
        self._applier = applier
        self._rejects = rejects
        self._max_bytes = max_bytes
        self._on_applied = on_applied
        self._lock = threading.Lock()
        self._state = store.load_applied()
        self._applied: list[int] = []
        self._counts = {
            "applied": 0,
            "failed": 0,
            "already_applied": 0,
            "stale": 0,
            "reports_sent": 0,
            "report_errors": 0,
            "signature_rejected": 0,
        }
        self._queue: queue.Queue[object] = queue.Queue()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # -- inspection --------------------------------------------------------------------

    @property
    def state(self) -> AppliedState:
        with self._lock:
            return self._state

    @property
    def applied_generations(self) -> list[int]:
        """Generations applied by this process, in order (the once-only record)."""
        with self._lock:
            return list(self._applied)

    def counters(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="reconcile", daemon=True)
        self._thread.start()

    def stop(self, *, timeout_s: float = 10.0) -> None:
        """Finish the item in hand and stop; queued items are dropped (desired is retained)."""
        if self._thread is None:
            return
        self._stopping.set()
        self._queue.put(_STOP)  # wakes an idle worker
        self._thread.join(timeout=timeout_s)
        self._thread = None

    # -- inbound (any thread) ----------------------------------------------------------

    def on_message(self, msg: InboundMessage) -> None:
        """Handler for the desired topic: check the payload and queue it for the worker."""
        try:
            desired = decode(msg.payload, DesiredState, max_bytes=self._max_bytes)
        except DecodeError as exc:
            self._rejects.reject(self.CHANNEL, exc.reason, str(exc), topic=msg.topic)
            return
        if desired.device_id != self._device_id:
            self._rejects.reject(
                self.CHANNEL,
                "device_mismatch",
                f"message for {desired.device_id!r} on {self._device_id!r}'s topic",
                topic=msg.topic,
            )
            return
        if self._verify is not None:
            try:
                self._verify(desired)
            except SignatureError as exc:
                self._signature_rejected(desired, exc, msg.topic)
                return
        self._queue.put(desired)

    def _signature_rejected(self, desired: DesiredState, exc: SignatureError, topic: str) -> None:
        self._rejects.reject(self.CHANNEL, exc.reason, str(exc), topic=topic)
        logger.warning(
            "desired state rejected: %s",
            exc,
            extra={"generation": desired.generation, "reason": exc.reason},
        )
        with self._lock:
            self._counts["signature_rejected"] += 1
            self._rejected = {
                "count": self._counts["signature_rejected"],
                "generation": desired.generation,
                "reason": exc.reason,
                "error": str(exc)[:MAX_ERROR_CHARS],
                "at": self._clock.now().isoformat(),
            }
        self._queue.put(_PROGRESS)

    def request_report(self) -> None:
        """Queue a re-report of the current state (after every connect)."""
        self._queue.put(_REPORT)

    # -- the worker ----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP or self._stopping.is_set():
                return
            try:
                if item is _REPORT:
                    self.report_current()
                elif item is _PROGRESS:
                    self.report_progress()
                elif isinstance(item, DesiredState):
                    self.handle(item)
            except Exception:
                logger.exception("reconcile step failed")

    def handle(self, desired: DesiredState) -> Decision:
        """Decide, apply, persist and report one desired state (worker thread only)."""
        state = self.state
        failed = state.last_failure.generation if state.last_failure else None
        decision = decide(desired.generation, state.generation, failed_generation=failed)
        match decision:
            case Apply(generation):
                self._apply(generation, desired.policy, state)
            case AlreadyApplied():
                self._count("already_applied")
                self.report_current()
            case Stale(generation, current):
                self._count("stale")
                logger.info(
                    "stale desired generation ignored",
                    extra={"generation": generation, "current_generation": current},
                )
                self.report_current()
        return decision

    def _apply(self, generation: int, policy: object, state: AppliedState) -> None:
        try:
            active = self._applier.apply(generation, policy)
        except PolicyError as exc:
            self._fail(generation, str(exc), state)
            return
        new_state = AppliedState(generation=generation, policy=active, last_failure=None)
        try:
            self._store.save_applied(new_state)
        except StateError as exc:
            # Not committed: report the failure without moving the applied generation.
            self._count("failed")
            logger.error("applied state not persisted", extra={"generation": generation})
            self._report(generation, ApplyOutcome.FAILED, state.policy, str(exc))
            return
        with self._lock:
            self._state = new_state
            self._applied.append(generation)
            self._counts["applied"] += 1
        logger.info("desired generation applied", extra={"generation": generation})
        if self._on_applied is not None:
            self._on_applied(generation)
        self._report(generation, ApplyOutcome.APPLIED, active, None)

    def _fail(self, generation: int, error: str, state: AppliedState) -> None:
        error = error[:MAX_ERROR_CHARS]
        new_state = replace(state, last_failure=FailedApply(generation, error))
        try:
            self._store.save_applied(new_state)
        except StateError as exc:
            logger.error("failed apply not persisted: %s", exc, extra={"generation": generation})
        else:
            with self._lock:
                self._state = new_state
        self._count("failed")
        logger.warning(
            "desired generation failed", extra={"generation": generation, "error": error}
        )
        self._report(generation, ApplyOutcome.FAILED, state.policy, error)

    def report_current(self) -> None:
        """Publish the current state again; nothing when nothing was ever acted on."""
        state = self.state
        failure = state.last_failure
        if failure is not None and failure.generation > state.generation:
            self._report(failure.generation, ApplyOutcome.FAILED, state.policy, failure.error)
        elif state.generation > 0:
            self._report(state.generation, ApplyOutcome.APPLIED, state.policy, None)

    def report_progress(self) -> None:
        """Publish the current state with the latest status sections while an apply is in
        hand (any thread): ``observed_generation`` stays what was acted on before."""
        state = self.state
        failure = state.last_failure
        if failure is not None and failure.generation > state.generation:
            self._report(failure.generation, ApplyOutcome.FAILED, state.policy, failure.error)
        else:
            self._report(state.generation, ApplyOutcome.APPLIED, state.policy, None)

    def _report(
        self, generation: int, outcome: ApplyOutcome, policy: dict[str, Any], error: str | None
    ) -> None:
        if self._report_policy is not None:
            policy = self._report_policy(policy)
        with self._lock:
            rejected = self._rejected
        if rejected is not None:
            policy = {**policy, REJECTED_KEY: rejected}
        message = ReportedState(
            device_id=self._device_id,
            sent_at=self._clock.now(),
            observed_generation=generation,
            outcome=outcome,
            policy=policy,
            error=error,
            boot_epoch=self._boot_epoch,
        )
        spec = DeviceChannel.REPORTED.spec
        try:
            self._publisher.publish(
                self._reported_topic, encode(message), qos=spec.qos, retain=spec.retain
            )
        except MqttError as exc:
            # Not lost for good: the next connect re-reports the current state.
            self._count("report_errors")
            logger.warning("report not published: %s", exc, extra={"generation": generation})
            return
        self._count("reports_sent")

    def _count(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1
