"""Store and forward (logq.forward) against real servers: nats-server with
JetStream and mosquitto, each started here on 127.0.0.1 (tests/services.py
installs them when missing), real forwarder processes, real SIGKILLs, real
outages.  What is checked is what landed upstream: every message exactly
once and in order in the JetStream stream; every message at least once on
MQTT, with duplicates bounded by the window.  Nothing here asserts on time.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import threading
import time
from typing import Any

import pytest

import helpers
import services

import logq
from logq import _status
from logq.forward import ForwardConfigError, Forwarder, ForwarderBusyError

CLI = "import sys; from logq.cli import main; sys.exit(main(sys.argv[1:]))"


# -- fixtures -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def installed() -> dict[str, str]:
    try:
        return services.ensure_installed()
    except services.ServiceUnavailable as e:
        pytest.fail(str(e))


@pytest.fixture
def nats_server(installed: dict[str, str], tmp_path: Any) -> Any:
    srv = services.NatsServer(str(tmp_path / "nats"))
    srv.start()
    yield srv
    srv.close()


@pytest.fixture
def mosquitto(installed: dict[str, str], tmp_path: Any) -> Any:
    srv = services.Mosquitto(str(tmp_path / "mqtt"))
    srv.start()
    yield srv
    srv.close()


@pytest.fixture
def qdir(tmp_path: Any) -> str:
    return str(tmp_path / "q")


# -- helpers -------------------------------------------------------------------------
def body(i: int, size: int = 64) -> bytes:
    head = b"%08d|" % i
    return head + bytes((i * 7 + j) & 0xFF for j in range(size - len(head)))


def fill(qdir: str, start: int, n: int, **opts: Any) -> str:
    """Put body(start) .. body(start+n-1); the queue's id."""
    with logq.open(qdir, fsync="never", **opts) as q:
        for a in range(start, start + n, 1000):
            q.put_many([body(i) for i in range(a, min(start + n, a + 1000))])
        return q.queue_id


def run_async(coro: Any) -> Any:
    return asyncio.run(coro)


async def _js(url: str) -> tuple[Any, Any]:
    import nats
    nc = await nats.connect(url, allow_reconnect=False, connect_timeout=2)
    return nc, nc.jetstream(timeout=10)


def stream_count(url: str, stream: str) -> int:
    async def go() -> int:
        nc, js = await _js(url)
        try:
            return (await js.stream_info(stream)).state.messages
        finally:
            await nc.close()
    try:
        return run_async(go())
    except Exception:  # noqa: BLE001 - not there yet, or the server is down
        return -1


def stream_contents(url: str, stream: str, subject: str) -> list[tuple[bytes, str]]:
    """(payload, Nats-Msg-Id) of every message in the stream, in stream order."""
    async def go() -> list[tuple[bytes, str]]:
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
        nc, js = await _js(url)
        try:
            total = (await js.stream_info(stream)).state.messages
            sub = await js.pull_subscribe(subject, stream=stream, config=ConsumerConfig(
                ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL))
            out: list[tuple[bytes, str]] = []
            while len(out) < total:
                for m in await sub.fetch(min(5000, total - len(out)), timeout=10):
                    out.append((m.data, (m.headers or {}).get("Nats-Msg-Id", "")))
            await sub.unsubscribe()
            return out
        finally:
            await nc.close()
    return run_async(go())


def check_stream(url: str, stream: str, subject: str, qid: str, n: int) -> None:
    """The stream holds body(0) .. body(n-1), each once, in order, each with
    the Msg-Id of its queue offset."""
    got = stream_contents(url, stream, subject)
    ids = [mid for _, mid in got]
    assert len(ids) == len(set(ids)), f"{len(ids) - len(set(ids))} duplicate(s) in the stream"
    assert len(got) == n, f"the stream holds {len(got)} messages, {n} were put"
    for i, (data, mid) in enumerate(got):
        at, _, ts = mid.rpartition(":")
        assert data == body(i) and at == f"{qid}:{i}" and ts.isdigit(), (
            f"stream position {i} holds {data[:9]!r} ({mid}), expected {body(i)[:9]!r} ({qid}:{i}:<ts>)")


def group_state(qdir: str, group: str = "forward") -> dict[str, Any]:
    with logq.open(qdir) as q:
        return q.stats()["groups"].get(group, {})


def status_of(qdir: str) -> dict[str, Any] | None:
    rows = _status.read_all(qdir, "forward")
    return rows[0] if rows else None


def cli_child(tmp_path: Any, name: str, *args: Any) -> helpers.Child:
    return helpers.Child(CLI, str(tmp_path / f"{name}.log"), "forward", *args)


FAST = dict(backoff_base=0.05, backoff_max=0.5, breaker_cooldown=0.5, connect_timeout=1.0,
            ack_timeout=2.0, status_interval=0.2)


# -- JetStream: exactly once, in order ----------------------------------------------------
def test_jetstream_100k_exactly_once_in_order(nats_server: Any, qdir: str) -> None:
    n = 100_000
    qid = fill(qdir, 0, n)
    st = Forwarder(qdir, nats_server.url, subject="edge.a", stream="EDGE").run(until_idle=True)
    assert st["published_total"] == n and st["acked_total"] == n
    assert st["failures_total"] == 0 and st["duplicates_total"] == 0
    assert st["lag"] == 0 and st["in_flight"] == 0
    assert group_state(qdir)["backlog"] == 0
    check_stream(nats_server.url, "EDGE", "edge.a", qid, n)
    assert status_of(qdir) is None, "the status file outlived the forwarder"


def test_offset_reused_after_a_cut_is_forwarded(nats_server: Any, qdir: str) -> None:
    """Recovery cuts a tail that was forwarded but is gone from the log; the
    record put next reuses its offset and must still land in the stream
    (its Msg-Id differs from the forwarded one's, which the duplicate
    window would otherwise drop it for)."""
    with logq.open(qdir) as q:
        for i in range(10):
            q.put(body(i))
    st = Forwarder(qdir, nats_server.url, subject="edge.c", stream="CUT").run(until_idle=True)
    assert st["acked_total"] == 10
    seg = helpers.segments(qdir)[-1][1]
    data = open(seg, "rb").read()
    os.truncate(seg, data.rfind(body(9)) - 5)        # offset 9's record torn: recovery cuts it
    with logq.open(qdir) as q:
        assert q.put(b"new after the cut") == 9
    st = Forwarder(qdir, nats_server.url, subject="edge.c", stream="CUT").run(until_idle=True)
    assert st["acked_total"] == 1 and st["duplicates_total"] == 0, st
    got = stream_contents(nats_server.url, "CUT", "edge.c")
    assert [d for d, _ in got] == [body(i) for i in range(10)] + [b"new after the cut"]
    assert len({mid for _, mid in got}) == 11


def test_sigkill_forwarder_twice_then_sigterm(nats_server: Any, qdir: str, tmp_path: Any) -> None:
    """Two forwarders SIGKILLed mid-stream, a third drains on SIGTERM: the
    stream holds every message once, in order."""
    n = 60_000
    qid = fill(qdir, 0, n)
    args = [qdir, "--to", nats_server.url, "--subject", "edge.k", "--stream", "KILL", "--window", "500"]
    with helpers.children() as kids:
        for round_, at in enumerate((n // 4, n // 2)):
            kid = cli_child(tmp_path, f"fw{round_}", *args)
            kids.append(kid)
            helpers.wait_for(lambda: stream_count(nats_server.url, "KILL") >= at or not kid.alive(), 60,
                             f"forwarder {round_} to publish {at} messages")
            assert kid.alive(), kid.output()
            kid.kill()
            kid.wait(10)
            landed = stream_count(nats_server.url, "KILL")
            assert landed < n, "the forwarder finished before it could be killed"
        kid = cli_child(tmp_path, "fw-last", *args, "--json")
        kids.append(kid)
        helpers.wait_for(lambda: stream_count(nats_server.url, "KILL") >= n or not kid.alive(), 60,
                         "the last forwarder to publish everything")
        helpers.wait_for(lambda: (status_of(qdir) or {}).get("acked_total", 0) > 0, 30,
                         "the last forwarder's status file")
        kid.proc.send_signal(signal.SIGTERM)
        assert kid.wait(30) == 0, kid.output()
    assert '"duplicates_total"' in kid.output()
    check_stream(nats_server.url, "KILL", "edge.k", qid, n)
    g = group_state(qdir)
    assert g["backlog"] == 0 and g["dead_letters"] == 0, g


def test_nats_outage_breaker_and_backlog(nats_server: Any, qdir: str) -> None:
    """The server is killed for a few seconds while messages keep coming:
    the backlog grows, the breaker opens and closes again, everything
    arrives once, in order."""
    first, more = 20_000, 5_000
    qid = fill(qdir, 0, first)
    fw = Forwarder(qdir, nats_server.url, subject="edge.o", stream="OUT", window=200, **FAST)
    seen: list[dict[str, Any]] = []
    stop_watch = threading.Event()

    def watch() -> None:
        while not stop_watch.is_set():
            s = status_of(qdir)
            if s:
                seen.append(s)
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    fw.start()
    try:
        helpers.wait_for(lambda: fw.stats()["published_total"] >= first // 5, 60, "the first messages")
        nats_server.stop(signal.SIGKILL)            # mid-stream: a window in flight
        fill(qdir, first, more)                     # the queue keeps taking puts
        helpers.wait_for(lambda: fw.stats()["breaker_opened_total"] >= 1, 60, "the breaker to open")
        helpers.wait_for(lambda: any(s["lag"] and s["lag"] >= more and not s["connected"] for s in seen),
                         30, "the status file to show the backlog")
        time.sleep(1.0)                             # stays down a while longer (probes fail)
        nats_server.start()
        helpers.wait_for(lambda: fw.stats()["acked_total"] >= first + more, 60, "the backlog to drain")
        helpers.wait_for(lambda: fw.stats()["breaker"] == "closed" and fw.stats()["connected"], 30,
                         "the breaker to close")
    finally:
        st = fw.stop()
        stop_watch.set()
        watcher.join()
    assert {"open", "closed"} <= {s["breaker"] for s in seen}, "the status file never showed the breaker open"
    assert st["reconnects_total"] >= 1 and st["failures_total"] >= 1 and st["last_error"]
    assert st["published_total"] + st["skipped_landed_total"] == first + more
    check_stream(nats_server.url, "OUT", "edge.o", qid, first + more)
    assert group_state(qdir)["backlog"] == 0


# -- MQTT: at least once, duplicates bounded by the window ------------------------------
class Subscriber:
    """A QoS 1 subscriber with a persistent session: it sees every message
    the broker accepted, across a broker restart.  ``copies`` counts, per
    payload, the first deliveries the broker made of separate publishes
    (DUP unset); broker-side redeliveries (DUP set) only count in ``seen``."""

    def __init__(self, port: int, topic: str) -> None:
        import paho.mqtt.client as mqtt
        self.copies: dict[bytes, int] = {}
        self.seen: set[bytes] = set()
        self.order: list[bytes] = []
        self.lock = threading.Lock()
        self.ready = threading.Event()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="logq-test-sub", clean_session=False)
        c.reconnect_delay_set(0.05, 0.2)

        def on_connect(cl: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
            cl.subscribe(topic, qos=1)

        def on_subscribe(*_a: Any) -> None:
            self.ready.set()

        def on_message(_c: Any, _u: Any, m: Any) -> None:
            with self.lock:
                if m.payload not in self.seen:
                    self.order.append(m.payload)
                self.seen.add(m.payload)
                if not m.dup:
                    self.copies[m.payload] = self.copies.get(m.payload, 0) + 1

        c.on_connect, c.on_subscribe, c.on_message = on_connect, on_subscribe, on_message
        c.connect(services.HOST, port, 30)
        c.loop_start()
        self.client = c
        assert self.ready.wait(10), "the test subscriber could not subscribe"

    def duplicates(self) -> int:
        with self.lock:
            return sum(k - 1 for k in self.copies.values() if k > 1)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_mqtt_outage_at_least_once(mosquitto: Any, qdir: str) -> None:
    first, more, window = 3_000, 3_000, 100
    fill(qdir, 0, first)
    sub = Subscriber(mosquitto.port, "edge/m")
    fw = Forwarder(qdir, mosquitto.url, topic="edge/m", window=window, **FAST)
    fw.start()
    try:
        helpers.wait_for(lambda: fw.stats()["published_total"] >= first // 2, 60, "the first messages")
        mosquitto.stop(signal.SIGTERM)              # saves its sessions; back with the same state
        fill(qdir, first, more)
        helpers.wait_for(lambda: fw.stats()["breaker_opened_total"] >= 1, 60, "the breaker to open")
        helpers.wait_for(lambda: (status_of(qdir) or {}).get("connected") is False, 30, "the status file")
        mosquitto.start()
        helpers.wait_for(lambda: fw.stats()["acked_total"] >= first + more, 60, "the backlog to drain")
        helpers.wait_for(lambda: len(sub.seen) >= first + more, 60, "the subscriber to see everything")
    finally:
        st = fw.stop()
        sub.close()
    want = {body(i) for i in range(first + more)}
    assert sub.seen == want, f"{len(want - sub.seen)} message(s) lost"
    # first copies arrive in order
    assert sub.order == [body(i) for i in range(first + more)]
    dups = sub.duplicates()
    assert dups <= st["duplicates_total"] <= window * st["failures_total"], (dups, st)
    assert st["breaker_opened_total"] >= 1 and st["reconnects_total"] >= 1
    assert group_state(qdir)["backlog"] == 0


def test_cli_mqtt_until_idle(mosquitto: Any, qdir: str, tmp_path: Any) -> None:
    import json
    n = 500
    fill(qdir, 0, n)
    sub = Subscriber(mosquitto.port, "edge/cli")
    try:
        rc, out = helpers.run_child(CLI, str(tmp_path / "cli.log"), "forward", qdir, "--to", mosquitto.url,
                                    "--topic", "edge/cli", "--qos", "1", "--window", "50", "--until-idle",
                                    "--json")
        assert rc == 0, out
        helpers.wait_for(lambda: len(sub.seen) >= n, 30, "the subscriber to see everything")
    finally:
        sub.close()
    st = json.loads(out[out.index("{"):])
    assert st["published_total"] == n and st["target"] == mosquitto.url and st["protocol"] == "mqtt"
    assert sub.order == [body(i) for i in range(n)]
    assert group_state(qdir)["backlog"] == 0


# -- an upstream that never acknowledges ---------------------------------------------------
def test_jetstream_never_acks_nothing_acked(nats_server: Any, qdir: str) -> None:
    """A stream with no_ack stores but never acknowledges: nothing is acked
    in logq, however long the forwarder tries."""
    async def mkstream() -> None:
        nc, js = await _js(nats_server.url)
        await js.add_stream(name="MUTE", subjects=["edge.mute"], no_ack=True, duplicate_window=120)
        await nc.close()
    run_async(mkstream())
    fill(qdir, 0, 500)
    fw = Forwarder(qdir, nats_server.url, subject="edge.mute", window=100, resume_check=False,
                   **dict(FAST, ack_timeout=0.3, breaker_min_calls=100))
    fw.start()
    try:
        helpers.wait_for(lambda: fw.stats()["failures_total"] >= 3, 60, "ack timeouts")
    finally:
        st = fw.stop()
    assert st["acked_total"] == 0 and st["published_total"] == 0
    assert "acknowledgement" in st["last_error"]
    g = group_state(qdir)
    assert g["acked"] == 0 and g["backlog"] == 500, g
    assert stream_count(nats_server.url, "MUTE") == 100      # the window landed once (Msg-Id)


def _silent_broker(srv: socket.socket, stop: threading.Event) -> None:
    """An MQTT 'broker' that accepts the connection and never sends a PUBACK."""
    srv.settimeout(0.1)
    conns = []
    while not stop.is_set():
        try:
            conn, _ = srv.accept()
        except socket.timeout:
            continue
        conn.settimeout(0.1)
        conns.append(conn)
        try:
            conn.recv(65536)                        # CONNECT
            conn.sendall(b"\x20\x02\x00\x00")       # CONNACK, accepted
        except OSError:
            pass
        for c in conns:
            try:
                c.recv(65536)                       # PUBLISHes, PINGREQs: swallowed
            except OSError:
                pass
    for c in conns:
        c.close()


def test_mqtt_never_acks_nothing_acked(qdir: str) -> None:
    fill(qdir, 0, 300)
    srv = socket.socket()
    srv.bind((services.HOST, 0))
    srv.listen()
    stop = threading.Event()
    t = threading.Thread(target=_silent_broker, args=(srv, stop))
    t.start()
    fw = Forwarder(qdir, f"mqtt://{services.HOST}:{srv.getsockname()[1]}", topic="t", window=50,
                   **dict(FAST, ack_timeout=0.3))
    fw.start()
    try:
        helpers.wait_for(lambda: fw.stats()["failures_total"] >= 2, 60, "ack timeouts")
    finally:
        st = fw.stop()
        stop.set()
        t.join()
        srv.close()
    assert st["acked_total"] == 0 and st["sent_total"] >= 50
    g = group_state(qdir)
    assert g["acked"] == 0 and g["backlog"] == 300, g


# -- bad input -----------------------------------------------------------------------------
@pytest.mark.parametrize("target, kw", [
    ("http://127.0.0.1:4222", {"subject": "s"}),
    ("nats://", {"subject": "s"}),
    ("nats://127.0.0.1:99999", {"subject": "s"}),
    ("nats://127.0.0.1:4222/path", {"subject": "s"}),
    ("nats://127.0.0.1:4222", {}),
    ("nats://127.0.0.1:4222", {"topic": "t"}),
    ("nats://127.0.0.1:4222", {"subject": "a.*"}),
    ("mqtt://127.0.0.1:1883", {"subject": "s"}),
    ("mqtt://127.0.0.1:1883", {"topic": "a/#"}),
    ("mqtt://127.0.0.1:1883", {"topic": "t", "qos": 0}),
    ("nats://127.0.0.1:4222", {"subject": "s", "window": 0}),
    ("nats://127.0.0.1:4222", {"subject": "s", "stream": "a.b"}),
    ("nats://127.0.0.1:4222", {"subject": "s", "no_such_option": 1}),
    (42, {"subject": "s"}),
])
def test_bad_arguments_leave_the_queue_alone(qdir: str, target: Any, kw: dict[str, Any]) -> None:
    fill(qdir, 0, 10)
    with pytest.raises(ValueError) as ei:
        Forwarder(qdir, target, **kw)
    assert isinstance(ei.value, logq.LogqError) and isinstance(ei.value, ForwardConfigError)
    with logq.open(qdir) as q:
        assert q.next_offset == 10 and q.stats()["groups"] == {}


def test_cli_bad_arguments(qdir: str, tmp_path: Any, capsys: Any) -> None:
    from logq.cli import main
    fill(qdir, 0, 10)
    assert main(["forward", qdir, "--to", "ftp://x:1", "--subject", "s"]) != 0
    assert "nats://HOST:PORT or mqtt://HOST:PORT" in capsys.readouterr().err
    assert main(["forward", qdir, "--to", "mqtt://127.0.0.1:1", "--subject", "s"]) != 0
    assert "topic" in capsys.readouterr().err
    assert main(["forward", str(tmp_path / "nowhere"), "--to", "nats://127.0.0.1:1", "--subject", "s"]) != 0
    assert "no queue directory" in capsys.readouterr().err
    with logq.open(qdir) as q:
        assert q.next_offset == 10 and q.stats()["groups"] == {}


def test_target_shown_without_credentials(qdir: str) -> None:
    fill(qdir, 0, 1)
    fw = Forwarder(qdir, "nats://user:secret@127.0.0.1:4222", subject="s")
    assert fw.stats()["target"] == "nats://127.0.0.1:4222"
    fw = Forwarder(qdir, "mqtt://user:secret@localhost", topic="t")
    assert fw.stats()["target"] == "mqtt://localhost:1883"
    assert "secret" not in repr(fw.stats())


def test_short_duplicate_window_refused(nats_server: Any, qdir: str) -> None:
    async def mkstream() -> None:
        nc, js = await _js(nats_server.url)
        await js.add_stream(name="SHORT", subjects=["edge.s"], duplicate_window=5)
        await nc.close()
    run_async(mkstream())
    fill(qdir, 0, 10)
    with pytest.raises(ForwardConfigError, match="duplicate window of 5s"):
        Forwarder(qdir, nats_server.url, subject="edge.s", **FAST).run(until_idle=True)
    # accepted when asked for explicitly
    st = Forwarder(qdir, nats_server.url, subject="edge.s", duplicate_window=5, **FAST).run(until_idle=True)
    assert st["published_total"] == 10
    with pytest.raises(ForwardConfigError, match="no JetStream stream captures"):
        Forwarder(qdir, nats_server.url, subject="edge.none", group="g2", **FAST).run(until_idle=True)
    assert group_state(qdir, "g2")["acked"] == 0


def test_one_forwarder_per_group(nats_server: Any, qdir: str) -> None:
    fill(qdir, 0, 10)
    a = Forwarder(qdir, nats_server.url, subject="edge.b", stream="BUSY", **FAST).start()
    try:
        helpers.wait_for(lambda: a.stats()["acked_total"] == 10, 30, "the first forwarder")
        with pytest.raises(ForwarderBusyError):
            Forwarder(qdir, nats_server.url, subject="edge.b", stream="BUSY", **FAST).run(until_idle=True)
        # another group is another forwarder
        st = Forwarder(qdir, nats_server.url, subject="edge.b2", stream="BUSY2", group="other",
                       **FAST).run(until_idle=True)
        assert st["published_total"] == 10
    finally:
        a.stop()


def test_import_needs_no_client_libraries(tmp_path: Any) -> None:
    code = ("import sys; sys.modules['nats'] = None; sys.modules['paho'] = None\n"
            "import logq, logq.forward, logq.cli\n"
            "try:\n"
            "    logq.forward.Forwarder(sys.argv[1], 'nats://127.0.0.1:1', subject='s')\n"
            "except ImportError as e:\n"
            "    print('hint:', e)\n")
    os.makedirs(tmp_path / "q")
    rc, out = helpers.run_child(code, str(tmp_path / "imp.log"), str(tmp_path / "q"))
    assert rc == 0 and "pip install 'logq[nats]'" in out, out
    assert sys.modules.get("logq.forward") is not None


def test_buffers_under_the_disk_budget_while_down_and_drains_after(nats_server: Any, qdir: str) -> None:
    """Upstream down from the start, a queue with max_bytes and
    on_full="reject": puts fill the budget and are then refused (nothing
    is deleted that was not forwarded); once the server is up the
    forwarder drains, retention frees the forwarded segments, and puts are
    taken again.  Every accepted message lands once, in order."""
    from logq._index import RESERVE_BYTES
    seg = 64 << 10
    opts = dict(segment_bytes=seg, max_bytes=2 * seg + 3 * RESERVE_BYTES + 8 * seg, on_full="reject")
    nats_server.stop(signal.SIGKILL)
    q = logq.open(qdir, fsync="never", **opts)
    try:
        qid = q.queue_id
        fw = Forwarder(q, nats_server.url, subject="edge.b", stream="BUDGET", window=200, **FAST)
        fw.start()
        try:
            accepted = 0
            with pytest.raises(logq.QueueFullError):
                while True:
                    q.put(body(accepted))
                    accepted += 1
                    assert accepted < 100_000, "max_bytes never refused a put"
            assert fw.stats()["acked_total"] == 0 and not fw.stats()["connected"]
            assert q.stats()["groups"]["forward"]["backlog"] == accepted
            nats_server.start()
            helpers.wait_for(lambda: fw.stats()["acked_total"] >= accepted, 60, "the backlog to drain")
            # forwarded and committed: retention frees room, puts are taken again
            more = 0

            def put_more() -> bool:
                nonlocal more
                try:
                    q.put(body(accepted + more))
                except logq.QueueFullError:
                    return False
                more += 1
                return more >= 50
            helpers.wait_for(put_more, 30, "puts to be taken again after the drain", interval=0.05)
            helpers.wait_for(lambda: fw.stats()["acked_total"] >= accepted + more, 60, "the rest to drain")
        finally:
            fw.stop()
    finally:
        q.close()
    check_stream(nats_server.url, "BUDGET", "edge.b", qid, accepted + more)
