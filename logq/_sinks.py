"""The upstreams a forwarder publishes to (``forward``): NATS JetStream
and MQTT.  A sink connects (checking what the promises need of the
upstream: a stream that captures the subject, its duplicate window),
sends one message with its acknowledgement pending, and closes; any
failure of the link is raised as ``LinkLost``.  The clients (nats-py,
paho-mqtt) are imported only when a sink connects."""

from __future__ import annotations

import asyncio
import importlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from logq._consumer import Message
from logq._errors import ForwardConfigError

if TYPE_CHECKING:
    from logq.forward import ForwardOptions

log = logging.getLogger("logq")

SCHEMES = ("nats", "mqtt")


def check_installed(sink: Any) -> None:
    """ImportError, naming the extra to install, if ``sink``'s client
    library (its ``client``: module, message) is missing."""
    module, message = sink.client
    try:
        importlib.import_module(module)
    except ImportError:
        raise ImportError(message) from None


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str
    port: int
    user: str | None
    password: str | None

    @property
    def public(self) -> str:
        """The URL without credentials."""
        return f"{self.scheme}://{self.host}:{self.port}"


def parse_target(url: str) -> Target:
    """``nats://[user:pass@]host[:port]`` or ``mqtt://...``; ValueError
    (ForwardConfigError) naming what is wrong."""
    if not isinstance(url, str):
        raise ForwardConfigError(f"the target must be a URL string, not {type(url).__name__}")
    try:
        u = urlsplit(url)
        port = u.port
    except ValueError as e:
        raise ForwardConfigError(f"bad target URL {url!r}: {e}") from None
    if u.scheme not in SCHEMES:
        raise ForwardConfigError(f"the target must be nats://HOST:PORT or mqtt://HOST:PORT, not {url!r}")
    if not u.hostname:
        raise ForwardConfigError(f"the target URL {url!r} has no host")
    if u.path not in ("", "/") or u.query or u.fragment:
        raise ForwardConfigError(f"the target URL {url!r} must not have a path or query "
                                 "(give the subject or topic separately)")
    if port is None:
        port = 4222 if u.scheme == "nats" else 1883
    return Target(u.scheme, u.hostname, port, u.username, u.password)


def check_subject(subject: Any) -> None:
    if not isinstance(subject, str) or not subject or any(c in subject for c in " \t\r\n*>") \
            or "" in subject.split("."):
        raise ForwardConfigError(f"a NATS subject is needed (no spaces, wildcards or empty tokens), "
                                 f"not {subject!r}")


def check_topic(topic: Any) -> None:
    if not isinstance(topic, str) or not topic or any(c in topic for c in "#+\0"):
        raise ForwardConfigError(f"an MQTT topic is needed (no wildcards), not {topic!r}")


class Entry:
    """A message on its way: the logq message and, once sent, the pending
    acknowledgement."""
    __slots__ = ("m", "fut", "sent")

    def __init__(self, m: Message) -> None:
        self.m = m
        self.fut: Any = None
        self.sent = 0.0


class LinkLost(Exception):
    """The connection failed (a reason in the message): drop it, send the window again."""


# -- sinks: one per protocol; each connects, sends one message, closes -----------------
class NatsSink:
    kind = "nats"

    def __init__(self, target: Target, subject: str, opts: ForwardOptions, queue_id: str) -> None:
        check_subject(subject)
        self.target, self.subject, self.opts = target, subject, opts
        self.prefix = f"{queue_id}:"
        self.nc: Any = None
        self.js: Any = None
        self.stream: str | None = opts.stream
        self.lost: str | None = None

    client = ("nats", "forwarding to NATS needs nats-py: pip install 'logq[nats]'")

    async def connect(self) -> tuple[str | None, int] | None:
        """Connect, check the stream; the Nats-Msg-Id and stream sequence of
        the subject's last message in the stream ((None, 0) if there is
        none; None if the resume check is off)."""
        import nats
        from nats.js.errors import NotFoundError
        self.lost = None
        t, o = self.target, self.opts

        async def on_gone(*_a: Any) -> None:
            self.lost = self.lost or "connection to NATS lost"

        errors: list[Exception] = []

        async def on_error(e: Exception) -> None:
            errors.append(e)
            log.debug("logq forward: NATS client error: %r", e)

        # (max_reconnect_attempts=0 would mean "forever": one retry, at once,
        # then NoServersError; the forwarder does its own backing off.)
        try:
            self.nc = await nats.connect(f"nats://{t.host}:{t.port}", user=t.user, password=t.password,
                                         allow_reconnect=False, max_reconnect_attempts=1,
                                         reconnect_time_wait=0.01, connect_timeout=o.connect_timeout,
                                         disconnected_cb=on_gone, closed_cb=on_gone, error_cb=on_error,
                                         name="logq-forward")
        except Exception as e:
            if errors:
                raise LinkLost(describe(errors[-1])) from e
            raise
        self.js = self.nc.jetstream(timeout=o.connect_timeout, publish_async_max_pending=o.window + 1)
        await self._check_stream(NotFoundError)
        if not o.resume_check:
            return None
        try:
            last = await self.js.get_last_msg(self.stream, self.subject)
        except NotFoundError:
            return None, 0
        return (last.headers or {}).get("Nats-Msg-Id"), last.seq or 0

    async def _check_stream(self, not_found: type[BaseException]) -> None:
        o = self.opts
        if o.stream is None:
            try:
                self.stream = await self.js.find_stream_name_by_subject(self.subject)
            except not_found:
                raise ForwardConfigError(f"no JetStream stream captures subject {self.subject!r} on "
                                         f"{self.target.public}: create one, or pass stream=NAME "
                                         "(--stream) to have the forwarder create it") from None
        try:
            info = await self.js.stream_info(self.stream)
        except not_found:
            await self.js.add_stream(name=self.stream, subjects=[self.subject], storage="file",
                                     duplicate_window=o.duplicate_window)
            log.info("logq forward: created stream %s (subject %s, duplicate window %gs)",
                     self.stream, self.subject, o.duplicate_window)
            return
        if o.stream is not None:
            owner = await self.js.find_stream_name_by_subject(self.subject)
            if owner != self.stream:
                raise ForwardConfigError(f"stream {self.stream!r} does not capture subject {self.subject!r} "
                                         f"(stream {owner!r} does)")
        have = info.config.duplicate_window or 0
        if have + 1e-6 < o.duplicate_window:
            raise ForwardConfigError(
                f"stream {self.stream!r} has a duplicate window of {have:g}s, shorter than the "
                f"{o.duplicate_window:g}s asked for: a forwarder restarted later than that after a crash "
                f"could store duplicates.  Raise the stream's window (nats stream edit {self.stream} "
                f"--dupe-window), or accept the shorter one (duplicate_window={have:g})")

    async def send(self, e: Entry) -> None:
        e.fut = await self.js.publish_async(self.subject, e.m.data,
                                            headers={"Nats-Msg-Id": self.msg_id(e.m)})

    @staticmethod
    def outcome(fut: Any) -> bool:
        """Whether the upstream reported a duplicate (raises the publish's error)."""
        return bool(fut.result().duplicate)

    def msg_id(self, m: Message) -> str:
        # The offset alone is not an identity: recovery may cut a tail that
        # was never durable, and new records then reuse its offsets.  The
        # write timestamp tells a new record from the one forwarded before
        # the cut, which the stream's duplicate window would otherwise take
        # it for and drop.
        return f"{self.prefix}{m.offset}:{m.ts_ns}"

    async def close(self) -> None:
        nc, self.nc, self.js = self.nc, None, None
        if nc is not None:
            try:
                await asyncio.wait_for(nc.close(), self.opts.connect_timeout)
            except Exception:  # noqa: BLE001 - closing a broken connection
                pass


class MqttSink:
    kind = "mqtt"

    def __init__(self, target: Target, topic: str, opts: ForwardOptions, queue_id: str, group: str) -> None:
        check_topic(topic)
        self.target, self.topic, self.opts = target, topic, opts
        self.client_id = opts.client_id or f"logq-forward-{queue_id[:12]}-{group}"[:64]
        self.client = None
        self.lost: str | None = None
        self._futs: dict[int, Any] = {}

    client: Any = ("paho.mqtt.client", "forwarding to MQTT needs paho-mqtt: pip install 'logq[mqtt]'")

    async def connect(self) -> None:
        import paho.mqtt.client as mqtt
        loop = asyncio.get_running_loop()
        self.lost = None
        self._futs = {}
        connected = loop.create_future()
        t, o = self.target, self.opts
        try:
            client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id,  # type: ignore[attr-defined]
                                 clean_session=True, protocol=mqtt.MQTTv311)
        except AttributeError:      # paho-mqtt 1.x
            client = mqtt.Client(client_id=self.client_id, clean_session=True, protocol=mqtt.MQTTv311)
        client.max_inflight_messages_set(o.window)
        client.max_queued_messages_set(0)
        if t.user is not None:
            client.username_pw_set(t.user, t.password)

        def settle(fut: Any, value: Any) -> None:
            if not fut.done():
                fut.set_result(value)

        def on_connect(_c: Any, _u: Any, _flags: Any, rc: Any, *_p: Any) -> None:
            loop.call_soon_threadsafe(settle, connected, rc)

        def on_disconnect(_c: Any, _u: Any, *args: Any) -> None:
            loop.call_soon_threadsafe(self._gone, "connection to the MQTT broker lost")

        def on_publish(_c: Any, _u: Any, mid: int, *_rest: Any) -> None:
            loop.call_soon_threadsafe(self._acked, mid)

        client.on_connect, client.on_disconnect, client.on_publish = on_connect, on_disconnect, on_publish
        self.client = client
        # paho's own thread does the network I/O; its automatic reconnects
        # are not used (the forwarder reconnects with a new client).
        await loop.run_in_executor(None, lambda: client.connect(t.host, t.port, o.keepalive))
        client.loop_start()
        rc = await asyncio.wait_for(connected, o.connect_timeout)
        if rc != 0:
            raise LinkLost(f"the MQTT broker refused the connection: {rc}")
        return None

    def _gone(self, why: str) -> None:
        self.lost = self.lost or why

    def _acked(self, mid: int) -> None:
        fut = self._futs.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(False)

    async def send(self, e: Entry) -> None:
        fut = asyncio.get_running_loop().create_future()
        info = self.client.publish(self.topic, e.m.data, qos=self.opts.qos)
        if info.rc != 0:
            raise LinkLost(f"MQTT publish failed: {info.rc}")
        # (the PUBACK's callback runs in this loop, after this: no race)
        self._futs[info.mid] = fut
        e.fut = fut

    @staticmethod
    def outcome(fut: Any) -> bool:
        return bool(fut.result())

    def msg_id(self, m: Message) -> str:
        return ""

    async def close(self) -> None:
        client, self.client = self.client, None
        if client is None:
            return
        for fut in self._futs.values():
            fut.cancel()
        self._futs = {}

        def stop() -> None:
            try:
                client.disconnect()
            finally:
                client.loop_stop()
        try:
            await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(None, stop),
                                   self.opts.connect_timeout)
        except Exception:  # noqa: BLE001 - closing a broken connection
            pass


def describe(e: BaseException) -> str:
    text = str(e)
    if isinstance(e, LinkLost):
        return text
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
