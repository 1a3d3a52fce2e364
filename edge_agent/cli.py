"""``spillway agent run``: the agent's process entry point.

Builds ``EdgeSettings`` from options (which win) and ``SPILLWAY_EDGE_*`` variables, runs
the start-up checks (``preflight``), configures JSON logs, starts the agent and runs until
SIGTERM or SIGINT, then stops gracefully (offline presence, clean disconnect) and exits 0.
A start-up problem prints one line ``spillway agent: <problem>`` and exits 2.

Heavy imports (paho, pydantic) happen inside the command, after the package check.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer

from spillway.preflight import PreflightError, mqtt_tls_files_readable, run_checks

EXIT_STARTUP = 2

agent_app = typer.Typer(
    name="agent",
    help="The edge agent: keeps a device in the state the cloud desires.",
    no_args_is_help=True,
    add_completion=False,
)


def parse_labels(values: list[str]) -> dict[str, str]:
    """``["zone=a", "rack=3"]`` -> ``{"zone": "a", "rack": "3"}``; PreflightError if malformed."""
    labels: dict[str, str] = {}
    for value in values:
        key, sep, item = value.partition("=")
        key, item = key.strip(), item.strip()
        if not sep or not key:
            raise PreflightError(f"label {value!r} must look like key=value")
        if key in labels:
            raise PreflightError(f"label {key!r} given twice")
        labels[key] = item
    return labels


def _fail(problem: object) -> typer.Exit:
    typer.echo(f"spillway agent: {problem}", err=True)
    return typer.Exit(EXIT_STARTUP)


@agent_app.command("run")
def run(
    device_id: Annotated[
        str | None, typer.Option(help="Device id (env SPILLWAY_EDGE_DEVICE_ID).")
    ] = None,
    hardware_class: Annotated[
        str | None, typer.Option(help="Board kind, e.g. jetson-orin-nano.")
    ] = None,
    label: Annotated[
        list[str] | None, typer.Option(help="key=value tag announced in Hello; repeatable.")
    ] = None,
    mqtt_host: Annotated[str | None, typer.Option(help="Broker host.")] = None,
    mqtt_port: Annotated[int | None, typer.Option(help="Broker port.")] = None,
    state_dir: Annotated[
        Path | None, typer.Option(help="State directory (default var/agent/<device-id>).")
    ] = None,
    keepalive_s: Annotated[int | None, typer.Option(help="MQTT keepalive, seconds.")] = None,
    heartbeat_interval_s: Annotated[
        float | None, typer.Option(help="Seconds between heartbeats.")
    ] = None,
    telemetry_interval_s: Annotated[
        float | None, typer.Option(help="Seconds between telemetry samples.")
    ] = None,
    model_dir: Annotated[
        Path | None,
        typer.Option(help="Folder of published model variants; serving is on only with it."),
    ] = None,
    variant: Annotated[
        str | None, typer.Option(help="Variant to serve (default int8-onnx).")
    ] = None,
    trusted_key: Annotated[
        Path | None,
        typer.Option(
            help="Manifest signing public key (default <model-dir>/keys/signing.key.pub)."
        ),
    ] = None,
    http_host: Annotated[str | None, typer.Option(help="HTTP ingress address.")] = None,
    http_port: Annotated[
        int | None, typer.Option(help="HTTP ingress port (0: any free port).")
    ] = None,
    no_http: Annotated[bool, typer.Option("--no-http", help="No HTTP ingress.")] = False,
    intra_op_threads: Annotated[
        int | None, typer.Option(help="ONNX Runtime intra-op threads (0: one per core).")
    ] = None,
) -> None:
    """Run the agent until SIGTERM/SIGINT."""
    from edge_agent import preflight

    try:
        run_checks([preflight.required_packages()])
        overrides: dict[str, Any] = {
            "device_id": device_id,
            "hardware_class": hardware_class,
            "mqtt_host": mqtt_host,
            "mqtt_port": mqtt_port,
            "state_dir": state_dir,
            "keepalive_s": keepalive_s,
            "heartbeat_interval_s": heartbeat_interval_s,
            "telemetry_interval_s": telemetry_interval_s,
            "model_dir": model_dir,
            "model_variant": variant,
            "trusted_key_file": trusted_key,
            "http_host": http_host,
            "http_port": http_port,
            "intra_op_threads": intra_op_threads,
        }
        if label:
            overrides["labels"] = parse_labels(label)
        values = {k: v for k, v in overrides.items() if v is not None}
        if no_http:
            values["http_port"] = None
        settings = preflight.load_settings(values)
        run_checks(
            [preflight.state_dir_writable(settings.state_dir), mqtt_tls_files_readable(settings)]
        )
        if settings.serving:
            run_checks(preflight.serving_checks(settings))
    except PreflightError as exc:
        raise _fail(exc) from None

    from edge_agent.agent import Agent, ServingStartError
    from edge_agent.state import StateError
    from spillway.logs import configure_json_logging

    configure_json_logging("agent", level=settings.log_level)
    preflight.warn_if_broker_unreachable(settings)

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    agent = Agent(settings)
    try:
        agent.start()
    except (StateError, ServingStartError) as exc:
        raise _fail(exc) from None
    agent.run_forever(stop)
    sys.stderr.flush()
