"""Driving a paho client's socket with ``selectors`` instead of paho's own ``loop()``.

paho's ``loop()`` waits in ``select.select``, which cannot watch a file descriptor numbered
1024 or higher: it raises ``ValueError``, paho reports that as a lost connection, and the
client reconnects, fails the same way, and never completes a CONNACK. A controller holding
a thousand HTTP, database and broker sockets (or a long test process) gets such numbers for
every new socket. ``SocketLoop`` waits with the platform's best selector (epoll on Linux),
which has no such limit, and otherwise does what ``loop()`` does, through paho's public
external-loop calls (``loop_read``, ``loop_write``, ``loop_misc``, ``want_write`` and the
register-write callback, which wakes the wait when another thread queues a packet).
"""

from __future__ import annotations

import contextlib
import selectors
import socket
from typing import Any

import paho.mqtt.client as paho


class SocketLoop:
    """One client's network wait; ``run_once`` is called from a single thread."""

    def __init__(self, client: paho.Client) -> None:
        self._client = client
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._sock: Any = None
        self._events = 0
        client.on_socket_register_write = self._wake

    def close(self) -> None:
        self._client.on_socket_register_write = None
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def _wake(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        """paho queued a packet (possibly from another thread): end the current wait."""
        # OSError: a wake-up is already pending (buffer full), or the loop is closing
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def _watch(self, sock: Any) -> None:
        """Watch the client's current socket (a new one after every reconnect)."""
        events = selectors.EVENT_READ
        if self._client.want_write():
            events |= selectors.EVENT_WRITE
        if sock is not self._sock:
            self._forget()
            self._selector.register(sock, events)
            self._sock = sock
        elif events != self._events:
            self._selector.modify(sock, events)
        self._events = events

    def _forget(self) -> None:
        """Stop watching the previous socket (it may be closed by now)."""
        if self._sock is not None:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._selector.unregister(self._sock)
            self._sock = None

    def run_once(self, timeout_s: float) -> paho.MQTTErrorCode:
        """Wait up to ``timeout_s`` for the socket, then read, write and keep alive."""
        sock = self._client.socket()
        if sock is None:
            self._forget()
            return paho.MQTT_ERR_NO_CONN
        try:
            self._watch(sock)
        except (OSError, ValueError):
            self._forget()  # closed under us: paho reports it below
        pending = sock.pending() if hasattr(sock, "pending") else 0  # TLS-buffered bytes
        ready = self._selector.select(0.0 if pending else timeout_s)
        readable = pending > 0
        for key, mask in ready:
            if key.fileobj is self._wake_r:
                with contextlib.suppress(BlockingIOError):
                    self._wake_r.recv(4096)
            elif mask & selectors.EVENT_READ:
                readable = True
        if readable:
            rc = self._client.loop_read()
            if rc or self._client.socket() is None:
                return rc
        if self._client.want_write():
            rc = self._client.loop_write()
            if rc or self._client.socket() is None:
                return rc
        return self._client.loop_misc()
