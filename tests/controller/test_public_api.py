"""The package's public surface is exactly what ``__all__`` says."""

from __future__ import annotations

import cloud_controller


def test_all_is_the_public_api() -> None:
    assert sorted(cloud_controller.__all__) == ["Bridge", "CloudSettings", "create_app"]
    for name in cloud_controller.__all__:
        assert getattr(cloud_controller, name).__name__ == name
