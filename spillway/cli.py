"""The ``spillway`` command line: one root app that mounts each package's commands.

Sub-apps are imported inside their commands' registration functions only where a
package is optional (a device has no torch), so ``spillway --help`` works everywhere.
"""

from __future__ import annotations

import typer

app = typer.Typer(
    name="spillway",
    help="Spillway: edge-cloud inference over MQTT. Start with 'spillway demo'.",
    no_args_is_help=True,
    add_completion=False,
)
bench_app = typer.Typer(help="Benchmarks: side by side in one run, reported as ratios.")
app.add_typer(bench_app, name="bench")


def _mount() -> None:
    from cloud_controller.certs_cli import certs_app
    from cloud_controller.cli import controller_app
    from cloud_controller.pool.cli import pool_app
    from cloud_controller.rollout_cli import rollout_app
    from edge_agent.cli import agent_app
    from sim.cli import register as register_sim

    app.add_typer(controller_app, name="controller")
    app.add_typer(pool_app, name="pool")
    app.add_typer(certs_app, name="certs")
    app.add_typer(rollout_app, name="rollout")
    app.add_typer(agent_app, name="agent")
    register_sim(app, bench_app)
    try:
        from models.cli import models_app
    except ImportError:  # an edge-only install has no model-building tools
        return
    app.add_typer(models_app, name="models")


def main() -> None:
    _mount()
    app()
