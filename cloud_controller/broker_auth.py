"""Broker credentials and access control: Mosquitto's password file and ACL, generated here.

Who may read and write what is derived from ``protocol.topics.Topics`` (the one place
topics are built), so the ACL cannot drift from the topics the processes use:

- every **device** authenticates as its device id (a password from this module, or a
  client certificate whose CN is the device id with ``use_identity_as_username``); ACL
  ``pattern`` lines with ``%u`` give it its own per-device channels (write on the ones it
  sends, read on the ones it receives), its own reply subtree, write on the pool's and
  the model registry's request topics, read on the pool's status and on the artifact
  chunk broadcasts. Nothing of another device.
- the **controller** reads and writes the whole tree under the root.
- the **pool** reads and writes ``{root}/pool/#`` and writes answers under
  ``{root}/replies/#``.

Passwords are stored in Mosquitto 2.0's ``$7$`` format (PBKDF2-SHA512, 101 iterations,
12-byte salt, like ``mosquitto_passwd``), computed here so no Mosquitto tool is needed.
A device id may not be a cloud identity's name: its ``%u`` patterns would then apply
to a user with more rights, and it could log in as that user.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from protocol.topics import DeviceChannel, Topics, validate_device_id

CONTROLLER_USER = "spillway-controller"
"""Default MQTT username of the controller (and its replicas)."""
POOL_USER = "spillway-pool"
"""Default MQTT username shared by the pool's supervisor and replicas."""
PASSWORD_FILE = "passwd"
ACL_FILE = "acl"
DEVICE_ACL_FILE = "acl-devices"
"""Only the device patterns: for a listener where identities come from client certificates,
so a certificate's CN can never pick up a cloud identity's rights."""

PBKDF2_ITERATIONS = 101
"""What ``mosquitto_passwd`` 2.0 uses; Mosquitto reads the count from each line."""
_SALT_BYTES = 12
_PLACEHOLDER_DEVICE = "ACL-DEVICE-PLACEHOLDER"
_PLACEHOLDER_SHA = "0" * 64


class Access(StrEnum):
    """Mosquitto ACL access words."""

    READ = "read"
    WRITE = "write"
    READWRITE = "readwrite"

    def allows(self, wanted: Access) -> bool:
        return self is Access.READWRITE or self is wanted


class Role(StrEnum):
    """What an MQTT identity is; decides its ACL entries."""

    DEVICE = "device"
    CONTROLLER = "controller"
    POOL = "pool"


@dataclass(frozen=True)
class Grant:
    """One ACL line: ``access`` on ``topic`` (a filter; ``%u`` = the username in patterns)."""

    access: Access
    topic: str


class CredentialError(ValueError):
    """A username or password file that cannot be used; the message says why."""


# -- ACL -------------------------------------------------------------------------------------


def _as_pattern(topic: str) -> str:
    return topic.replace(_PLACEHOLDER_DEVICE, "%u")


def _artifact_chunks_filter(topics: Topics) -> str:
    """Every artifact's chunk broadcast topic (``{root}/artifacts/+/chunks``)."""
    return topics.artifact_chunks(_PLACEHOLDER_SHA).replace(_PLACEHOLDER_SHA, "+")


def device_grants(topics: Topics) -> list[Grant]:
    """A device's rights, as patterns over its username (= its device id)."""
    grants: list[Grant] = []
    for channel in DeviceChannel:
        topic = _as_pattern(topics.device(_PLACEHOLDER_DEVICE, channel))
        if channel is DeviceChannel.INFER:
            # Local applications on the device send requests with the device's identity.
            access = Access.READWRITE
        elif channel.spec.direction == "up":
            access = Access.WRITE
        else:
            access = Access.READ
        grants.append(Grant(access, topic))
    # Answers to this device (pool answers, chunk answers) and to local applications'
    # requests (whose response topics sit below the device's reply topic).
    grants.append(Grant(Access.READWRITE, _as_pattern(topics.replies(_PLACEHOLDER_DEVICE)) + "/#"))
    grants.append(Grant(Access.WRITE, topics.pool_requests()))
    grants.append(Grant(Access.READ, topics.pool_status()))
    grants.append(Grant(Access.WRITE, topics.model_chunks()))
    grants.append(Grant(Access.READ, _artifact_chunks_filter(topics)))
    return grants


def controller_grants(topics: Topics) -> list[Grant]:
    """The controller reads every device's uplink, writes desired state, acks and chunks."""
    return [Grant(Access.READWRITE, f"{topics.root}/#")]


def pool_grants(topics: Topics) -> list[Grant]:
    """The pool takes requests, publishes its status and loads, answers on reply topics."""
    pool_subtree = topics.pool_requests().rsplit("/", 1)[0]
    replies_subtree = topics.replies(_PLACEHOLDER_DEVICE).rsplit("/", 1)[0]
    return [
        Grant(Access.READWRITE, f"{pool_subtree}/#"),
        Grant(Access.WRITE, f"{replies_subtree}/#"),
    ]


def render_acl(
    topics: Topics,
    *,
    controller_users: Iterable[str] = (CONTROLLER_USER,),
    pool_users: Iterable[str] = (POOL_USER,),
) -> str:
    """The ACL file: the cloud identities' ``user`` blocks, then the device patterns."""
    lines = [
        "# Generated by 'spillway certs mqtt-user' from protocol/topics.py: do not edit.",
        "# Cloud identities (username/password on the in-cluster listener).",
    ]
    for users, grants in (
        (controller_users, controller_grants(topics)),
        (pool_users, pool_grants(topics)),
    ):
        for user in users:
            lines.append(f"user {user}")
            lines.extend(f"topic {g.access} {g.topic}" for g in grants)
            lines.append("")
    lines.append(render_device_acl(topics).rstrip("\n"))
    return "\n".join(lines) + "\n"


def render_device_acl(topics: Topics) -> str:
    """Only the device patterns (for a listener whose usernames are certificate CNs)."""
    lines = [
        "# Devices: %u is the username = the device id (or its certificate's CN).",
        *(f"pattern {g.access} {g.topic}" for g in device_grants(topics)),
    ]
    return "\n".join(lines) + "\n"


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT filter matching (``+`` one level, ``#`` this level and below)."""
    parts, levels = topic_filter.split("/"), topic.split("/")
    for n, part in enumerate(parts):
        if part == "#":
            return True
        if n >= len(levels) or (part != "+" and part != levels[n]):
            return False
    return len(parts) == len(levels)


def allowed(grants: Iterable[Grant], username: str, topic: str, access: Access) -> bool:
    """Whether ``grants`` (patterns expanded for ``username``) allow ``access`` to ``topic``;
    what Mosquitto decides for a concrete topic, used to check the ACL before deploying."""
    return any(
        g.access.allows(access) and topic_matches(g.topic.replace("%u", username), topic)
        for g in grants
    )


# -- passwords ------------------------------------------------------------------------------


def hash_password(
    password: str, *, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS
) -> str:
    """Mosquitto 2.0's ``$7$iterations$salt$hash`` (PBKDF2-SHA512, base64)."""
    if not password:
        raise CredentialError("an empty password is not allowed")
    salt = salt if salt is not None else os.urandom(_SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_password(password: str, encoded: str) -> bool:
    """Whether ``password`` matches a ``$7$`` entry (also ones ``mosquitto_passwd`` wrote)."""
    try:
        _, kind, iterations, salt, digest = encoded.split("$")
        if kind != "7":
            return False
        expected = base64.b64decode(digest)
        actual = hashlib.pbkdf2_hmac(
            "sha512", password.encode(), base64.b64decode(salt), int(iterations)
        )
    except ValueError:
        return False
    return hmac.compare_digest(actual, expected)


def new_password() -> str:
    """A random password: 32 URL-safe characters (192 bits)."""
    return secrets.token_urlsafe(24)


def validate_username(username: str, role: Role, *, cloud_users: Iterable[str] = ()) -> str:
    """Device usernames are device ids, and never a cloud identity's name."""
    try:
        validate_device_id(username)
    except ValueError as exc:
        raise CredentialError(str(exc)) from exc
    if role is Role.DEVICE and username in {CONTROLLER_USER, POOL_USER, *cloud_users}:
        raise CredentialError(f"{username!r} is a cloud identity's name; not a device id")
    return username


def read_password_file(path: Path) -> dict[str, str]:
    """``username -> $7$ hash`` from a Mosquitto password file (absent file: empty)."""
    if not path.exists():
        return {}
    entries: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        username, sep, encoded = line.partition(":")
        if not sep or not encoded.startswith("$"):
            raise CredentialError(f"{path}:{number}: not 'username:$7$...'")
        entries[username] = encoded
    return entries


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` with mode 0600 via a temporary file and a rename (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def write_password_file(path: Path, entries: Mapping[str, str]) -> None:
    _write_private(
        path, "".join(f"{user}:{encoded}\n" for user, encoded in sorted(entries.items()))
    )


@dataclass(frozen=True)
class Issued:
    """A credential just created or rotated; ``password`` is shown once and never logged."""

    username: str
    password: str
    rotated: bool

    def __repr__(self) -> str:
        return f"Issued(username={self.username!r}, password='***', rotated={self.rotated})"


@dataclass(frozen=True)
class BrokerAuthDir:
    """A folder holding what Mosquitto reads: ``passwd``, ``acl`` and ``acl-devices``.

    The ACL files are rewritten from the topic tree at every change, so a folder made by
    an older version picks up new topics when any credential is issued.
    """

    directory: Path
    topics: Topics = field(default_factory=Topics)
    controller_user: str = CONTROLLER_USER
    pool_user: str = POOL_USER

    @property
    def password_file(self) -> Path:
        return self.directory / PASSWORD_FILE

    @property
    def acl_file(self) -> Path:
        return self.directory / ACL_FILE

    @property
    def device_acl_file(self) -> Path:
        return self.directory / DEVICE_ACL_FILE

    def users(self) -> list[str]:
        return sorted(read_password_file(self.password_file))

    def issue(self, username: str, role: Role, *, password: str | None = None) -> Issued:
        """Create or rotate ``username``'s password (random unless given) and rewrite the
        ACL files. Rotating replaces the old password at once: Mosquitto reads the file
        again on SIGHUP, and connected clients keep their session until they reconnect."""
        validate_username(username, role, cloud_users=(self.controller_user, self.pool_user))
        expected = {Role.CONTROLLER: self.controller_user, Role.POOL: self.pool_user}.get(role)
        if expected is not None and username != expected:
            raise CredentialError(
                f"the {role} identity is {expected!r} (its ACL block names it), not {username!r}"
            )
        password = password if password is not None else new_password()
        entries = read_password_file(self.password_file)
        rotated = username in entries
        entries[username] = hash_password(password)
        write_password_file(self.password_file, entries)
        self.write_acls()
        return Issued(username, password, rotated)

    def revoke(self, username: str) -> bool:
        """Remove ``username``; True if it was there."""
        entries = read_password_file(self.password_file)
        if entries.pop(username, None) is None:
            return False
        write_password_file(self.password_file, entries)
        return True

    def write_acls(self) -> None:
        acl = render_acl(
            self.topics, controller_users=(self.controller_user,), pool_users=(self.pool_user,)
        )
        _write_private(self.acl_file, acl)
        _write_private(self.device_acl_file, render_device_acl(self.topics))
