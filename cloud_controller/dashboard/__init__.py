"""The web dashboard: static files (vanilla ES modules, hand-written SVG charts) and the
router that serves them at ``/dashboard/``.

There is no build step and nothing is fetched from the internet: the files in this package
are the whole front end, shipped in the wheel. The pages read the same ``/api/v1`` routes as
any client, with the token the user typed in; the server enforces roles, the page only hides
what a role may not do.
"""

from __future__ import annotations

from cloud_controller.dashboard.serving import ASSETS, router

__all__ = ["ASSETS", "router"]
