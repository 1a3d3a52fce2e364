"""``spillway pool ...``: run the overflow pool, one of its replicas, or render its manifests.

``serve`` builds ``PoolSettings`` (options override ``SPILLWAY_POOL_*``), configures JSON
logs, runs the start-up checks (a failure prints ``spillway pool: <problem>`` and exits 2),
then supervises the replicas until SIGTERM/SIGINT. torch is imported only by the replica
processes, never by the supervisor.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any, NoReturn

import typer

from cloud_controller.pool.settings import PoolSettings
from spillway.logs import configure_json_logging
from spillway.preflight import (
    EXIT_PREFLIGHT,
    Check,
    PreflightError,
    mqtt_tls_files_readable,
    packages_present,
    run_checks,
    settings_from,
    tcp_reachable,
)

pool_app = typer.Typer(
    help="The cloud overflow pool: tensor-parallel MiniLM replicas behind the broker.",
    no_args_is_help=True,
    add_completion=False,
)


def _fail(problem: str) -> NoReturn:
    typer.echo(f"spillway pool: {problem}", err=True)
    raise typer.Exit(code=EXIT_PREFLIGHT)


def build_settings(**overrides: Any) -> PoolSettings:
    """Settings from the environment with the given options on top; one line on error."""
    return settings_from(PoolSettings, overrides)


def tp_size_fits(tp: int) -> Check:
    def check() -> None:
        from models.checkpoint import CheckpointNotFoundError, EncoderConfig, checkpoint_dir

        try:
            config = EncoderConfig.from_checkpoint(checkpoint_dir())
        except CheckpointNotFoundError as exc:
            raise PreflightError(str(exc)) from exc
        if config.num_heads % tp or config.intermediate_size % tp:
            divisors = [n for n in range(1, config.num_heads + 1) if config.num_heads % n == 0]
            raise PreflightError(
                f"--tp {tp} does not divide {config.num_heads} heads; use {divisors}"
            )

    return check


def startup_checks(settings: PoolSettings) -> list[Check]:
    checks: list[Check] = [
        tcp_reachable(settings.mqtt_host, settings.mqtt_port, what="MQTT broker")
    ]
    tls = mqtt_tls_files_readable(settings)
    if settings.backend == "kubernetes":
        return [tls, packages_present("kubernetes", extra="cloud"), *checks]
    return [
        tls,
        packages_present("torch", "safetensors", "tokenizers", "numpy", extra="cloud"),
        tp_size_fits(settings.tp),
        *checks,
    ]


@pool_app.command("serve")
def serve(
    replicas: int | None = typer.Option(None, "--replicas", help="Replicas to run."),
    tp: int | None = typer.Option(None, "--tp", help="Tensor-parallel ranks per replica."),
    mqtt_host: str | None = typer.Option(None, "--mqtt-host"),
    mqtt_port: int | None = typer.Option(None, "--mqtt-port"),
    mqtt_username: str | None = typer.Option(
        None, "--mqtt-username", help="Broker username; the password comes from the environment."
    ),
    mqtt_tls_ca_file: Path | None = typer.Option(None, "--mqtt-tls-ca-file"),
    mqtt_tls_cert_file: Path | None = typer.Option(None, "--mqtt-tls-cert-file"),
    mqtt_tls_key_file: Path | None = typer.Option(None, "--mqtt-tls-key-file"),
    max_batch_size: int | None = typer.Option(None, "--max-batch-size"),
    max_queue_delay_ms: float | None = typer.Option(None, "--max-queue-delay-ms"),
    autoscale: bool | None = typer.Option(None, "--autoscale/--no-autoscale"),
    min_replicas: int | None = typer.Option(None, "--min-replicas"),
    max_replicas: int | None = typer.Option(None, "--max-replicas"),
    state_dir: Path | None = typer.Option(None, "--state-dir", help="Replica state and logs."),
    backend: str | None = typer.Option(None, "--backend", help="local (default) or kubernetes."),
    log_level: str = typer.Option("INFO", "--log-level"),
) -> None:
    """Supervise the pool: start replicas, restart the dead, publish back-pressure, scale."""
    configure_json_logging("pool", level=log_level)
    try:
        settings = build_settings(
            replicas=replicas,
            tp=tp,
            mqtt_host=mqtt_host,
            mqtt_port=mqtt_port,
            mqtt_username=mqtt_username,
            mqtt_tls_ca_file=mqtt_tls_ca_file,
            mqtt_tls_cert_file=mqtt_tls_cert_file,
            mqtt_tls_key_file=mqtt_tls_key_file,
            max_batch_size=max_batch_size,
            max_queue_delay_ms=max_queue_delay_ms,
            autoscale=autoscale,
            min_replicas=min_replicas,
            max_replicas=max_replicas,
            state_dir=state_dir,
            backend=backend,
        )
        run_checks(startup_checks(settings))
    except PreflightError as exc:
        _fail(str(exc))
    from cloud_controller.pool.orchestrator import LocalProcessOrchestrator, Orchestrator
    from cloud_controller.pool.supervisor import PoolSupervisor

    orchestrator: Orchestrator
    if settings.backend == "kubernetes":
        from cloud_controller.pool.kubernetes import (
            KubernetesOrchestrator,
            apps_api_from_environment,
        )

        orchestrator = KubernetesOrchestrator(settings, apps_api_from_environment())
    else:
        orchestrator = LocalProcessOrchestrator(settings)
    supervisor = PoolSupervisor(settings, orchestrator)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    supervisor.start()
    try:
        supervisor.run(stop)
    finally:
        supervisor.shutdown(replicas_stop=settings.backend == "local")


@pool_app.command("replica")
def replica() -> None:
    """Run one rank of a replica (reads RANK/WORLD_SIZE/MASTER_* like torchrun sets them)."""
    from cloud_controller.pool.replica import main

    main()


@pool_app.command("manifests")
def manifests(
    out: Path = typer.Option(Path("manifests/pool"), "--out", help="Directory to write."),
    image: str | None = typer.Option(None, "--image", help="Container image of the pool."),
) -> None:
    """Render the pool's Kubernetes manifests (StatefulSet, supervisor, HPA) as YAML."""
    from cloud_controller.pool.kubernetes import (
        DEFAULT_IMAGE,
        manifest_settings,
        render_manifests,
        write_manifests,
    )

    written = write_manifests(
        render_manifests(manifest_settings(), image=image or DEFAULT_IMAGE), out
    )
    for path in written:
        typer.echo(str(path))
