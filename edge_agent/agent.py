"""The edge agent process: wires state, MQTT, reconcile and the periodic loops together.

``Agent.start()`` bumps the persisted boot epoch, opens one ``MqttClient`` (client id =
device id, persistent session, retained offline Will), subscribes to the device's desired
topic and starts the heartbeat and telemetry loops. After every CONNACK a connect hook
sends ``Hello``, a retained ``Presence(online)`` and re-reports the current state.
``Agent.stop()`` publishes ``Presence(offline, "shutdown")`` and disconnects cleanly.

With a model dir in the settings the agent also serves inference (``stack.ServingStack``:
HTTP and MQTT ingress, batching, offload, the outbox and its uplink); the stack is built
before the client starts so its subscriptions go out with every CONNACK, and it is
imported only then, so an agent without a model never loads numpy or a web framework.

Desired state is trusted only when signed by the controller (``operating.DesiredVerifier``,
keys from ``EdgeSettings.desired_keys()``); the operating policy it carries drives the
batcher, the offload policy and the telemetry interval from the moment its generation is
committed, and again after a restart (``operating.OperatingPolicy``).

An unreachable broker is not an error here: the client keeps retrying with backoff while
the device keeps its applied state and keeps serving; signals and process exit codes
belong to ``cli``. This module must not know the controller, the simulator or the CLI root.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from edge_agent import presence
from edge_agent.clock import Clock, SystemClock
from edge_agent.download import ChunkPuller, PullSettings
from edge_agent.hotswap import LoadedVariant, ModelSlots
from edge_agent.install import ModelInstaller, ModelPolicyApplier, default_load, file_keyring
from edge_agent.installed import InstallLedger
from edge_agent.operating import (
    DesiredVerifier,
    OperatingPolicy,
    OperatingPolicyApplier,
)
from edge_agent.periodic import PeriodicTask
from edge_agent.probe import HostProbe, SystemProbe, agent_version
from edge_agent.reconcile import JsonPolicyApplier, PolicyApplier, Reconciler
from edge_agent.runtime_policy import batcher_settings, runtime_offload
from edge_agent.settings import EdgeSettings
from edge_agent.state import AppliedState, StateStore
from edge_agent.telemetry import HeartbeatSender, TelemetrySender
from protocol.codec import RejectCounter, encode
from protocol.messages import RuntimeCapabilities
from protocol.mqtt import MqttClient, MqttError
from protocol.policy import Policy
from protocol.topics import DeviceChannel, Topics

if TYPE_CHECKING:
    from edge_agent.serving import ServingModel
    from edge_agent.stack import ServingStack

logger = logging.getLogger(__name__)

SHUTDOWN_PUBACK_WAIT_S = 3.0
"""How long a graceful stop waits for the broker to acknowledge the offline presence."""


@dataclass
class _Running:
    """Everything that exists only between ``start()`` and ``stop()``."""

    boot_epoch: int
    capabilities: RuntimeCapabilities
    agent_version: str
    client: MqttClient
    reconciler: Reconciler
    heartbeats: HeartbeatSender
    telemetry: TelemetrySender
    tasks: list[PeriodicTask]
    serving: ServingStack | None
    installer: ModelInstaller
    operating: OperatingPolicy


class AgentStateError(RuntimeError):
    """The agent was used out of order (stopped before start, started twice)."""


class ServingStartError(RuntimeError):
    """Local serving could not start (model, trusted key, HTTP port): permanent for this
    configuration; the message names the problem."""


class Agent:
    """One device's agent. ``start()`` once, ``stop()`` once."""

    def __init__(
        self,
        settings: EdgeSettings,
        *,
        clock: Clock | None = None,
        applier: PolicyApplier | None = None,
        probe: SystemProbe | None = None,
        on_applied: Callable[[int], None] | None = None,
        model: ServingModel | None = None,
    ) -> None:
        """``model`` replaces loading ``settings.model_variant`` (tests, benchmarks)."""
        self.settings = settings
        self._clock: Clock = clock or SystemClock()
        self._applier: PolicyApplier = applier or JsonPolicyApplier()
        self._probe = probe
        self._on_applied = on_applied
        self._model = model
        self._topics = Topics(settings.topic_root)
        self.rejects = RejectCounter()
        """Dropped inbound messages by (channel, reason)."""
        self._run: _Running | None = None
        self._stopped = False
        self._tasks_lock = threading.Lock()
        """Orders replacing the telemetry task (policy) against ``stop``."""

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Bump the boot epoch and go online (or keep trying to); returns at once."""
        if self._run is not None or self._stopped:
            raise AgentStateError("an Agent is started once; make a new one to restart")
        settings = self.settings
        device_id = settings.device_id
        store = StateStore(settings.state_dir)
        boot_epoch = store.next_boot_epoch()
        started = self._clock.monotonic()
        probe = self._probe or HostProbe()
        capabilities = probe.capabilities()
        will = presence.last_will(
            device_id, topics=self._topics, boot_epoch=boot_epoch, clock=self._clock
        )
        client = MqttClient(settings.mqtt(), will=will)
        installer = self._installer(store, client)
        operating = OperatingPolicy(settings)

        def applied(generation: int) -> None:
            operating.activate(reconciler.state.policy)
            if self._on_applied is not None:
                self._on_applied(generation)

        reconciler = Reconciler(
            device_id=device_id,
            topics=self._topics,
            store=store,
            publisher=client,
            boot_epoch=boot_epoch,
            clock=self._clock,
            applier=ModelPolicyApplier(installer, inner=OperatingPolicyApplier(self._applier)),
            rejects=self.rejects,
            on_applied=applied,
            report_policy=installer.reported_policy,
            verify=DesiredVerifier(
                settings.desired_keys(), allow_unsigned=settings.allow_unsigned_desired
            ),
        )
        installer.on_status = reconciler.report_progress
        serving: ServingStack | None = None
        if settings.serving:
            from edge_agent.serving import ServingError
            from edge_agent.stack import ServingStack

            installed = None if self._model is not None else installer.load_installed()
            try:
                serving = ServingStack(
                    settings,
                    client=client,
                    boot_epoch=boot_epoch,
                    clock=self._clock,
                    topics=self._topics,
                    rejects=self.rejects,
                    model=self._model or (installed.model if installed else None),
                )
            except ServingError as exc:
                raise ServingStartError(str(exc)) from exc
            installer.set_initial(
                installed
                or LoadedVariant(
                    serving.runtime.model,
                    record=None,
                    artifact_sha256=None if self._model else configured_sha256(settings),
                )
            )
            installer.slots.attach(serving.runtime.swap_model)
            serving.quality.policy = lambda: reconciler.state.policy  # quality_sample_share
        heartbeats = HeartbeatSender(
            device_id=device_id,
            topics=self._topics,
            publisher=client,
            boot_epoch=boot_epoch,
            clock=self._clock,
            started_monotonic=started,
        )
        telemetry = TelemetrySender(
            device_id=device_id,
            topics=self._topics,
            publisher=client,
            boot_epoch=boot_epoch,
            clock=self._clock,
            probe=probe,
            agent_metrics=self._telemetry_metrics,
        )
        tasks = [
            PeriodicTask(
                "heartbeat",
                heartbeats.beat,
                interval_s=settings.heartbeat_interval_s,
                clock=self._clock,
            ),
            PeriodicTask(
                "telemetry",
                telemetry.report,
                interval_s=settings.telemetry_interval_s,
                clock=self._clock,
            ),
        ]
        self._run = _Running(
            boot_epoch,
            capabilities,
            agent_version(),
            client,
            reconciler,
            heartbeats,
            telemetry,
            tasks,
            serving,
            installer,
            operating,
        )
        operating.add_consumer(self._take_policy)
        desired = DeviceChannel.DESIRED
        client.subscribe(
            self._topics.device(device_id, desired), reconciler.on_message, qos=desired.spec.qos
        )
        client.add_connect_hook(self._on_connect)
        reconciler.start()
        if serving is not None:
            from edge_agent.serving import ServingError

            try:
                serving.start()
            except BaseException as exc:
                serving.stop()
                reconciler.stop()
                if isinstance(exc, ServingError):
                    raise ServingStartError(str(exc)) from exc
                raise
        client.start()
        for task in tasks:
            task.start()
        operating.activate(reconciler.state.policy)  # what the last run committed
        logger.info(
            "agent started",
            extra={
                "device_id": device_id,
                "boot_epoch": boot_epoch,
                "applied_generation": reconciler.state.generation,
                "broker": f"{settings.mqtt_host}:{settings.mqtt_port}",
            },
        )

    def stop(self) -> None:
        """Stop the loops, say ``offline/shutdown`` (retained) and disconnect cleanly."""
        run = self._run
        if run is None or self._stopped:
            return
        with self._tasks_lock:
            self._stopped = True  # the run stays inspectable (counters, applied generations)
            tasks = list(run.tasks)
        for task in tasks:
            task.stop()
        run.installer.cancel.set()  # a download in hand stops; it resumes on the next start
        if run.serving is not None:
            run.serving.stop()
        run.reconciler.stop()

        def say_goodbye() -> None:
            message = presence.shutdown(
                self.settings.device_id, boot_epoch=run.boot_epoch, clock=self._clock
            )
            self._publish(
                run.client, DeviceChannel.STATUS, encode(message), wait_s=SHUTDOWN_PUBACK_WAIT_S
            )

        run.client.stop(before_disconnect=say_goodbye)
        logger.info("agent stopped", extra={"boot_epoch": run.boot_epoch})

    def run_forever(self, stop: threading.Event, *, poll_s: float = 0.5) -> None:
        """Start if needed, block until ``stop`` is set (signal handlers set it), then stop."""
        if self._run is None:
            self.start()
        try:
            while not stop.wait(poll_s):
                pass
        finally:
            self.stop()

    # -- inspection --------------------------------------------------------------------

    @property
    def boot_epoch(self) -> int:
        return self._running().boot_epoch

    @property
    def is_connected(self) -> bool:
        return self._run is not None and not self._stopped and self._run.client.is_connected

    def wait_connected(self, timeout_s: float) -> bool:
        return self._running().client.wait_connected(timeout_s)

    @property
    def serving(self) -> ServingStack | None:
        """The local inference stack; None when the agent has no model dir."""
        return self._running().serving

    @property
    def http_port(self) -> int | None:
        """The bound port of the HTTP ingress (None: not serving HTTP)."""
        serving = self._running().serving
        return None if serving is None else serving.http_port

    @property
    def models(self) -> ModelInstaller:
        """Model delivery: ``status``, ``revert()``, ``slots`` (active and previous)."""
        return self._running().installer

    @property
    def operating_policy(self) -> OperatingPolicy:
        """The operating policy in force (``current``) and where it came from (``sources``)."""
        return self._running().operating

    @property
    def applied_state(self) -> AppliedState:
        return self._running().reconciler.state

    @property
    def applied_generations(self) -> list[int]:
        """Generations this Agent applied, in order; never holds one twice."""
        return self._running().reconciler.applied_generations

    def counters(self) -> dict[str, int]:
        """Flat counters: heartbeats, telemetry, reconcile outcomes, rejects, connects."""
        run = self._running()
        counts: dict[str, int] = {
            "heartbeats_sent": run.heartbeats.sent,
            "heartbeats_skipped": run.heartbeats.skipped,
            "telemetry_sent": run.telemetry.sent,
            "telemetry_skipped": run.telemetry.skipped,
            "mqtt_connects": run.client.connects,
            "mqtt_handler_errors": run.client.handler_errors,
        }
        counts.update({f"desired_{k}": v for k, v in run.reconciler.counters().items()})
        rejected = 0
        for (channel, reason), count in sorted(self.rejects.snapshot().items()):
            counts[f"{channel}_rejected_{reason}"] = count
            rejected += count
        counts["rejected"] = rejected
        counts["policy_activations"] = run.operating.activations
        counts.update(run.installer.counters())
        if run.serving is not None:
            counts.update(run.serving.counters())
        return counts

    # -- internals ---------------------------------------------------------------------

    def _installer(self, store: StateStore, client: MqttClient) -> ModelInstaller:
        settings = self.settings
        ledger = InstallLedger(store.state_dir)
        puller = ChunkPuller(
            client=client,
            device_id=settings.device_id,
            topics=self._topics,
            staging_root=ledger.staging_dir,
            settings=PullSettings(
                chunk_bytes=settings.model_chunk_bytes,
                window=settings.model_chunk_window,
                timeout_s=settings.model_chunk_timeout_s,
                attempts=settings.model_chunk_attempts,
                fsync_bytes=settings.model_progress_fsync_bytes,
                listen_first_s=settings.model_listen_first_s,
            ),
            clock=self._clock,
            connected=lambda: client.is_connected,
        )
        puller.attach()
        key_file = settings.trusted_key_file
        if key_file is None and settings.model_dir is not None:
            key_file = settings.public_key_file()
        return ModelInstaller(
            puller=puller,
            ledger=ledger,
            slots=ModelSlots(),
            clock=self._clock,
            trusted_keys=file_keyring(key_file),
            load=default_load(settings.intra_op_threads),
            progress_interval_s=settings.model_progress_interval_s,
        )

    def _take_policy(self, policy: Policy) -> None:
        """Consumer of the operating policy (reconcile thread, or ``start``)."""
        run = self._running()
        if run.serving is not None:
            serving = run.serving
            serving.loop.call(
                serving.runtime.set_policy(
                    batcher_settings(policy.batching), runtime_offload(policy.offload)
                ),
                timeout_s=10,
            )
        self._set_telemetry_interval(run, policy.telemetry.interval_s)

    def _set_telemetry_interval(self, run: _Running, interval_s: float) -> None:
        """Replace the telemetry task when its interval changes (the old one is stopped)."""
        with self._tasks_lock:
            if self._stopped:
                return
            index = next(i for i, t in enumerate(run.tasks) if t.name == "telemetry")
            if run.tasks[index].interval_s == interval_s:
                return
            run.tasks[index].stop()
            task = PeriodicTask(
                "telemetry", run.telemetry.report, interval_s=interval_s, clock=self._clock
            )
            run.tasks[index] = task
            task.start()
        logger.info("telemetry interval changed", extra={"interval_s": interval_s})

    def _running(self) -> _Running:
        if self._run is None:
            raise AgentStateError("the agent was never started")
        return self._run

    def _telemetry_metrics(self) -> dict[str, float]:
        metrics = {f"{name}_total": float(value) for name, value in self.counters().items()}
        metrics["telemetry_interval_s"] = self._running().operating.current.telemetry.interval_s
        serving = self._running().serving
        if serving is not None:
            metrics.update(serving.telemetry())
        return metrics

    def _on_connect(self, session_present: bool) -> None:
        """Runs on the MQTT network thread after every CONNACK: must not wait for acks."""
        run = self._run
        if run is None or self._stopped:
            return
        device_id = self.settings.device_id
        hello = presence.hello(
            self.settings,
            capabilities=run.capabilities,
            agent_version=run.agent_version,
            boot_epoch=run.boot_epoch,
            clock=self._clock,
        )
        self._publish(run.client, DeviceChannel.HELLO, encode(hello))
        online = presence.online(device_id, boot_epoch=run.boot_epoch, clock=self._clock)
        self._publish(run.client, DeviceChannel.STATUS, encode(online))
        run.reconciler.request_report()

    def _publish(
        self,
        client: MqttClient,
        channel: DeviceChannel,
        payload: bytes,
        *,
        wait_s: float | None = None,
    ) -> None:
        spec = channel.spec
        topic = self._topics.device(self.settings.device_id, channel)
        try:
            client.publish(topic, payload, qos=spec.qos, retain=spec.retain, wait_s=wait_s)
        except MqttError as exc:
            logger.warning("%s not published: %s", channel.value, exc)


def configured_sha256(settings: EdgeSettings) -> str | None:
    """The artifact digest named by the configured variant's manifest (None: unreadable)."""
    try:
        raw = json.loads((settings.variant_dir() / "manifest.json").read_bytes())
        sha = raw["manifest"]["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return sha if isinstance(sha, str) else None
