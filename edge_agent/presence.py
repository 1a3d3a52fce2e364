"""How the device announces itself: Hello, retained Presence and the Last Will.

After every CONNACK the agent sends ``Hello`` (who it is and what it can run) and then a
retained ``Presence(online)``. The broker holds a retained ``Presence(offline, "lost")``
as the Will and publishes it when the agent vanishes; a graceful stop publishes
``Presence(offline, "shutdown")`` itself before a clean DISCONNECT (which discards the
Will). Builders only: sending is the caller's job.
"""

from __future__ import annotations

from edge_agent.clock import Clock
from edge_agent.settings import EdgeSettings
from protocol.codec import encode
from protocol.messages import DeviceStatus, Hello, Presence, RuntimeCapabilities
from protocol.mqtt import Will
from protocol.topics import DeviceChannel, Topics


def hello(
    settings: EdgeSettings,
    *,
    capabilities: RuntimeCapabilities,
    agent_version: str,
    boot_epoch: int,
    clock: Clock,
) -> Hello:
    return Hello(
        device_id=settings.device_id,
        sent_at=clock.now(),
        hardware_class=settings.hardware_class,
        labels=dict(settings.labels),
        agent_version=agent_version,
        capabilities=capabilities,
        boot_epoch=boot_epoch,
        keepalive_s=settings.keepalive_s,
    )


def online(device_id: str, *, boot_epoch: int, clock: Clock) -> Presence:
    return Presence(
        device_id=device_id,
        sent_at=clock.now(),
        status=DeviceStatus.ONLINE,
        boot_epoch=boot_epoch,
        reason="connected",
    )


def shutdown(device_id: str, *, boot_epoch: int, clock: Clock) -> Presence:
    return Presence(
        device_id=device_id,
        sent_at=clock.now(),
        status=DeviceStatus.OFFLINE,
        boot_epoch=boot_epoch,
        reason="shutdown",
    )


def last_will(device_id: str, *, topics: Topics, boot_epoch: int, clock: Clock) -> Will:
    """The retained offline presence the broker publishes if the agent is lost.

    ``sent_at`` is when the agent started, not when the broker publishes it.
    """
    spec = DeviceChannel.STATUS.spec
    message = Presence(
        device_id=device_id,
        sent_at=clock.now(),
        status=DeviceStatus.OFFLINE,
        boot_epoch=boot_epoch,
        reason="lost",
    )
    return Will(
        topic=topics.device(device_id, DeviceChannel.STATUS),
        payload=encode(message),
        qos=spec.qos,
        retain=spec.retain,
    )
