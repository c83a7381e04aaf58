"""Real upstream servers for the forwarder's tests: ``nats-server -js`` and
``mosquitto``, each on 127.0.0.1 and a free port, with its own store
directory and configuration, started and stopped by the test.

The binaries come from Debian's packages; when one is missing it is
installed (``apt-get install -y nats-server mosquitto``, as .ci/run does),
and if that is impossible :func:`ensure_installed` raises with what to do.
Nothing here listens on or connects to anything but the loopback address.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from typing import Any

PACKAGES = ("nats-server", "mosquitto")
HOST = "127.0.0.1"


def _which(binary: str) -> str | None:
    found = shutil.which(binary)
    if found:
        return found
    for d in ("/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"):
        path = os.path.join(d, binary)
        if os.access(path, os.X_OK):
            return path
    return None


class ServiceUnavailable(RuntimeError):
    """A server binary is missing and could not be installed."""


def ensure_installed() -> dict[str, str]:
    """The paths of ``nats-server`` and ``mosquitto``, installing the Debian
    packages first when one is missing."""
    paths = {b: _which(b) for b in PACKAGES}
    if all(paths.values()):
        return paths  # type: ignore[return-value]
    cmd = "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq " + " ".join(PACKAGES)
    why = ""
    if os.geteuid() != 0:
        why = "not running as root"
    else:
        try:
            r = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, timeout=600)
            if r.returncode != 0:
                why = f"exit code {r.returncode}: {(r.stderr or r.stdout)[-2000:]}"
        except (OSError, subprocess.SubprocessError) as e:
            why = repr(e)
    paths = {b: _which(b) for b in PACKAGES}
    if not all(paths.values()):
        missing = [b for b, p in paths.items() if not p]
        raise ServiceUnavailable(f"the forwarder tests need {', '.join(missing)} and could not install it "
                                 f"({why or 'installed, but not found'}); run as root: {cmd}")
    return paths  # type: ignore[return-value]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.2):
            return True
    except OSError:
        return False


class _Server:
    """A server process with a fixed port and store that can be stopped and
    started again (an outage) and is always stopped at ``close``."""

    name = "server"

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        os.makedirs(workdir, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None
        self._log_start = 0

    def argv(self) -> list[str]:
        raise NotImplementedError

    def start(self, timeout: float = 20.0) -> None:
        assert self.proc is None, "already running"
        self._log = open(os.path.join(self.workdir, f"{self.name}.log"), "ab")
        self._log_start = self._log.tell()
        self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, cwd=self.workdir)
        end = time.monotonic() + timeout
        while not _port_open(self.port):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.output()}")
            if time.monotonic() > end:
                raise RuntimeError(f"{self.name} did not listen on {HOST}:{self.port} within {timeout}s:\n"
                                   f"{self.output()}")
            time.sleep(0.02)
        self.ready()

    def ready(self) -> None:
        pass

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None
        end = time.monotonic() + timeout
        while _port_open(self.port) and time.monotonic() < end:
            time.sleep(0.02)

    close = stop

    def output(self, since_start: bool = False) -> str:
        try:
            with open(os.path.join(self.workdir, f"{self.name}.log"), "rb") as f:
                if since_start:
                    f.seek(self._log_start)
                return f.read()[-4000:].decode(errors="replace")
        except OSError:
            return "<no output>"


class NatsServer(_Server):
    """``nats-server -js`` on 127.0.0.1 with its store in ``workdir/js``."""

    name = "nats-server"

    def __init__(self, workdir: str, jetstream: bool = True) -> None:
        super().__init__(workdir)
        self.jetstream = jetstream
        self.binary = ensure_installed()["nats-server"]

    @property
    def url(self) -> str:
        return f"nats://{HOST}:{self.port}"

    def argv(self) -> list[str]:
        args = [self.binary, "-a", HOST, "-p", str(self.port)]
        if self.jetstream:
            args += ["-js", "-sd", os.path.join(self.workdir, "js")]
        return args

    def ready(self) -> None:
        # The client port opens before JetStream has recovered its streams.
        if not self.jetstream:
            return
        end = time.monotonic() + 20
        while "Server is ready" not in self.output(since_start=True):
            if time.monotonic() > end:
                raise RuntimeError(f"nats-server never said it was ready:\n{self.output()}")
            time.sleep(0.02)


class Mosquitto(_Server):
    """``mosquitto`` on 127.0.0.1 with its own config, and persistence in
    ``workdir`` (so a restart keeps sessions and queued messages)."""

    name = "mosquitto"

    def __init__(self, workdir: str) -> None:
        super().__init__(workdir)
        self.binary = ensure_installed()["mosquitto"]
        self.conf = os.path.join(workdir, "mosquitto.conf")
        lines = [f"listener {self.port} {HOST}", "allow_anonymous true", "persistence true",
                 f"persistence_location {workdir}/", "persistence_file mosquitto.db",
                 "max_queued_messages 0", "max_inflight_messages 20", "log_dest stdout",
                 "log_type error", "log_type warning"]
        if os.geteuid() == 0:
            lines.append("user root")       # keep access to our own directory
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n")

    @property
    def url(self) -> str:
        return f"mqtt://{HOST}:{self.port}"

    def argv(self) -> list[str]:
        return [self.binary, "-c", self.conf]
