"""Network impairment: the spec parser, the userspace proxy (bytes, delay, rate, loss,
partitions; a real MQTT client through it to a real mosquitto), the backend choice, and
the netns backend where this process is root.

Timing assertions are lower bounds only (an impaired link is never faster than its spec);
"nothing arrives while cut" waits a short, fixed time and may only fail by data leaking.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import socketserver
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from edge_agent.eventloop import LoopThread
from protocol.mqtt import InboundMessage, MqttClient, MqttSettings, Will
from protocol.topics import QoS
from sim.bench_overflow import OverflowOptions, _Edge, bench_overflow, impairment_note
from sim.broker import MosquittoBroker
from sim.impair import (
    BackendChoice,
    ImpairmentSpecError,
    NetemUnsupported,
    NetnsError,
    choose_backend,
    open_link,
    parse_impairment,
)
from sim.impair_netns import NetemSupport, NetnsLink, probe_netem, qdisc_args
from sim.impair_proxy import ImpairmentProxy, TokenBucket, loss_penalty_s
from sim.impair_spec import Impairment
from sim.servicetime import Calibration, ServiceTimeModel, SimulatedModel

# -- the spec ------------------------------------------------------------------------------


def test_parse_a_full_spec() -> None:
    spec = parse_impairment(
        "delay=50ms, jitter=10ms,loss=1%,rate=2mbit,partition=20s@30s,partition=500ms@1m"
    )
    assert spec.delay_ms == pytest.approx(50)
    assert spec.jitter_ms == pytest.approx(10)
    assert spec.loss == pytest.approx(0.01)
    assert spec.rate_kbit == pytest.approx(2000)
    assert spec.partitions == ((30.0, 20.0), (60.0, 0.5))
    assert parse_impairment(str(spec)) == spec  # the canonical form reads back


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("delay=0.5s", Impairment(delay_ms=500)),
        ("delay=250us", Impairment(delay_ms=0.25)),
        ("rate=100kbps", Impairment(rate_kbit=800)),
        ("rate=1gbit", Impairment(rate_kbit=1e6)),
        ("loss=0.5%", Impairment(loss=0.005)),
        ("partition=2s@0s", Impairment(partitions=((0.0, 2.0),))),
    ],
)
def test_parse_units(text: str, expected: Impairment) -> None:
    assert parse_impairment(text) == expected


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("", "empty"),
        ("delay", "key=value"),
        ("delay=abc", "delay"),
        ("delay=50", "delay"),  # no unit: tc would read microseconds, we refuse
        ("loss=1", "percentage"),
        ("loss=100%", "loss"),
        ("rate=fast", "rate"),
        ("rate=0kbit", "rate"),
        ("partition=20s", "DURATION@START"),
        ("partition=0s@5s", "partition"),
        ("jitter=10ms", "jitter needs a delay"),
        ("color=blue", "unknown key"),
        ("delay=5ms,delay=6ms", "twice"),
    ],
)
def test_bad_specs_fail_with_one_line(text: str, names: str) -> None:
    with pytest.raises(ImpairmentSpecError) as info:
        parse_impairment(text)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert names in message and "\n" not in message


def test_partitions_merge_and_properties() -> None:
    spec = Impairment(partitions=((10, 5), (0, 2), (12, 10)))
    assert spec.merged_partitions() == [(0, 2), (10, 22)]
    assert Impairment().is_perfect and not spec.is_perfect
    assert Impairment(loss=0.01).needs_netem and not Impairment(rate_kbit=10).needs_netem
    assert Impairment(delay_ms=300).retransmission_timeout_s == pytest.approx(0.6)
    assert Impairment().retransmission_timeout_s == pytest.approx(0.2)


# -- pure parts of the proxy ---------------------------------------------------------------


def test_token_bucket_spends_its_burst_then_paces() -> None:
    bucket = TokenBucket(1000.0, 500.0, now=0.0)
    assert bucket.delay_s(500, now=0.0) == 0.0  # the burst
    assert bucket.delay_s(250, now=0.0) == pytest.approx(0.25)  # in debt: wait for it
    assert bucket.delay_s(250, now=0.25) == pytest.approx(0.25)
    assert bucket.delay_s(100, now=10.0) == 0.0  # refilled, capped at the burst


def test_loss_penalty_is_rto_doubling_per_consecutive_loss() -> None:
    rng = random.Random(1)
    assert loss_penalty_s(10_000, loss=0.0, rto_s=0.2, rng=rng) == 0.0
    penalties = [loss_penalty_s(1448, loss=0.5, rto_s=0.2, rng=rng) for _ in range(200)]
    allowed = {0.2 * (2**k - 1) for k in range(7)}
    assert all(any(p == pytest.approx(a) for a in allowed) for p in penalties)
    assert 0.0 in penalties and max(penalties) >= 0.6  # some clean, some lost twice or more


def test_qdisc_arguments() -> None:
    spec = Impairment(delay_ms=50, jitter_ms=10, loss=0.01, rate_kbit=2000)
    assert qdisc_args(spec, netem=True) == [
        "netem", "delay", "50ms", "10ms", "loss", "1%", "rate", "2000kbit",
    ]  # fmt: skip
    assert qdisc_args(Impairment(rate_kbit=2000), netem=False)[:3] == ["tbf", "rate", "2000kbit"]
    assert qdisc_args(Impairment(), netem=False) == []


# -- backend choice ------------------------------------------------------------------------


def _root() -> None:
    return None


def test_auto_falls_back_to_the_proxy_and_says_why() -> None:
    spec = Impairment(delay_ms=10)
    no_netem = NetemSupport(False, "Specified qdisc kind is unknown (kernel 6.18)")
    choice = choose_backend(spec, unavailable=lambda: "not root (euid 1000)")
    assert choice == BackendChoice("proxy", "netns backend needs root: not root (euid 1000)")
    choice = choose_backend(spec, unavailable=_root, probe=lambda: no_netem)
    assert choice.backend == "proxy" and "netem unsupported" in choice.reason
    assert "qdisc kind is unknown" in choice.reason
    ok = NetemSupport(True, "sch_netem available")
    assert choose_backend(spec, unavailable=_root, probe=lambda: ok).backend == "netns"
    assert choose_backend(spec, "proxy").backend == "proxy"


def test_netns_asked_for_fails_clearly_when_it_cannot_apply_the_spec() -> None:
    no_netem = NetemSupport(False, "qdisc kind is unknown")
    with pytest.raises(NetemUnsupported, match="netem unsupported"):
        choose_backend(Impairment(delay_ms=10), "netns", unavailable=_root, probe=lambda: no_netem)
    partition_only = Impairment(partitions=((1, 1),))
    choice = choose_backend(partition_only, "netns", unavailable=_root, probe=lambda: no_netem)
    assert choice.backend == "netns"
    with pytest.raises(NetnsError, match="not root"):
        choose_backend(partition_only, "netns", unavailable=lambda: "not root (euid 1000)")


# -- the proxy with a real upstream --------------------------------------------------------


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.server.accepted += 1  # type: ignore[attr-defined]
        while data := self.request.recv(65536):
            self.request.sendall(data)


@pytest.fixture
def echo() -> Iterator[socketserver.ThreadingTCPServer]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    server.accepted = 0  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _upstream(server: socketserver.ThreadingTCPServer) -> tuple[str, int]:
    host, port = server.server_address[:2]
    return str(host), int(port)


def _recv_exactly(sock: socket.socket, n: int, *, timeout_s: float = 10.0) -> bytes:
    sock.settimeout(timeout_s)
    chunks: list[bytes] = []
    got = 0
    while got < n:
        chunk = sock.recv(min(65536, n - got))
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _round_trip_s(sock: socket.socket, payload: bytes = b"ping") -> float:
    began = time.monotonic()
    sock.sendall(payload)
    assert _recv_exactly(sock, len(payload)) == payload
    return time.monotonic() - began


def _nothing_arrives(sock: socket.socket, *, wait_s: float = 0.4) -> bool:
    sock.settimeout(wait_s)
    try:
        sock.recv(1)  # data or EOF: something passed
    except TimeoutError:
        return True
    return False


def test_proxy_forwards_bytes_intact_both_ways(echo: socketserver.ThreadingTCPServer) -> None:
    payload = random.Random(0).randbytes(1 << 20)
    with ImpairmentProxy(Impairment(), upstream=_upstream(echo)) as proxy:
        with socket.create_connection(proxy.endpoint) as sock:
            sender = threading.Thread(target=sock.sendall, args=(payload,))
            sender.start()
            assert _recv_exactly(sock, len(payload)) == payload
            sender.join()
        _wait_for(lambda: proxy.stats().bytes_down == len(payload))  # counted after drain()
        stats = proxy.stats()
    assert stats.connections == 1
    assert stats.bytes_up == stats.bytes_down == len(payload)


def test_proxy_delay_applies_per_direction(echo: socketserver.ThreadingTCPServer) -> None:
    spec = Impairment(delay_ms=100)
    with (
        ImpairmentProxy(spec, upstream=_upstream(echo)) as proxy,
        socket.create_connection(proxy.endpoint) as sock,
    ):
        assert all(_round_trip_s(sock) >= 0.2 for _ in range(3))  # 2 x delay per RTT


def test_proxy_rate_cap_and_modelled_loss_keep_the_stream(
    echo: socketserver.ThreadingTCPServer,
) -> None:
    payload = random.Random(1).randbytes(40_000)
    spec = Impairment(rate_kbit=800, loss=0.2)  # 100 kB/s each way
    with ImpairmentProxy(spec, upstream=_upstream(echo), seed=3) as proxy:
        with socket.create_connection(proxy.endpoint) as sock:
            began = time.monotonic()
            sock.sendall(payload)
            assert _recv_exactly(sock, len(payload)) == payload
            elapsed = time.monotonic() - began
        stats = proxy.stats()
    # Both directions serialise 40 kB at 100 kB/s less a 3 kB burst.
    assert elapsed >= 2 * (40_000 - 3_000) / 100_000
    assert stats.retransmits_modelled > 0  # loss shows as delay, never as missing bytes


def test_partition_blackholes_both_ways_and_heal_delivers(
    echo: socketserver.ThreadingTCPServer,
) -> None:
    with ImpairmentProxy(Impairment(), upstream=_upstream(echo)) as proxy:
        with socket.create_connection(proxy.endpoint) as sock:
            assert _round_trip_s(sock) >= 0
            proxy.partition()
            assert proxy.partitioned
            sock.sendall(b"held")
            assert _nothing_arrives(sock)  # the socket stays open, nothing passes
            # A connection opened during the cut reaches the upstream only at heal.
            late = socket.create_connection(proxy.endpoint)
            late.sendall(b"late")
            assert _nothing_arrives(late)
            accepted_during_cut = echo.accepted  # type: ignore[attr-defined]
            proxy.heal()
            assert _recv_exactly(sock, 4) == b"held"
            assert _recv_exactly(late, 4) == b"late"
            late.close()
        stats = proxy.stats()
    assert accepted_during_cut == 1
    assert stats.cuts == 1 and stats.partitioned_s >= 0.4


def test_a_client_that_gives_up_during_a_cut_never_reaches_the_upstream(
    echo: socketserver.ThreadingTCPServer,
) -> None:
    with ImpairmentProxy(Impairment(), upstream=_upstream(echo)) as proxy:
        proxy.partition()
        with socket.create_connection(proxy.endpoint) as sock:
            sock.sendall(b"CONNECT")
        _wait_for(lambda: proxy.stats().abandoned == 1)
        proxy.heal()
        with socket.create_connection(proxy.endpoint) as sock:
            assert _round_trip_s(sock) >= 0
    assert echo.accepted == 1  # type: ignore[attr-defined]


def test_scheduled_partition_cuts_then_heals(echo: socketserver.ThreadingTCPServer) -> None:
    spec = Impairment(partitions=((0.0, 1.5),))
    proxy = ImpairmentProxy(spec, upstream=_upstream(echo), schedule_on_start=False)
    with proxy:
        with socket.create_connection(proxy.endpoint) as sock:
            assert not proxy.partitioned
            proxy.start_schedule()
            _wait_for(lambda: proxy.partitioned)
            sock.sendall(b"during")
            assert _nothing_arrives(sock, wait_s=0.3)
            assert _recv_exactly(sock, 6) == b"during"  # delivered once the window closes
        _wait_for(lambda: not proxy.partitioned)
        stats = proxy.stats()
    assert stats.cuts == 1 and stats.partitioned_s >= 1.5


def test_upstream_close_and_refusal_reach_the_client(echo: socketserver.ThreadingTCPServer) -> None:
    closed_port = _free_port()
    with ImpairmentProxy(Impairment(), upstream=("127.0.0.1", closed_port)) as proxy:
        with socket.create_connection(proxy.endpoint) as sock:
            sock.settimeout(5)
            with pytest.raises(ConnectionResetError):  # as the broker's RST would
                sock.recv(1)
        _wait_for(lambda: proxy.stats().refused == 1)
    with ImpairmentProxy(Impairment(), upstream=_upstream(echo)) as proxy:
        with socket.create_connection(proxy.endpoint) as sock:
            sock.shutdown(socket.SHUT_WR)  # the echo server then closes: EOF comes back
            sock.settimeout(5)
            assert sock.recv(1) == b""
        _wait_for(lambda: proxy.stats().active == 0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


# -- MQTT through the proxy ----------------------------------------------------------------


def _mqtt(
    host: str, port: int, client_id: str, *, keepalive_s: int, will: Will | None = None
) -> MqttClient:
    client = MqttClient(
        MqttSettings(
            host=host,
            port=port,
            client_id=client_id,
            keepalive_s=keepalive_s,
            backoff_initial_s=0.1,
            backoff_max_s=0.5,
        ),
        will=will,
    )
    client.start()
    assert client.wait_connected(10)
    return client


def _collect(client: MqttClient, topic: str) -> list[bytes]:
    got: list[bytes] = []

    def handler(msg: InboundMessage) -> None:
        got.append(msg.payload)

    client.subscribe(topic, handler, qos=QoS.AT_LEAST_ONCE)
    return got


def test_mqtt_session_survives_a_short_partition(broker: MosquittoBroker) -> None:
    with ImpairmentProxy(Impairment(delay_ms=5), upstream=(broker.host, broker.port)) as link:
        device = _mqtt(*link.endpoint, "impaired-device", keepalive_s=4)
        sender = _mqtt(broker.host, broker.port, "impair-sender", keepalive_s=10)
        try:
            got = _collect(device, "impair/cmd")
            time.sleep(0.3)  # the SUBACK
            link.partition()
            sender.publish("impair/cmd", b"during", qos=QoS.AT_LEAST_ONCE, wait_s=5)
            time.sleep(1.0)  # shorter than 1.5 x keepalive: the broker keeps the client
            assert got == []
            link.heal()
            _wait_for(lambda: got == [b"during"])
            assert device.connects == 1  # the same connection throughout
        finally:
            device.stop()
            sender.stop()


def test_mqtt_long_partition_fires_the_will_and_the_client_reconnects(
    broker: MosquittoBroker,
) -> None:
    will = Will(topic="impair/status", payload=b"lost", qos=QoS.AT_LEAST_ONCE, retain=False)
    with ImpairmentProxy(Impairment(), upstream=(broker.host, broker.port)) as link:
        watcher = _mqtt(broker.host, broker.port, "impair-watcher", keepalive_s=10)
        device = _mqtt(*link.endpoint, "cut-device", keepalive_s=1, will=will)
        try:
            wills = _collect(watcher, "impair/status")
            got = _collect(device, "impair/cmd")
            time.sleep(0.3)
            link.partition()
            # 1.5 x keepalive without a packet: the broker drops the device, sends its Will.
            _wait_for(lambda: wills == [b"lost"])
            watcher.publish("impair/cmd", b"queued", qos=QoS.AT_LEAST_ONCE, wait_s=5)
            _wait_for(lambda: not device.is_connected)  # its own keepalive gave up too
            link.heal()
            _wait_for(lambda: device.connects >= 2 and device.is_connected)
            _wait_for(lambda: b"queued" in got)  # the persistent session kept the message
        finally:
            device.stop()
            watcher.stop()
        assert link.stats().connections >= 2


# -- the netns backend (root only) ---------------------------------------------------------

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("tc") is None,
    reason="the netns backend needs root and iproute2 (ip, tc)",
)


def _namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def _link_exists(name: str) -> bool:
    return subprocess.run(["ip", "link", "show", name], capture_output=True).returncode == 0


@needs_root
def test_netns_partition_by_link_down_and_heal(echo: socketserver.ThreadingTCPServer) -> None:
    spec = Impairment(rate_kbit=8000)  # tbf without netem, netem with it
    with NetnsLink(spec, upstream=_upstream(echo)) as link:
        assert link.namespace in _namespaces() and _link_exists(link.host_veth)
        assert link.endpoint[0] == link.ns_address
        inside = subprocess.run(
            [*link.exec_prefix(), "ip", "-o", "-4", "addr", "show"], capture_output=True, text=True
        ).stdout
        assert f"{link.ns_address}/30" in inside and link.host_veth not in inside
        tc = subprocess.run(
            ["tc", "qdisc", "show", "dev", link.host_veth], capture_output=True, text=True
        ).stdout
        assert link.qdisc[0] in tc
        with socket.create_connection(link.endpoint, timeout=5) as sock:
            assert _round_trip_s(sock) >= 0
            link.partition()
            sock.sendall(b"held")
            assert _nothing_arrives(sock)
            with pytest.raises(OSError):  # a SYN into a cut cable gets no answer
                socket.create_connection(link.endpoint, timeout=0.5)
            link.heal()
            assert _recv_exactly(sock, 4) == b"held"  # TCP retransmitted it
        assert link.stats().cuts == 1
        described = link.describe()
        assert described["backend"] == "netns" and described["stats"]["bytes_up"] >= 8
    assert link.namespace not in _namespaces()
    assert not _link_exists(link.host_veth)


@needs_root
def test_netem_support_is_reported_and_respected(echo: socketserver.ThreadingTCPServer) -> None:
    support = probe_netem()
    assert support.reason and "\n" not in support.reason
    spec = Impairment(delay_ms=50)
    link = NetnsLink(spec, upstream=_upstream(echo))
    if not support.available:  # e.g. this project's Firecracker kernel: no sch_netem
        with pytest.raises(NetemUnsupported, match="sch_netem"):
            link.start()
        assert link.namespace not in _namespaces()  # torn down after the failure
        choice = choose_backend(spec)
        assert choice.backend == "proxy" and "netem unsupported" in choice.reason
        return
    with link, socket.create_connection(link.endpoint, timeout=5) as sock:
        assert _round_trip_s(sock) >= 0.1  # 50 ms each way
    assert choose_backend(spec).backend == "netns"


@needs_root
def test_netns_link_is_removed_when_setup_fails(
    echo: socketserver.ThreadingTCPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(namespace: str, bind: tuple[str, int]) -> socket.socket:
        raise NetnsError("no socket for you")

    monkeypatch.setattr("sim.impair_netns.socket_in_namespace", broken)
    link = NetnsLink(Impairment(), upstream=_upstream(echo))
    with pytest.raises(Exception, match="no socket for you"):
        link.start()
    assert link.namespace not in _namespaces()
    assert not _link_exists(link.host_veth)


def test_open_link_gives_the_proxy_when_asked(echo: socketserver.ThreadingTCPServer) -> None:
    with open_link(Impairment(delay_ms=1), upstream=_upstream(echo), backend="proxy") as link:
        assert link.backend == "proxy" and link.reason
        with socket.create_connection(link.endpoint) as sock:
            assert _round_trip_s(sock) >= 0.002
        assert link.describe()["impairment"]["spec"] == "delay=1ms"


# -- wiring: spillway bench overflow --impair ----------------------------------------------


def _overflow_app() -> typer.Typer:
    app = typer.Typer()
    app.command()(bench_overflow)
    return app


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--impair", "delay=fast"], "delay needs a duration"),
        (["--impair", "delay=5ms", "--impair-backend", "kernel"], "unknown impairment backend"),
    ],
)
def test_bench_overflow_refuses_a_bad_impairment_before_starting(
    args: list[str], says: str, tmp_path: Path
) -> None:
    result = CliRunner().invoke(_overflow_app(), ["--out", str(tmp_path), *args])
    assert result.exit_code == 2
    assert says in result.output
    assert not list(tmp_path.iterdir())  # nothing ran: no calibration, no report


def test_the_overflow_edge_reaches_the_broker_through_the_link(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    calibration = Calibration(
        batch_ms={1: 1.0},
        variant="int8-onnx",
        intra_op_threads=1,
        machine="test",
        measured_at="2026-01-01T00:00:00+00:00",
        repeats=1,
    )
    loop = LoopThread("test-impair-edge")
    loop.start()
    options = OverflowOptions(model_dir=tmp_path, out=tmp_path, impair=Impairment(delay_ms=5))
    assert options.impair is not None
    with open_link(options.impair, upstream=(broker.host, broker.port), backend="proxy") as link:
        edge = _Edge(
            "overflow",
            SimulatedModel(ServiceTimeModel(calibration, speed=1.0), label="test"),
            loop=loop,
            work=tmp_path,
            options=options,
            mqtt=link.endpoint,
        )
        try:
            assert edge.client is not None and edge.client.wait_connected(10)
            _wait_for(lambda: link.stats().bytes_down > 0)  # CONNACK, counted after drain()
            stats = link.stats()
            assert stats.connections == 1 and stats.bytes_up > 0 and stats.bytes_down > 0
            note = impairment_note(link.describe())
        finally:
            edge.close()
            loop.stop()
    assert "delay=5ms" in note and "backend **proxy**" in note and link.reason in note
