"""Listener addresses: ``unix:/abs/path.sock``, ``HOST:PORT`` and ``[V6]:PORT``."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import random
import socket
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

log = logging.getLogger("outrider.listeners")


class ListenError(Exception):
    """An address that cannot be listened on; the message says which and why."""


@dataclass(frozen=True, slots=True)
class Address:
    unix_path: str | None = None
    host: str = ""
    port: int = 0

    @property
    def is_unix(self) -> bool:
        return self.unix_path is not None

    def grpc_target(self) -> str:
        if self.unix_path is not None:
            return f"unix:{self.unix_path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def __str__(self) -> str:
        return self.grpc_target()


def parse_address(text: str) -> Address:
    """Parse one ``--listen``/``--admin`` value; raise ValueError with what was expected."""
    text = text.strip()
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if path.startswith("//"):  # tolerate unix:///abs/path
            path = path[2:]
        if not path.startswith("/"):
            raise ValueError(f"{text!r}: a unix socket path must be absolute (unix:/abs/path.sock)")
        if len(path.encode()) > 107:
            raise ValueError(f"{text!r}: unix socket path is longer than 107 bytes")
        return Address(unix_path=path)
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"{text!r}: expected [V6]:PORT")
    else:
        host, sep, port = text.rpartition(":")
        if not sep or ":" in host:
            raise ValueError(f"{text!r}: expected unix:/abs/path.sock, HOST:PORT or [V6]:PORT")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r}: port must be a number from 0 to 65535")
    return Address(host=host or "0.0.0.0", port=int(port))


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ListenError(f"{what} {path}: cannot read: {exc.strerror or exc}") from None


def _stamp(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
    except OSError:
        return (-1, -1)
    return (st.st_mtime_ns, st.st_size)


@dataclass(frozen=True, slots=True)
class ServerTLS:
    """TLS for the gRPC listeners: a certificate chain and key, and optionally the CA
    that client certificates must chain to (then a client without one is refused).

    The files are read again when they change (checked as each new connection arrives),
    so a rotated certificate (a Kubernetes Secret update) is served without a restart,
    as envoyproxy/ratelimit's certificate provider does.
    """

    cert: Path
    key: Path
    client_ca: Path | None = None

    def check(self) -> None:
        """Read every file once: a missing or unreadable one is an error at start-up."""
        self._configuration()

    def _files(self) -> tuple[Path, ...]:
        return (self.cert, self.key, *((self.client_ca,) if self.client_ca else ()))

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        ca = _read(self.client_ca, "client CA") if self.client_ca else None
        pair = (_read(self.key, "TLS key"), _read(self.cert, "TLS certificate"))
        return grpc.ssl_server_certificate_configuration([pair], root_certificates=ca)

    def credentials(self) -> grpc.ServerCredentials:
        seen = [tuple(_stamp(p) for p in self._files())]
        initial = self._configuration()

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            now = tuple(_stamp(p) for p in self._files())
            if now == seen[0]:
                return None
            try:
                config = self._configuration()
            except ListenError as exc:
                log.error("TLS files changed but cannot be used, keeping the old ones: %s", exc)
                return None
            seen[0] = now
            log.info("TLS certificate reloaded from %s", self.cert)
            return config

        return grpc.dynamic_ssl_server_credentials(
            initial, fetch, require_client_authentication=self.client_ca is not None
        )


def prepare_unix_path(path: str) -> None:
    """Make ``path`` bindable: replace a stale socket file, refuse a live one.

    A socket file nobody accepts on (left by a crashed process) is removed; one
    that accepts a connection belongs to a running server and is an error, so
    two instances never silently steal each other's traffic.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if not p.exists() and not p.is_symlink():
        return
    # A symlink is how the worker supervisor publishes a worker's socket; a dangling one
    # (its worker gone) is stale like a dead socket.
    if not p.is_socket() and not p.is_symlink():
        raise ListenError(f"unix:{path}: exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(0.5)
    try:
        probe.connect(path)
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
            return
        raise ListenError(f"unix:{path}: cannot check the existing socket: {exc}") from exc
    else:
        raise ListenError(
            f"unix:{path}: another process is listening on this socket; "
            "stop it or choose another --listen path"
        )
    finally:
        probe.close()


def set_socket_mode(address: Address, mode: int | None) -> None:
    if address.unix_path is not None and mode is not None:
        os.chmod(address.unix_path, mode)


def remove_unix_socket(address: Address) -> None:
    if address.unix_path is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(address.unix_path)


def _ephemeral_low(default: int = 32768) -> int:
    """The lowest port the kernel hands out to outgoing connections and ``bind(0)``."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return default


#: Where :func:`free_port` records the ports it handed out, shared by every process on
#: the machine that picks ports with it (tests, pytest-xdist workers, ``outrider up``,
#: the benchmarks): one empty file per port, its mtime the time of the pick.
#: ``OUTRIDER_PORT_RESERVATIONS`` names another directory.
PORT_RESERVATIONS = Path(tempfile.gettempdir()) / "outrider-ports"
#: How long a picked port stays reserved. It covers the gap between the pick and the
#: bind (a process starting on a busy machine) and a restart on the same port; a port
#: still bound after that is skipped anyway, because the probe bind fails.
RESERVATION_SECONDS = 600.0

_reserved_here: dict[int, float] = {}  # this process's picks (when the directory is unusable)
_reserved_lock = threading.Lock()


def _reserve(ports: Sequence[int], now: float) -> bool:
    """Claim ``ports`` (all or none) unless someone claimed one less than the TTL ago."""
    directory = Path(os.environ.get("OUTRIDER_PORT_RESERVATIONS") or PORT_RESERVATIONS)
    with _reserved_lock:
        try:
            directory.mkdir(mode=0o777, exist_ok=True)
            with open(directory / ".lock", "a+b") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
                for port in ports:
                    try:
                        age = now - (directory / str(port)).stat().st_mtime
                    except FileNotFoundError:
                        continue
                    if age < RESERVATION_SECONDS:
                        return False
                for port in ports:
                    (directory / str(port)).touch()
                    os.utime(directory / str(port), (now, now))
            return True
        except OSError:  # no usable shared directory (read-only /tmp, ...): this process only
            taken = [p for p in ports if now - _reserved_here.get(p, 0.0) < RESERVATION_SECONDS]
            if taken:
                return False
            _reserved_here.update(dict.fromkeys(ports, now))
            return True


def _bindable(family: int, host: str, port: int) -> bool:
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1", *, also: Sequence[int] = (), attempts: int = 500) -> int:
    """A TCP port nobody listens on now and nobody else was given, for a process about
    to be started on it. ``also``: offsets of more ports the caller needs free with it
    (a Redis cluster node's bus port is ``port + 10000``).

    Two safeguards against "Address already in use" between the pick and the bind:

    - The port is below the kernel's ephemeral range: a port from ``bind(0)`` sits in
      that range, so any outgoing connection made meanwhile (a health check, a parallel
      test) could take it.
    - The pick is recorded in :data:`PORT_RESERVATIONS` under a file lock, and no caller
      in any process is given that port again for :data:`RESERVATION_SECONDS`: two
      pytest-xdist workers, or two services of one ``outrider up``, never get the same
      port. (Before, each call only checked that the port could be bound at that moment,
      so two calls could return the same port before either process bound it.)
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    low, high = 10000, _ephemeral_low() - max((0, *also))
    rng = random.SystemRandom()
    for _ in range(attempts):
        if high - low > 1000:
            port = rng.randrange(low, high)
        else:  # an unusual ephemeral range: the kernel's pick (still reserved)
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((host, 0))
                port = int(s.getsockname()[1])
        ports = [port, *(port + d for d in also)]
        if any(p > 65535 for p in ports):
            continue
        if not all(_bindable(family, host, p) for p in ports):
            continue
        if _reserve(ports, time.time()):
            return port
    raise OSError(f"no free port found on {host} in {attempts} attempts ({low}-{high})")
