"""``spillway rollout ...``: start, follow, pause, resume and abort rollouts over REST.

The controller's URL comes from ``--url`` or ``SPILLWAY_URL`` (default
``http://127.0.0.1:8000``); a token from ``--token`` or ``SPILLWAY_TOKEN`` is sent as
``Authorization: Bearer <token>`` (a controller without auth ignores it). ``status``
draws a progress bar and a per-wave table with rich; ``--watch`` redraws until the
rollout finishes. Any refusal prints one line and exits 1; an unreachable controller
exits 2.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, NoReturn

import httpx
import typer
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

rollout_app = typer.Typer(
    help="Roll a model version out to devices in waves, gated by telemetry.",
    no_args_is_help=True,
    add_completion=False,
)

FINISHED = {"completed", "rolled_back", "aborted"}
UrlOpt = Annotated[
    str, typer.Option("--url", envvar="SPILLWAY_URL", help="The controller's base URL.")
]
TokenOpt = Annotated[
    str | None,
    typer.Option("--token", envvar="SPILLWAY_TOKEN", help="Bearer token for the API."),
]


def _fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"spillway rollout: {message}", err=True)
    raise typer.Exit(code=code)


def _call(method: str, url: str, token: str | None, path: str, **kwargs: Any) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.request(
            method, url.rstrip("/") + path, headers=headers, timeout=30, **kwargs
        )
    except httpx.HTTPError as exc:
        _fail(f"controller at {url} unreachable: {exc}", code=2)
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail")
        except ValueError:
            detail = response.text
        _fail(f"{response.status_code}: {detail}")
    return response.json()


def _labels(items: list[str]) -> dict[str, str]:
    labels = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            _fail(f"label {item!r} must look like key=value")
        labels[key] = value
    return labels


def render(rollout: dict[str, Any]) -> Group:
    """A progress bar and the per-wave table of one rollout (``GET /api/v1/rollouts/{id}``)."""
    total = max(1, rollout["devices_total"])
    progress = Progress(
        TextColumn(f"rollout {rollout['id']} {rollout['model']}@{rollout['version']}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} devices"),
        TextColumn(f"[bold]{rollout['state']}"),
    )
    progress.add_task("devices", total=total, completed=rollout["devices_done"])
    waves = Table("wave", "devices", "state", "gates", "detail")
    for wave in rollout["waves"]:
        name = "canary" if wave["canary"] else str(wave["index"])
        if wave["index"] == rollout["current_wave"]:
            name = f"> {name}"
        failing = [r for r in wave["gate_results"] if r["verdict"] != "pass"]
        detail = "; ".join(f"{r['name']}: {r['detail']}" for r in failing)
        waves.add_row(
            name, str(wave["devices"]), wave["state"], wave["gate_verdict"] or "-", detail
        )
    parts: list[Any] = [progress, waves]
    if rollout.get("reason"):
        parts.append(f"reason: {rollout['reason']}")
    return Group(*parts)


@rollout_app.command()
def start(
    model: Annotated[str, typer.Argument(help="Model name, e.g. org/name.")],
    version: Annotated[str, typer.Argument(help="A ready version of it.")],
    label: Annotated[list[str], typer.Option(help="Target key=value; repeat to AND.")] = [],  # noqa: B006
    device: Annotated[list[str], typer.Option(help="Target device id; repeatable.")] = [],  # noqa: B006
    hardware_class: Annotated[
        list[str], typer.Option(help="Target hardware class; repeatable.")
    ] = [],  # noqa: B006
    canary_share: Annotated[float, typer.Option(help="Share of devices in the canary.")] = 0.1,
    wave_size: Annotated[int, typer.Option(help="Devices per wave after the canary.")] = 10,
    interval_s: Annotated[float, typer.Option(help="Observation seconds per wave.")] = 60.0,
    quality_sample_share: Annotated[
        float, typer.Option(help="Share of local requests compared with the cloud.")
    ] = 0.1,
    min_quality_agreement: Annotated[
        float | None, typer.Option(help="Lowest mean cosine edge vs cloud FP32.")
    ] = None,
    max_error_rate: Annotated[float | None, typer.Option(help="Highest error rate.")] = None,
    on_gate_failure: Annotated[str, typer.Option(help="rollback or pause.")] = "rollback",
    url: UrlOpt = "http://127.0.0.1:8000",
    token: TokenOpt = None,
) -> None:
    """Start a rollout; prints its id."""
    gates: dict[str, Any] = {}
    if min_quality_agreement is not None:
        gates["min_quality_agreement"] = min_quality_agreement
    if max_error_rate is not None:
        gates["max_error_rate"] = max_error_rate
    body = {
        "model": model,
        "version": version,
        "target": {
            "labels": _labels(label),
            "device_ids": device,
            "hardware_classes": hardware_class,
        },
        "waves": {"canary_share": canary_share, "wave_size": wave_size, "interval_s": interval_s},
        "gates": gates,
        "on_gate_failure": on_gate_failure,
        "quality_sample_share": quality_sample_share,
    }
    rollout = _call("POST", url, token, "/api/v1/rollouts", json=body)
    typer.echo(
        f"rollout {rollout['id']} started: {rollout['devices_total']} devices "
        f"in {rollout['waves_total']} waves"
    )


@rollout_app.command()
def status(
    rollout_id: Annotated[int | None, typer.Argument(help="Omit to list rollouts.")] = None,
    watch: Annotated[bool, typer.Option(help="Redraw until the rollout finishes.")] = False,
    every_s: Annotated[float, typer.Option(help="Seconds between redraws.")] = 2.0,
    url: UrlOpt = "http://127.0.0.1:8000",
    token: TokenOpt = None,
) -> None:
    """One rollout's progress and waves, or a list of rollouts."""
    console = Console()
    if rollout_id is None:
        page = _call("GET", url, token, "/api/v1/rollouts")
        table = Table("id", "model", "version", "state", "wave", "devices")
        for r in page["items"]:
            table.add_row(
                str(r["id"]),
                r["model"],
                r["version"],
                r["state"],
                f"{r['current_wave'] + 1}/{r['waves_total']}",
                f"{r['devices_done']}/{r['devices_total']}",
            )
        console.print(table)
        return
    path = f"/api/v1/rollouts/{rollout_id}"
    rollout = _call("GET", url, token, path)
    if not watch:
        console.print(render(rollout))
        return
    with Live(render(rollout), console=console, refresh_per_second=4) as live:
        while rollout["state"] not in FINISHED:
            time.sleep(every_s)
            rollout = _call("GET", url, token, path)
            live.update(render(rollout))


def _command(action: str, rollout_id: int, url: str, token: str | None) -> None:
    rollout = _call("POST", url, token, f"/api/v1/rollouts/{rollout_id}/{action}")
    typer.echo(f"rollout {rollout_id}: {rollout['state']}")


@rollout_app.command()
def pause(rollout_id: int, url: UrlOpt = "http://127.0.0.1:8000", token: TokenOpt = None) -> None:
    """Hold the rollout: no new wave, no gate evaluation."""
    _command("pause", rollout_id, url, token)


@rollout_app.command()
def resume(rollout_id: int, url: UrlOpt = "http://127.0.0.1:8000", token: TokenOpt = None) -> None:
    """Go on (a wave that failed its gates is accepted)."""
    _command("resume", rollout_id, url, token)


@rollout_app.command()
def abort(rollout_id: int, url: UrlOpt = "http://127.0.0.1:8000", token: TokenOpt = None) -> None:
    """Roll every updated device back and stop."""
    _command("abort", rollout_id, url, token)
