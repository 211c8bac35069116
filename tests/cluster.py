"""A private three-node RabbitMQ cluster on this machine, for the node-loss tests.

Each node is a `PrivateBroker` (tests/broker.py) with its own node name, ports and data
directory; they share one Erlang cookie and are joined as an operator would
(`rabbitmqctl stop_app; join_cluster; start_app`).
"""

from __future__ import annotations

import atexit
import secrets
import threading
import time
from types import TracebackType
from urllib.parse import quote

import httpx
from broker import BrokerError, PrivateBroker

# Queue leader (3.10 calls it `leader`, 3.8 `node`): the member that takes every write.
_LEADER_FIELDS = ("leader", "node")


class BrokerCluster:
    """Three (or `size`) private RabbitMQ nodes joined into one cluster."""

    def __init__(self, size: int = 3, *, startup_timeout_s: float = 120.0) -> None:
        if size < 1:
            raise ValueError("a cluster has at least one node")
        cookie = secrets.token_hex(16).upper()
        self.nodes: tuple[PrivateBroker, ...] = tuple(
            PrivateBroker(
                startup_timeout_s=startup_timeout_s, cookie=cookie, name_prefix=f"sluice-n{i}"
            )
            for i in range(size)
        )
        self._closed = False
        atexit.register(self.close)

    # -- what tests use, as they use a `BrokerHandle` ---------------------------------------

    @property
    def amqp_url(self) -> str:
        """Every node's AMQP URL, comma separated, as `SLUICE_AMQP_URL` takes them."""
        return ",".join(node.amqp_url for node in self.nodes)

    @property
    def management_url(self) -> str:
        """The management API of the first node still running (any node answers for all)."""
        return self.live_nodes()[0].management_url

    def restart(self) -> None:
        """Refuse: a whole-cluster restart is not what these tests are about."""
        raise BrokerError("restart one node of the cluster with node.restart()")

    def kill(self) -> None:
        """Refuse: say which node to kill with `kill_node`."""
        raise BrokerError("kill one node of the cluster with kill_node(node)")

    # -- cluster ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start every node and join the others to the first; blocks until all run."""
        first, *others = self.nodes
        errors: list[BaseException] = []

        def boot(node: PrivateBroker) -> None:
            try:
                node.start()
            except BaseException as exc:  # re-raised in the calling thread
                errors.append(exc)

        # Booting in parallel halves the wait; joining stays one node at a time.
        threads = [threading.Thread(target=boot, args=(node,)) for node in self.nodes]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        for node in others:
            node.rabbitmqctl("stop_app")
            node.rabbitmqctl("join_cluster", first.node_name)
            node.rabbitmqctl("start_app")
            node.rabbitmqctl("await_startup")
        self.wait_for_members(len(self.nodes))

    def live_nodes(self) -> list[PrivateBroker]:
        """The nodes whose process runs, in their order."""
        live = [node for node in self.nodes if node.running]
        if not live:
            raise BrokerError("no node of the cluster is running")
        return live

    def node_named(self, name: str) -> PrivateBroker:
        """The node with this Erlang node name (`sluice-n0-...@localhost`)."""
        for node in self.nodes:
            if node.node_name == name:
                return node
        raise BrokerError(f"no node of this cluster is called {name!r}")

    def running_members(self) -> set[str]:
        """The node names the cluster itself says are running."""
        info = self._management("/api/nodes")
        if not isinstance(info, list):
            raise BrokerError(f"unexpected answer for the cluster's nodes: {info!r}")
        return {str(n["name"]) for n in info if n.get("running")}

    def wait_for_members(self, count: int, deadline_s: float = 60.0) -> None:
        """Wait until the cluster reports `count` running members."""
        deadline = time.monotonic() + deadline_s
        while len(members := self.running_members()) < count:
            if time.monotonic() > deadline:
                raise BrokerError(f"only {sorted(members)} of {count} nodes joined")
            time.sleep(0.5)

    def queue_info(self, queue: str, vhost: str = "/") -> dict[str, object]:
        """A queue as the management API describes it."""
        found = self._management(f"/api/queues/{quote(vhost, safe='')}/{quote(queue, safe='')}")
        if not isinstance(found, dict):
            raise BrokerError(f"unexpected answer for queue {queue!r}: {found!r}")
        return found

    def leader_of(self, queue: str, vhost: str = "/") -> PrivateBroker:
        """The node that leads a quorum queue right now."""
        info = self.queue_info(queue, vhost)
        for field in _LEADER_FIELDS:
            name = info.get(field)
            if isinstance(name, str) and name:
                return self.node_named(name)
        raise BrokerError(f"the management API names no leader for {queue!r}: {info!r}")

    def members_of(self, queue: str, vhost: str = "/") -> list[str]:
        """The node names holding a replica of a quorum queue."""
        members = self.queue_info(queue, vhost).get("members")
        return [str(m) for m in members] if isinstance(members, list) else []

    def kill_node(self, node: PrivateBroker) -> None:
        """`kill -9` one node, as a crashed host would."""
        node.kill()

    def close(self) -> None:
        """Stop and delete every node; safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        # In parallel: each node's graceful stop waits several seconds for itself alone.
        threads = [threading.Thread(target=node.close) for node in self.nodes]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def __enter__(self) -> BrokerCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _management(self, path: str) -> object:
        last: Exception | None = None
        # A node just killed may still be first in line for a moment: ask the others.
        for node in self.live_nodes():
            try:
                answer = httpx.get(
                    f"{node.management_url}{path}", auth=("guest", "guest"), timeout=10
                )
                answer.raise_for_status()
                body: object = answer.json()
                return body
            except httpx.HTTPError as exc:
                last = exc
        raise BrokerError(f"no node's management API answered {path}: {last!r}")
