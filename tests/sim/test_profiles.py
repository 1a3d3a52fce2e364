"""Device profiles: what each Jetson class holds, runs, and how fast it is modelled."""

from __future__ import annotations

import pytest

from sim.profiles import (
    ARM_A78AE_PER_GHZ_VS_REFERENCE,
    PARALLEL_EFFICIENCY,
    PROFILES,
    UnknownProfile,
    profile_for,
    profile_named,
)


def test_three_jetson_classes_with_their_memory_and_precisions() -> None:
    by_class = {p.hardware_class: p for p in PROFILES}
    assert by_class.keys() == {"jetson-orin-nano", "jetson-orin-nx", "jetson-agx-orin"}
    assert by_class["jetson-orin-nano"].memory_mb == 8 * 1024
    assert by_class["jetson-orin-nx"].memory_mb == 16 * 1024
    assert by_class["jetson-agx-orin"].memory_mb == 64 * 1024
    for p in PROFILES:
        assert p.precisions() == ("int8", "fp16", "fp32")


def test_speed_is_derived_from_cores_clock_and_the_stated_assumptions() -> None:
    nano, nx, agx = (
        profile_named(c) for c in ("jetson-orin-nano", "jetson-orin-nx", "jetson-agx-orin")
    )
    assert nano.relative_speed < nx.relative_speed < agx.relative_speed
    factor = ARM_A78AE_PER_GHZ_VS_REFERENCE * PARALLEL_EFFICIENCY
    assert nano.relative_speed == pytest.approx(6 * 1.5 * factor)
    assert "assumed" in nano.speed_source and "not measured" in nano.speed_source


def test_memory_budget_decides_what_fits() -> None:
    nano = profile_named("jetson-orin-nano")
    assert nano.fits(100 * 2**20)
    assert not nano.fits(8 * 2**30)
    assert profile_named("jetson-agx-orin").fits(8 * 2**30)


def test_profiles_in_turn_and_unknown_names() -> None:
    assert [profile_for(i).hardware_class for i in range(4)] == [
        "jetson-orin-nano",
        "jetson-orin-nx",
        "jetson-agx-orin",
        "jetson-orin-nano",
    ]
    with pytest.raises(UnknownProfile, match="known: jetson-orin-nano"):
        profile_named("raspberry-pi")
