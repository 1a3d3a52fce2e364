"""Rollouts, the moving part: a background loop that advances every unfinished rollout.

All of a rollout's state is in its tables (``rollout_entities``); one ``step()`` reads it,
the devices' reported state and telemetry, decides with the pure functions of
``rollouts``, and writes back. Nothing is kept in memory between steps, so a controller
restarted mid-wave picks every unfinished rollout up from its persisted wave at its
first step. Time comes from the controller's clock seam, so tests move waves along with
a ``ManualClock``; the loop's own period (``rollout_tick_s``) is wall time.

One step of a running rollout::

    wave pending     -> assign its devices (previous ``model`` section recorded first,
                        then the new assignment published as the next desired generation)
    wave installing  -> each device: reported active on the new artifact | failed |
                        timed out (install_timeout_s); all settled -> observing
    wave observing   -> after interval_s: gates -> pass: next wave (or completed)
                                                 | fail: rolling_back (or paused)
                                                 | pending past gate_timeout_s: paused
    rolling_back     -> every updated device gets its previous ``model`` section again;
                        confirmed when it reports the previous artifact active

Errors (``RolloutError``, mapped to HTTP statuses in ``app.py``)::

    RolloutError              base; ``status_code`` and a one-line message
    ├── RolloutNotFound       404: no rollout with that id
    ├── RolloutConflict       409: the state forbids it (already finished, devices busy,
    │                         version not ready)
    └── RolloutInvalid        422: the request cannot be planned (no device matches)
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from cloud_controller import audit, registry
from cloud_controller.assignments import model_section
from cloud_controller.bridge import Bridge
from cloud_controller.clock import Clock
from cloud_controller.entities import (
    Device,
    DeviceDesired,
    DeviceLabel,
    DeviceReported,
    TelemetrySample,
    VersionState,
)
from cloud_controller.errors import ControllerError, DesiredNotPublished, DeviceNotFound
from cloud_controller.rollout_entities import (
    ACTIVE_STATES,
    UPDATED_STATES,
    Rollout,
    RolloutCreate,
    RolloutDevice,
    RolloutDevicePublic,
    RolloutDeviceState,
    RolloutPublic,
    RolloutState,
    RolloutSummary,
    RolloutWave,
    RolloutWavePublic,
    WaveState,
)
from cloud_controller.rollouts import (
    Chosen,
    DeviceFacts,
    DeviceSignals,
    GateAction,
    GateReport,
    GateThresholds,
    VariantOption,
    VariantRule,
    Verdict,
    WaveConfig,
    choose_variant,
    evaluate_gates,
    plan_waves,
)
from cloud_controller.settings import CloudSettings
from protocol.messages import MODEL_POLICY_KEY, QUALITY_SAMPLE_SHARE_KEY, ApplyOutcome

logger = logging.getLogger(__name__)

ENGINE_ACTOR = "rollout-engine"
"""The audit log's actor of the transitions the engine makes on its own."""

DevState = RolloutDeviceState


class RolloutError(ControllerError):
    status_code = 400


class RolloutNotFound(RolloutError, LookupError):
    status_code = 404

    def __init__(self, rollout_id: int) -> None:
        super().__init__(f"rollout {rollout_id} not found")


class RolloutConflict(RolloutError):
    status_code = 409


class RolloutInvalid(RolloutError):
    status_code = 422


# -- reading the devices' word ------------------------------------------------------------


def install_outcome(
    reported: DeviceReported | None, *, generation: int, artifact_sha256: str | None
) -> tuple[DevState, str | None] | None:
    """What a device's report says of the assignment published as ``generation``:
    ``(ACTIVE, None)``, ``(FAILED, why)`` or None (not there yet). ``artifact_sha256``
    None: the assignment removed the model key; any applied report confirms it."""
    if reported is None or reported.observed_generation < generation:
        return None
    section = (reported.policy or {}).get(MODEL_POLICY_KEY) or {}
    if reported.outcome == ApplyOutcome.FAILED and reported.observed_generation == generation:
        return DevState.FAILED, reported.error or section.get("reason") or "install failed"
    if artifact_sha256 is None:
        return (DevState.ACTIVE, None) if reported.outcome == ApplyOutcome.APPLIED else None
    if section.get("artifact_sha256") == artifact_sha256:
        if section.get("state") == "active":
            return DevState.ACTIVE, None
        if section.get("state") == "failed":
            return DevState.FAILED, section.get("reason") or "install failed"
    return None


def _previous_of(policy: dict[str, Any]) -> dict[str, Any]:
    return {
        MODEL_POLICY_KEY: policy.get(MODEL_POLICY_KEY),
        QUALITY_SAMPLE_SHARE_KEY: policy.get(QUALITY_SAMPLE_SHARE_KEY),
    }


def _restore(current: dict[str, Any], previous: dict[str, Any]) -> dict[str, Any]:
    policy = dict(current)
    for key in (MODEL_POLICY_KEY, QUALITY_SAMPLE_SHARE_KEY):
        if previous.get(key) is None:
            policy.pop(key, None)
        else:
            policy[key] = previous[key]
    return policy


class RolloutEngine:
    """Creates rollouts, takes operators' commands and advances them; thread-safe."""

    def __init__(
        self, *, settings: CloudSettings, engine: Engine, bridge: Bridge, clock: Clock
    ) -> None:
        self._settings = settings
        self._engine = engine
        self._bridge = bridge
        self._clock = clock
        self._rule = VariantRule(
            memory_share=settings.rollout_memory_share,
            memory_overhead=settings.rollout_memory_overhead,
        )
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.steps = 0

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Run ``step()`` every ``rollout_tick_s``; unfinished rollouts go on from the
        database at the first step."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="rollouts", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self._settings.rollout_tick_s):
            try:
                self.step()
            except Exception:  # the database may be away; the next tick tries again
                logger.exception("rollout step failed")

    # -- commands --------------------------------------------------------------------------

    def create(self, body: RolloutCreate) -> RolloutPublic:
        """Plan and store a rollout (``pending``); the engine starts it at its next step."""
        now = self._clock()
        with self._lock, Session(self._engine) as session:
            version = registry.get_version(session, body.model, body.version)
            if version.state != VersionState.READY:
                raise RolloutConflict(f"{body.model}@{body.version} is {version.state}, not ready")
            devices = self._targets(session, body)
            busy = session.exec(
                select(RolloutDevice.device_id, Rollout.id)
                .join(Rollout, col(Rollout.id) == col(RolloutDevice.rollout_id))
                .where(
                    col(Rollout.state).in_([s.value for s in ACTIVE_STATES]),
                    col(RolloutDevice.device_id).in_([d.id for d in devices]),
                )
            ).all()
            if busy:
                taken = ", ".join(f"{d} (rollout {r})" for d, r in busy[:5])
                raise RolloutConflict(f"devices already in an unfinished rollout: {taken}")
            options = [
                VariantOption(v.variant, v.precision, v.runtime, v.size_bytes)
                for v in version.variants
            ]
            shas = {v.variant: v.artifact_sha256 for v in version.variants}
            chosen: dict[str, str] = {}
            skipped: dict[str, str] = {}
            for device in devices:
                facts = DeviceFacts.from_capabilities(
                    device.id, device.hardware_class, device.capabilities
                )
                pick = choose_variant(
                    options, facts, self._rule, pinned=body.variants.get(device.hardware_class)
                )
                if isinstance(pick, Chosen):
                    chosen[device.id] = pick.variant
                else:
                    skipped[device.id] = pick.reason
            if not chosen:
                reasons = "; ".join(sorted(set(skipped.values())))
                raise RolloutInvalid(
                    f"no target device can run {body.model}@{body.version}: {reasons}"
                )
            classes = {d.id: d.hardware_class for d in devices}
            waves = plan_waves(((d, classes[d]) for d in chosen), body.waves)
            rollout = Rollout(
                model_name=body.model,
                version=body.version,
                state=RolloutState.PENDING,
                target=body.target.model_dump(mode="json"),
                waves_config=body.waves.model_dump(mode="json"),
                gates=body.gates.model_dump(mode="json"),
                on_gate_failure=body.on_gate_failure,
                quality_sample_share=body.quality_sample_share,
                created_at=now,
                updated_at=now,
            )
            session.add(rollout)
            session.flush()
            assert rollout.id is not None
            for index, members in enumerate(waves):
                session.add(
                    RolloutWave(
                        rollout_id=rollout.id,
                        index=index,
                        canary=index == 0 and body.waves.canary_share > 0,
                        state=WaveState.PENDING,
                    )
                )
                for device_id in members:
                    variant = chosen[device_id]
                    session.add(
                        RolloutDevice(
                            rollout_id=rollout.id,
                            device_id=device_id,
                            wave=index,
                            hardware_class=classes[device_id],
                            variant=variant,
                            artifact_sha256=shas[variant],
                            state=DevState.PENDING,
                            updated_at=now,
                        )
                    )
            for device_id, reason in skipped.items():
                session.add(
                    RolloutDevice(
                        rollout_id=rollout.id,
                        device_id=device_id,
                        wave=-1,
                        hardware_class=classes[device_id],
                        state=DevState.SKIPPED,
                        reason=reason,
                        updated_at=now,
                    )
                )
            session.commit()
            logger.info(
                "rollout created",
                extra={
                    "rollout": rollout.id,
                    "model": body.model,
                    "version": body.version,
                    "devices": len(chosen),
                    "waves": len(waves),
                },
            )
            return self._public(session, rollout)

    def _targets(self, session: Session, body: RolloutCreate) -> list[Device]:
        target = body.target
        query = select(Device)
        if target.hardware_classes:
            query = query.where(col(Device.hardware_class).in_(target.hardware_classes))
        if target.device_ids:
            known = set(
                session.exec(select(Device.id).where(col(Device.id).in_(target.device_ids))).all()
            )
            unknown = [d for d in target.device_ids if d not in known]
            if unknown:
                raise DeviceNotFound(unknown[0])
            query = query.where(col(Device.id).in_(target.device_ids))
        for key, value in target.labels.items():
            query = query.where(
                col(Device.id).in_(
                    select(DeviceLabel.device_id).where(
                        col(DeviceLabel.key) == key, col(DeviceLabel.value) == value
                    )
                )
            )
        devices = list(session.exec(query.order_by(col(Device.id))).all())
        if not devices:
            raise RolloutInvalid("no registered device matches the target")
        return devices

    def pause(self, rollout_id: int) -> RolloutPublic:
        return self._command(
            rollout_id,
            allowed={RolloutState.PENDING, RolloutState.RUNNING},
            to=RolloutState.PAUSED,
            reason="paused by an operator",
        )

    def resume(self, rollout_id: int) -> RolloutPublic:
        return self._command(rollout_id, allowed={RolloutState.PAUSED}, to=RolloutState.RUNNING)

    def abort(self, rollout_id: int) -> RolloutPublic:
        return self._command(
            rollout_id,
            allowed={RolloutState.PENDING, RolloutState.RUNNING, RolloutState.PAUSED},
            to=RolloutState.ROLLING_BACK,
            reason="aborted by an operator",
        )

    def _command(
        self,
        rollout_id: int,
        *,
        allowed: set[RolloutState],
        to: RolloutState,
        reason: str | None = None,
    ) -> RolloutPublic:
        now = self._clock()
        with self._lock, Session(self._engine) as session:
            rollout = self._get(session, rollout_id)
            if rollout.state not in allowed:
                raise RolloutConflict(
                    f"rollout {rollout_id} is {rollout.state}; cannot go {to.value} from there"
                )
            if to is RolloutState.RUNNING:
                self._on_resume(session, rollout, now)
                reason = None
            if to is RolloutState.ROLLING_BACK:
                rollout.final_state = RolloutState.ABORTED
            rollout.state = to
            rollout.reason = reason
            rollout.updated_at = now
            session.add(rollout)
            session.commit()
            logger.info("rollout %s", to.value, extra={"rollout": rollout_id, "reason": reason})
            return self._public(session, rollout)

    def _on_resume(self, session: Session, rollout: Rollout, now: datetime) -> None:
        """A failed wave is accepted by the operator; a wave whose gates stalled gets a
        fresh observation window."""
        wave = self._wave(session, rollout)
        if wave is None:
            return
        if wave.state == WaveState.FAILED:
            wave.state = WaveState.OVERRIDDEN
        elif wave.state == WaveState.OBSERVING:
            wave.settled_at = now
        session.add(wave)

    # -- reads -----------------------------------------------------------------------------

    def get(self, rollout_id: int) -> RolloutPublic:
        with Session(self._engine) as session:
            return self._public(session, self._get(session, rollout_id))

    def list_rollouts(
        self, *, state: RolloutState | None, page: int, page_size: int
    ) -> tuple[list[RolloutSummary], int]:
        with Session(self._engine) as session:
            where = [] if state is None else [col(Rollout.state) == state.value]
            total = session.exec(select(sa.func.count()).select_from(Rollout).where(*where)).one()
            rows = session.exec(
                select(Rollout)
                .where(*where)
                .order_by(col(Rollout.id).desc())
                .offset((page - 1) * page_size)
                .limit(page_size)
            ).all()
            return [self._summary(session, r) for r in rows], int(total)

    def _get(self, session: Session, rollout_id: int) -> Rollout:
        rollout = session.get(Rollout, rollout_id)
        if rollout is None:
            raise RolloutNotFound(rollout_id)
        return rollout

    def _devices(self, session: Session, rollout_id: int) -> list[RolloutDevice]:
        return list(
            session.exec(
                select(RolloutDevice)
                .where(col(RolloutDevice.rollout_id) == rollout_id)
                .order_by(col(RolloutDevice.wave), col(RolloutDevice.device_id))
            ).all()
        )

    def _waves(self, session: Session, rollout_id: int) -> list[RolloutWave]:
        return list(
            session.exec(
                select(RolloutWave)
                .where(col(RolloutWave.rollout_id) == rollout_id)
                .order_by(col(RolloutWave.index))
            ).all()
        )

    def _wave(self, session: Session, rollout: Rollout) -> RolloutWave | None:
        if rollout.current_wave < 0:
            return None
        return session.get(RolloutWave, (rollout.id, rollout.current_wave))

    def _summary(
        self, session: Session, rollout: Rollout, devices: list[RolloutDevice] | None = None
    ) -> RolloutSummary:
        assert rollout.id is not None
        devices = devices if devices is not None else self._devices(session, rollout.id)
        planned = [d for d in devices if d.state != DevState.SKIPPED]
        done_state = (
            DevState.ROLLED_BACK
            if rollout.state in (RolloutState.ROLLING_BACK, RolloutState.ROLLED_BACK)
            or rollout.final_state is not None
            else DevState.ACTIVE
        )
        waves_total = session.exec(
            select(sa.func.count())
            .select_from(RolloutWave)
            .where(col(RolloutWave.rollout_id) == rollout.id)
        ).one()
        return RolloutSummary(
            id=rollout.id,
            model=rollout.model_name,
            version=rollout.version,
            state=RolloutState(rollout.state),
            current_wave=rollout.current_wave,
            waves_total=int(waves_total),
            devices_total=len(planned),
            devices_done=sum(1 for d in planned if d.state == done_state),
            reason=rollout.reason,
            created_at=rollout.created_at,
            updated_at=rollout.updated_at,
            finished_at=rollout.finished_at,
        )

    def _public(self, session: Session, rollout: Rollout) -> RolloutPublic:
        assert rollout.id is not None
        devices = self._devices(session, rollout.id)
        waves = self._waves(session, rollout.id)
        summary = self._summary(session, rollout, devices)
        per_wave: dict[int, int] = {}
        for d in devices:
            per_wave[d.wave] = per_wave.get(d.wave, 0) + 1
        return RolloutPublic(
            **summary.model_dump(),
            target=rollout.target,
            waves_config=rollout.waves_config,
            gates=rollout.gates,
            on_gate_failure=GateAction(rollout.on_gate_failure),
            quality_sample_share=rollout.quality_sample_share,
            waves=[
                RolloutWavePublic(
                    index=w.index,
                    canary=w.canary,
                    state=WaveState(w.state),
                    devices=per_wave.get(w.index, 0),
                    started_at=w.started_at,
                    settled_at=w.settled_at,
                    evaluated_at=w.evaluated_at,
                    gate_verdict=w.gate_verdict,
                    gate_results=list(w.gate_results or []),
                )
                for w in waves
            ],
            devices=[
                RolloutDevicePublic(
                    device_id=d.device_id,
                    wave=d.wave,
                    hardware_class=d.hardware_class,
                    variant=d.variant,
                    state=DevState(d.state),
                    previous_version=((d.previous or {}).get(MODEL_POLICY_KEY) or {}).get(
                        "version"
                    ),
                    previous_variant=((d.previous or {}).get(MODEL_POLICY_KEY) or {}).get(
                        "variant"
                    ),
                    generation=d.generation,
                    activated_at=d.activated_at,
                    reason=d.reason,
                )
                for d in devices
            ],
        )

    # -- the step ----------------------------------------------------------------------------

    def step(self) -> None:
        """Advance every unfinished, unpaused rollout by what the database says now."""
        with self._lock:
            with Session(self._engine) as session:
                ids = session.exec(
                    select(Rollout.id)
                    .where(
                        col(Rollout.state).in_(
                            [
                                RolloutState.PENDING.value,
                                RolloutState.RUNNING.value,
                                RolloutState.ROLLING_BACK.value,
                            ]
                        )
                    )
                    .order_by(col(Rollout.id))
                ).all()
            for rollout_id in ids:
                assert rollout_id is not None
                with Session(self._engine) as session:
                    rollout = self._get(session, rollout_id)
                    if rollout.state == RolloutState.ROLLING_BACK:
                        self._roll_back(session, rollout)
                    else:
                        self._advance(session, rollout)
            self.steps += 1

    def _touch(self, session: Session, rollout: Rollout, **changes: Any) -> None:
        """Change the rollout and commit; a change of state or wave is audited with it."""
        for key, value in changes.items():
            setattr(rollout, key, value)
        rollout.updated_at = self._clock()
        session.add(rollout)
        if "state" in changes or "current_wave" in changes:
            self._audit(session, rollout, f"rollout.{rollout.state}", wave=rollout.current_wave)
        session.commit()

    def _audit(self, session: Session, rollout: Rollout, action: str, **detail: Any) -> None:
        """An audit row for a transition the engine made on its own (committed with it)."""
        assert rollout.id is not None
        if rollout.reason:
            detail.setdefault("reason", rollout.reason)
        audit.record(
            session,
            ENGINE_ACTOR,
            action,
            "rollout",
            rollout.id,
            audit.Outcome.SUCCESS,
            detail,
            now=self._clock(),
        )

    def _advance(self, session: Session, rollout: Rollout) -> None:
        assert rollout.id is not None
        now = self._clock()
        config = WaveConfig.model_validate(rollout.waves_config)
        if rollout.state == RolloutState.PENDING:
            self._touch(session, rollout, state=RolloutState.RUNNING)
        wave = self._wave(session, rollout)
        if wave is None or wave.state in (WaveState.PASSED, WaveState.OVERRIDDEN):
            following = session.get(RolloutWave, (rollout.id, rollout.current_wave + 1))
            if following is None:
                self._touch(session, rollout, state=RolloutState.COMPLETED, finished_at=now)
                logger.info("rollout completed", extra={"rollout": rollout.id})
                return
            following.state = WaveState.INSTALLING
            following.started_at = now
            session.add(following)
            self._touch(session, rollout, current_wave=following.index)
            logger.info(
                "rollout wave started", extra={"rollout": rollout.id, "wave": following.index}
            )
            wave = following
        members = [d for d in self._devices(session, rollout.id) if d.wave == wave.index]
        if wave.state == WaveState.INSTALLING:
            self._record_previous(session, [d for d in members if d.state == DevState.PENDING], now)
            # The devices' changes are written once, after the assignments are sent: flushing
            # them earlier would hold the database's write lock while the bridge commits the
            # assignments in its own transaction (SQLite has one writer).
            with session.no_autoflush:
                unsent = [d for d in members if not self._install_step(session, d, config, now)]
                self._send_assignments(session, rollout, unsent, now)
            session.commit()  # one transaction for the wave's step, not one per device
            if all(d.state in (DevState.ACTIVE, DevState.FAILED) for d in members):
                wave.state = WaveState.OBSERVING
                wave.settled_at = now
                session.add(wave)
                session.commit()
                failed = sum(1 for d in members if d.state == DevState.FAILED)
                limit = GateThresholds.model_validate(rollout.gates).max_install_failure_rate
                if limit is not None and failed / len(members) > limit:
                    self._judge(session, rollout, wave, members, now, early=True)
            return
        if wave.state == WaveState.OBSERVING:
            assert wave.settled_at is not None
            if now < wave.settled_at + timedelta(seconds=config.interval_s):
                return
            self._judge(session, rollout, wave, members, now)

    def _judge(
        self,
        session: Session,
        rollout: Rollout,
        wave: RolloutWave,
        members: list[RolloutDevice],
        now: datetime,
        *,
        early: bool = False,
    ) -> None:
        config = WaveConfig.model_validate(rollout.waves_config)
        report = evaluate_gates(
            [self._signals(session, d) for d in members],
            GateThresholds.model_validate(rollout.gates),
        )
        wave.evaluated_at = now
        wave.gate_verdict = report.verdict.value
        wave.gate_results = [r.as_json() for r in report.results]
        if report.verdict is Verdict.PASS:
            wave.state = WaveState.PASSED
            session.add(wave)
            self._audit(session, rollout, "rollout.wave_passed", wave=wave.index)
            session.commit()
            logger.info("rollout wave passed", extra={"rollout": rollout.id, "wave": wave.index})
            return
        if report.verdict is Verdict.FAIL:
            wave.state = WaveState.FAILED
            session.add(wave)
            self._audit(
                session, rollout, "rollout.wave_failed", wave=wave.index, gates=wave.gate_results
            )
            session.commit()
            self._gate_failed(session, rollout, wave, report)
            return
        session.add(wave)
        session.commit()
        assert wave.settled_at is not None
        deadline = wave.settled_at + timedelta(seconds=config.interval_s + config.gate_timeout_s)
        if not early and now >= deadline:
            self._touch(
                session,
                rollout,
                state=RolloutState.PAUSED,
                reason=f"wave {wave.index} gates not evaluable: {report.summary()}",
            )
            logger.warning("rollout paused: gates not evaluable", extra={"rollout": rollout.id})

    def _gate_failed(
        self, session: Session, rollout: Rollout, wave: RolloutWave, report: GateReport
    ) -> None:
        reason = f"wave {wave.index} failed its gates: {report.summary()}"
        if GateAction(rollout.on_gate_failure) is GateAction.PAUSE:
            self._touch(session, rollout, state=RolloutState.PAUSED, reason=reason)
        else:
            self._touch(
                session,
                rollout,
                state=RolloutState.ROLLING_BACK,
                final_state=RolloutState.ROLLED_BACK,
                reason=reason,
            )
        logger.warning(
            "rollout gate failed",
            extra={"rollout": rollout.id, "wave": wave.index, "reason": reason},
        )

    def _signals(self, session: Session, device: RolloutDevice) -> DeviceSignals:
        installed = device.state == DevState.ACTIVE
        metrics = None
        if installed and device.activated_at is not None:
            sample = session.exec(
                select(TelemetrySample)
                .where(
                    col(TelemetrySample.device_id) == device.device_id,
                    col(TelemetrySample.received_at) >= device.activated_at,
                )
                .order_by(col(TelemetrySample.id).desc())
                .limit(1)
            ).first()
            metrics = dict(sample.metrics) if sample is not None else None
        return DeviceSignals(
            device.device_id,
            installed=installed,
            install_failed=device.state == DevState.FAILED,
            metrics=metrics,
        )

    def _install_step(
        self, session: Session, device: RolloutDevice, config: WaveConfig, now: datetime
    ) -> bool:
        """One device's next install step; False: it still has to be sent its assignment.
        The caller commits (after the whole wave)."""
        if device.state == DevState.ASSIGNING:
            # Safe to repeat: a device left ``assigning`` by a crash may have been sent it.
            desired = session.get(DeviceDesired, device.device_id)
            current = ((desired.policy if desired else {}) or {}).get(MODEL_POLICY_KEY) or {}
            if desired is None or current.get("artifact_sha256") != device.artifact_sha256:
                return False
            self._assigned(session, device, desired.generation, now)
            return True
        if device.state != DevState.INSTALLING or device.generation is None:
            return True
        outcome = install_outcome(
            session.get(DeviceReported, device.device_id),
            generation=device.generation,
            artifact_sha256=device.artifact_sha256,
        )
        if outcome is not None:
            device.state, device.reason = outcome
            if outcome[0] == DevState.ACTIVE:
                device.activated_at = now
        elif now >= device.updated_at + timedelta(seconds=config.install_timeout_s):
            device.state = DevState.FAILED
            device.reason = f"no install report within {config.install_timeout_s:g}s"
        else:
            return True
        device.updated_at = now
        session.add(device)
        return True

    def _record_previous(
        self, session: Session, devices: list[RolloutDevice], now: datetime
    ) -> None:
        """Keep each device's current assignment for a rollback, committed before any of
        them is sent the new one (one transaction for all)."""
        if not devices:
            return
        for device in devices:
            desired = session.get(DeviceDesired, device.device_id)
            device.previous = _previous_of(dict(desired.policy) if desired else {})
            device.state = DevState.ASSIGNING
            device.updated_at = now
            session.add(device)
        session.commit()

    def _send_assignments(
        self, session: Session, rollout: Rollout, devices: list[RolloutDevice], now: datetime
    ) -> None:
        """Send each device (previous assignment recorded) the new one: per variant, one
        transaction for all of them in the bridge, then a signed message each."""
        by_variant: dict[str, list[RolloutDevice]] = {}
        for device in devices:
            assert device.variant is not None
            by_variant.setdefault(device.variant, []).append(device)
        share = rollout.quality_sample_share
        for variant, group in by_variant.items():
            section = model_section(
                rollout.model_name,
                rollout.version,
                registry.resolve_variant(session, rollout.model_name, rollout.version, variant),
            )

            def change(
                current: dict[str, Any], section: dict[str, Any] = section
            ) -> dict[str, Any]:
                return {**current, MODEL_POLICY_KEY: section, QUALITY_SAMPLE_SHARE_KEY: share}

            sent = self._bridge.amend_desired_many([d.device_id for d in group], change)
            for device in group:
                generation = self._generation(session, device, sent[device.device_id], now)
                if generation is not None:
                    self._assigned(session, device, generation, now)

    def _generation(
        self,
        session: Session,
        device: RolloutDevice,
        result: int | ControllerError,
        now: datetime,
    ) -> int | None:
        """The generation a device was sent (stored but not yet published counts: it is
        republished on the next connect); None, with the device failed, when it is gone."""
        if isinstance(result, DesiredNotPublished):
            logger.warning("rollout assignment not yet published", extra={"detail": str(result)})
            return result.generation
        if isinstance(result, int):
            return result
        device.state = DevState.FAILED
        device.reason = str(result)
        device.updated_at = now
        session.add(device)
        return None

    def _assigned(
        self, session: Session, device: RolloutDevice, generation: int, now: datetime
    ) -> None:
        device.generation = generation
        device.state = DevState.INSTALLING
        device.updated_at = now
        session.add(device)

    def _publish(
        self,
        session: Session,
        device: RolloutDevice,
        change: Any,
        now: datetime,
    ) -> int | None:
        sent = self._bridge.amend_desired_many([device.device_id], change)
        generation = self._generation(session, device, sent[device.device_id], now)
        if generation is None:
            session.commit()
        return generation

    # -- rollback ------------------------------------------------------------------------------

    def _roll_back(self, session: Session, rollout: Rollout) -> None:
        assert rollout.id is not None
        now = self._clock()
        config = WaveConfig.model_validate(rollout.waves_config)
        devices = self._devices(session, rollout.id)
        for device in devices:
            if device.state in UPDATED_STATES:
                previous = device.previous or {}

                def change(
                    current: dict[str, Any], previous: dict[str, Any] = previous
                ) -> dict[str, Any]:
                    return _restore(current, previous)

                generation = self._publish(session, device, change, now)
                if generation is None:
                    continue
                device.generation = generation
                device.state = DevState.ROLLING_BACK
                device.reason = None
                device.updated_at = now
                session.add(device)
                session.commit()
            elif device.state == DevState.ROLLING_BACK and device.generation is not None:
                previous_sha = ((device.previous or {}).get(MODEL_POLICY_KEY) or {}).get(
                    "artifact_sha256"
                )
                outcome = install_outcome(
                    session.get(DeviceReported, device.device_id),
                    generation=device.generation,
                    artifact_sha256=previous_sha,
                )
                if outcome is not None and outcome[0] == DevState.ACTIVE:
                    device.state = DevState.ROLLED_BACK
                    if previous_sha is None:
                        device.reason = (
                            "no previous assignment: the model key was removed and the "
                            "device keeps its current model until it is assigned one"
                        )
                elif outcome is not None:
                    device.reason = f"previous version failed to install: {outcome[1]}"
                    device.state = DevState.ROLLBACK_UNCONFIRMED
                elif now >= device.updated_at + timedelta(seconds=config.install_timeout_s):
                    device.state = DevState.ROLLBACK_UNCONFIRMED
                    device.reason = f"no report within {config.install_timeout_s:g}s"
                else:
                    continue
                device.updated_at = now
                session.add(device)
                session.commit()
        if all(d.state not in UPDATED_STATES | {DevState.ROLLING_BACK} for d in devices):
            final = rollout.final_state or RolloutState.ROLLED_BACK
            self._touch(session, rollout, state=final, finished_at=now)
            logger.info("rollout %s", final, extra={"rollout": rollout.id})
