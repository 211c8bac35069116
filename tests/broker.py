"""A private, isolated RabbitMQ node for the test suite, plus a stand-in for an external one."""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import random
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Protocol

# The Debian package keeps the real scripts here; /usr/sbin/rabbitmq-server is a wrapper that
# insists on su-ing to the rabbitmq user and ignores where we want stdout to go.
_DEBIAN_BIN_DIR = Path("/usr/lib/rabbitmq/bin")
_SERVICE_USER = "rabbitmq"
_PLUGINS = ("rabbitmq_management", "rabbitmq_prometheus")
_LOOPBACK = "127.0.0.1"
# Ports are drawn below the kernel's ephemeral range so an outgoing connection can never
# grab one of them between stop() and start() of a restart().
_PORT_FLOOR = 20000
_PORT_FALLBACK_CEILING = 32768
# rabbitmqctl itself listens on a fixed range above the default dist port; keep clear of it.
_CLI_DIST_RANGE = range(35672, 35683)


class BrokerError(RuntimeError):
    """The test broker could not be started, stopped or reached."""


class BrokerHandle(Protocol):
    """What tests may rely on, whether the broker is private or external."""

    @property
    def amqp_url(self) -> str:
        """AMQP URL with credentials."""
        ...

    @property
    def management_url(self) -> str:
        """Base URL of the management HTTP API (no trailing slash)."""
        ...

    def restart(self) -> None:
        """Stop and start the broker keeping its data."""
        ...

    def kill(self) -> None:
        """Hard-kill the broker process."""
        ...


@dataclass(frozen=True)
class BrokerPorts:
    """Loopback ports of one private node, fixed for its whole life so restarts reuse them."""

    amqp: int
    dist: int
    management: int
    prometheus: int


@dataclass(frozen=True)
class ExternalBroker:
    """A broker someone else runs (SLUICE_TEST_AMQP_URL); the suite may not restart or kill it."""

    amqp_url: str
    management_url: str

    def restart(self) -> None:
        """Refuse: restarting a broker the suite does not own would disturb its owner."""
        raise BrokerError(
            "this test restarts the broker, which is only possible with the private broker; "
            "unset SLUICE_TEST_AMQP_URL to let the suite start its own RabbitMQ node"
        )

    def kill(self) -> None:
        """Refuse: killing a broker the suite does not own would disturb its owner."""
        raise BrokerError(
            "this test kills the broker, which is only possible with the private broker; "
            "unset SLUICE_TEST_AMQP_URL to let the suite start its own RabbitMQ node"
        )


def _ephemeral_floor() -> int:
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        return int(text.split()[0])
    except (OSError, ValueError, IndexError):
        return _PORT_FALLBACK_CEILING


def _pick_ports(count: int) -> list[int]:
    """Return `count` distinct loopback ports that are free right now."""
    ceiling = max(_ephemeral_floor(), _PORT_FLOOR + 1000)
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        for _ in range(count * 200):
            if len(ports) == count:
                break
            port = random.randrange(_PORT_FLOOR, ceiling)
            if port in ports or port in _CLI_DIST_RANGE:
                continue
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.bind((_LOOPBACK, port))
            except OSError:
                sock.close()
                continue
            # Holding the sockets until all are picked keeps us from choosing one port twice.
            held.append(sock)
            ports.append(port)
    finally:
        for sock in held:
            sock.close()
    if len(ports) != count:
        raise BrokerError(f"could not find {count} free loopback ports in {_PORT_FLOOR}-{ceiling}")
    return ports


def _find_bin_dir() -> Path:
    if (_DEBIAN_BIN_DIR / "rabbitmq-server").exists():
        return _DEBIAN_BIN_DIR
    found = shutil.which("rabbitmq-server")
    if found is None:
        raise BrokerError(
            "rabbitmq-server is not installed; run scripts/test.sh (it installs it) "
            "or `apt-get install -y rabbitmq-server`, or set SLUICE_TEST_AMQP_URL"
        )
    return Path(found).resolve().parent


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"({path} not readable)"
    return "\n".join(text.splitlines()[-lines:]) or f"({path} is empty)"


class PrivateBroker:
    """A throwaway RabbitMQ node on free loopback ports, with its data in a temp dir."""

    def __init__(
        self,
        *,
        startup_timeout_s: float = 90.0,
        user: str = "guest",
        cookie: str | None = None,
        name_prefix: str = "sluice-test",
    ) -> None:
        self._bin_dir = _find_bin_dir()
        self.startup_timeout_s = startup_timeout_s
        self.node_name = f"{name_prefix}-{os.getpid()}-{secrets.token_hex(3)}@localhost"
        amqp, dist, management, prometheus = _pick_ports(4)
        self.ports = BrokerPorts(amqp, dist, management, prometheus)
        self._user = user
        # Nodes of one cluster must share it (tests/cluster.py); a lone node gets its own.
        self._cookie = cookie or secrets.token_hex(16).upper()
        self.base_dir = Path(tempfile.mkdtemp(prefix="sluice-broker-"))
        self.log_dir = self.base_dir / "log"
        self._console_log = self.log_dir / "console.log"
        self._pid_file = self.base_dir / "node.pid"
        self._proc: subprocess.Popen[bytes] | None = None
        self._closed = False
        # restart() may run in a worker thread (asyncio.to_thread) while Ctrl-C makes the main
        # thread close(); serialising them means close() can never miss a node just started.
        self._lock = threading.RLock()
        # Root must hand everything to the rabbitmq user: the node refuses to run as root.
        self._run_as: str | None = _SERVICE_USER if os.geteuid() == 0 else None
        self._write_files()
        self._env = self._build_env()
        atexit.register(self.close)

    # -- public API -------------------------------------------------------------------------

    @property
    def amqp_url(self) -> str:
        """AMQP URL of the node (guest is allowed over loopback here)."""
        return f"amqp://{self._user}:{self._user}@{_LOOPBACK}:{self.ports.amqp}/"

    @property
    def management_url(self) -> str:
        """Base URL of the management HTTP API."""
        return f"http://{_LOOPBACK}:{self.ports.management}"

    @property
    def prometheus_url(self) -> str:
        """Base URL of the Prometheus scrape endpoint (`/metrics`)."""
        return f"http://{_LOOPBACK}:{self.ports.prometheus}"

    @property
    def log_file(self) -> Path:
        """The node's own log file."""
        return self.log_dir / f"{self.node_name}.log"

    @property
    def running(self) -> bool:
        """Whether the node's OS process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the node and block until it accepts AMQP connections."""
        with self._lock:
            if self._closed:
                raise BrokerError("this PrivateBroker was closed; create a new one")
            if self.running:
                return
            _install_sigterm_as_interrupt()
            with self._console_log.open("ab") as console:
                # A new session keeps the terminal's Ctrl-C away from the node, so the test run
                # shuts it down in order, and lets us kill the whole tree by process group.
                self._proc = subprocess.Popen(
                    [str(self._bin_dir / "rabbitmq-server")],
                    env=self._env,
                    cwd=self.base_dir,
                    stdin=subprocess.DEVNULL,
                    stdout=console,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    user=self._run_as,
                    group=self._run_as,
                    extra_groups=[] if self._run_as else None,
                )
            try:
                self._wait_until_ready()
            except BaseException:
                self._hard_stop()
                raise

    def stop(self) -> None:
        """Stop the node gracefully (data stays for a later start)."""
        with self._lock:
            if self._proc is None:
                return
            if self._proc.poll() is None:
                with contextlib.suppress(BrokerError, subprocess.TimeoutExpired):
                    # `shutdown` returns only once the node's OS process is gone.
                    self.rabbitmqctl("shutdown", timeout_s=60)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._proc.wait(timeout=30)
            self._hard_stop()

    def restart(self) -> None:
        """Stop then start on the same ports and data: durable queues and messages survive."""
        self.stop()
        self.start()

    def kill(self) -> None:
        """Hard-kill the node (SIGKILL to the beam process), as a crash would."""
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                return
            beam_pid = self._beam_pid()
            if beam_pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(beam_pid, signal.SIGKILL)
            self._hard_stop()

    def close(self) -> None:
        """Stop the node and delete its data; safe to call more than once."""
        with self._lock:
            if self._closed:
                return
            try:
                self.stop()
            finally:
                self._closed = True
                atexit.unregister(self.close)
                shutil.rmtree(self.base_dir, ignore_errors=True)

    def rabbitmqctl(self, *args: str, timeout_s: float = 60.0) -> str:
        """Run rabbitmqctl against this node and return its stdout."""
        cmd = [str(self._bin_dir / "rabbitmqctl"), "-n", self.node_name, "-q", *args]
        result = subprocess.run(
            cmd,
            env=self._env,
            cwd=self.base_dir,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout_s,
            user=self._run_as,
            group=self._run_as,
            extra_groups=[] if self._run_as else None,
            check=False,
        )
        if result.returncode != 0:
            raise BrokerError(
                f"rabbitmqctl {' '.join(args)} failed (exit {result.returncode}): "
                f"{result.stderr.decode(errors='replace').strip()}"
            )
        return result.stdout.decode(errors="replace")

    def __enter__(self) -> PrivateBroker:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------------

    def _write_files(self) -> None:
        (self.base_dir / "mnesia").mkdir()
        self.log_dir.mkdir()
        (self.base_dir / "enabled_plugins").write_text(f"[{','.join(_PLUGINS)}].\n")
        (self.base_dir / "rabbitmq.conf").write_text(
            "loopback_users = none\n"
            f"management.tcp.ip = {_LOOPBACK}\n"
            f"management.tcp.port = {self.ports.management}\n"
            f"prometheus.tcp.ip = {_LOOPBACK}\n"
            f"prometheus.tcp.port = {self.ports.prometheus}\n"
            "log.file.level = info\n"
        )
        # Empty on purpose: shields the node from /etc/rabbitmq/rabbitmq-env.conf.
        (self.base_dir / "rabbitmq-env.conf").write_text("")
        # Written before the first start so the node and every rabbitmqctl agree on it; a CLI
        # call racing the node's first boot would otherwise mint a different cookie.
        cookie = self.base_dir / ".erlang.cookie"
        cookie.write_text(self._cookie)
        cookie.chmod(0o400)
        if self._run_as is not None:
            pw = pwd.getpwnam(self._run_as)
            for path in [self.base_dir, *self.base_dir.rglob("*")]:
                os.chown(path, pw.pw_uid, pw.pw_gid)

    def _build_env(self) -> dict[str, str]:
        # Drop inherited RabbitMQ/Erlang settings: an exported RABBITMQ_NODENAME from a shell
        # would otherwise point this node (or rabbitmqctl) at someone else's broker.
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("RABBITMQ_", "ERL_", "CONF_ENV_FILE"))
        }
        d = self.base_dir
        env.update(
            HOME=str(d),  # the Erlang cookie lives in $HOME
            LC_ALL=env.get("LC_ALL") or "C.UTF-8",
            RABBITMQ_NODENAME=self.node_name,
            RABBITMQ_NODE_IP_ADDRESS=_LOOPBACK,
            RABBITMQ_NODE_PORT=str(self.ports.amqp),
            RABBITMQ_DIST_PORT=str(self.ports.dist),
            RABBITMQ_MNESIA_BASE=str(d / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.log_dir),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(d / "enabled_plugins"),
            RABBITMQ_CONFIG_FILE=str(d / "rabbitmq"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(d / "advanced.config"),
            RABBITMQ_CONF_ENV_FILE=str(d / "rabbitmq-env.conf"),
            RABBITMQ_PID_FILE=str(self._pid_file),
            # Erlang distribution listens on all interfaces unless told otherwise.
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
            # Only matters if this node is the one that starts epmd.
            ERL_EPMD_ADDRESS=_LOOPBACK,
        )
        return env

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        last_error = "no attempt yet"
        # await_startup fails fast while the node is not yet reachable, so retry it.
        while True:
            self._raise_if_exited()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._fail(f"not ready within {self.startup_timeout_s:.0f}s ({last_error})")
            try:
                self.rabbitmqctl(
                    "await_startup",
                    "--timeout",
                    str(max(1, int(remaining))),
                    timeout_s=remaining + 5,
                )
                break
            except (BrokerError, subprocess.TimeoutExpired) as exc:
                last_error = str(exc)
                time.sleep(0.5)
        while not self._accepts_amqp():
            self._raise_if_exited()
            if time.monotonic() > deadline:
                self._fail(f"booted but port {self.ports.amqp} does not accept AMQP connections")
            time.sleep(0.1)

    def _accepts_amqp(self) -> bool:
        try:
            with socket.create_connection((_LOOPBACK, self.ports.amqp), timeout=1):
                return True
        except OSError:
            return False

    def _raise_if_exited(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            self._fail(f"the node process exited with code {self._proc.returncode}")

    def _fail(self, why: str) -> None:
        raise BrokerError(
            f"private RabbitMQ node {self.node_name} failed to start: {why}\n"
            f"--- tail of {self.log_file} ---\n{_tail(self.log_file)}\n"
            f"--- tail of {self._console_log} ---\n{_tail(self._console_log)}"
        )

    def _beam_pid(self) -> int | None:
        try:
            return int(self._pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def _is_our_beam(self, pid: int) -> bool:
        # Guards against a stale pid file whose pid now belongs to an unrelated process.
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
        return self.node_name.encode() in cmdline

    def _hard_stop(self) -> None:
        """Make sure nothing of the node survives: SIGKILL its whole process group."""
        proc = self._proc
        if proc is None:
            return
        # The group outlives the script's pid only via children (beam, erl_child_setup),
        # so kill the group even if the top process already exited.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        beam_pid = self._beam_pid()
        if beam_pid is not None and self._is_our_beam(beam_pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(beam_pid, signal.SIGKILL)
        self._pid_file.unlink(missing_ok=True)
        self._proc = None


def _interrupt_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _install_sigterm_as_interrupt() -> None:
    """Treat SIGTERM like Ctrl-C so pytest aborts the run and its teardown stops the node."""
    with contextlib.suppress(ValueError):  # ValueError: not the main thread
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _interrupt_on_sigterm)
