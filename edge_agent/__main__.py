"""``python -m edge_agent ...`` runs ``spillway agent run ...`` without the root CLI.

Devices (and the agent's own tests) use it so the agent never depends on the other
packages the root ``spillway`` command mounts.
"""

from edge_agent.cli import run

if __name__ == "__main__":
    import typer

    typer.run(run)
