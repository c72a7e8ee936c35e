"""Network namespaces and veth pairs of one mesh run, and their removal.

Layout for ``N`` nodes (run prefix ``eplbm-<pid>``, the creating process's id, so names are
unique per run and a run whose creator died can be told apart):

- ``<prefix>-hub``: the relay's namespace.
- ``<prefix>-n<k>``, ``k`` in ``0 .. N-1``: node ``k`` (sidecar and workers); node 0 leads.
- One veth pair per node, created straight into the two namespaces (the root namespace never
  holds either end): ``eplbm0`` in the node's namespace, address ``10.77.k.2/30``, and
  ``eplbmh<k>`` in the hub, ``10.77.k.1/30``. No routing and no forwarding: a node reaches only
  its hub-side address, where the relay listens; the relay reaches the leader at ``10.77.0.2``.

Taking node ``k``'s ``eplbm0`` down (inside its namespace) cuts it off; its TCP connections stay
open and resume (after the kernel's retransmission backoff) when it is up again.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import time

log = logging.getLogger("eplb.mesh.netns")

PREFIX = "eplbm"
NODE_IF = "eplbm0"
MAX_NODES = 250
_RUN = re.compile(rf"{PREFIX}-(\d+)-")


class NetnsError(RuntimeError):
    """An ``ip`` command failed; the message has its output."""


def ip(*args: str, timeout_s: float = 10.0, check: bool = True) -> str:
    """Run ``ip ARGS``; its stdout. Raises NetnsError on failure when ``check``."""
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=timeout_s)
    if check and proc.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def list_namespaces() -> list[str]:
    """Names of every network namespace ``ip netns`` knows."""
    return [line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()]


def netns_available() -> str | None:
    """None if this process can create namespaces and veth pairs; else why not."""
    if os.geteuid() != 0:
        return "needs root (ip netns add)"
    try:
        ip("netns", "list", timeout_s=5.0)
    except (OSError, subprocess.SubprocessError, NetnsError) as exc:
        return f"`ip netns` unusable: {exc}"
    return None


def node_address(k: int) -> str:
    """Node ``k``'s own address (in its namespace)."""
    return f"10.77.{k}.2"


def hub_address(k: int) -> str:
    """The hub's address on node ``k``'s link (where node k reaches the relay)."""
    return f"10.77.{k}.1"


class Topology:
    """The namespaces of one run. Create with :meth:`create`; :meth:`destroy` removes them (and
    ends any process still inside, by pid); safe to call more than once.

    Args:
        nodes: number of nodes (1 leader + followers).
        prefix: name prefix of this run's namespaces.
    """

    def __init__(self, nodes: int, prefix: str | None = None) -> None:
        if not 1 <= nodes <= MAX_NODES:
            raise ValueError(f"nodes must lie in [1, {MAX_NODES}]")
        self.nodes = nodes
        self.prefix = prefix or f"{PREFIX}-{os.getpid()}"
        self.hub = f"{self.prefix}-hub"
        self.created: list[str] = []

    def ns(self, k: int) -> str:
        return f"{self.prefix}-n{k}"

    def exec_prefix(self, namespace: str) -> list[str]:
        """Prepend to a command to run it in ``namespace`` (``ip netns exec`` execs it, so the
        child's pid is the command's)."""
        return ["ip", "netns", "exec", namespace]

    def create(self) -> None:
        for name in [self.hub] + [self.ns(k) for k in range(self.nodes)]:
            ip("netns", "add", name)
            self.created.append(name)
            ip("-n", name, "link", "set", "lo", "up")
        for k in range(self.nodes):
            hub_if = f"{PREFIX}h{k}"
            ip("link", "add", NODE_IF, "netns", self.ns(k), "type", "veth", "peer", "name", hub_if,
               "netns", self.hub)
            ip("-n", self.ns(k), "addr", "add", f"{node_address(k)}/30", "dev", NODE_IF)
            ip("-n", self.hub, "addr", "add", f"{hub_address(k)}/30", "dev", hub_if)
            ip("-n", self.ns(k), "link", "set", NODE_IF, "up")
            ip("-n", self.hub, "link", "set", hub_if, "up")
        log.info("created %d namespaces (%s-*)", len(self.created), self.prefix)

    def set_link(self, k: int, up: bool) -> None:
        """Take node ``k``'s link up or down, inside its namespace."""
        ip("-n", self.ns(k), "link", "set", NODE_IF, "up" if up else "down")

    def destroy(self) -> list[str]:
        """End what still runs inside this run's namespaces (by pid) and delete them. Returns
        problems (empty when all went)."""
        return remove_namespaces([n for n in list_namespaces_safe() if n.startswith(self.prefix + "-")])


def list_namespaces_safe() -> list[str]:
    try:
        return list_namespaces()
    except (OSError, subprocess.SubprocessError, NetnsError):
        return []


def remove_namespaces(names: list[str], timeout_s: float = 5.0) -> list[str]:
    """Kill the processes inside ``names`` (SIGTERM, then SIGKILL after ``timeout_s``), then
    delete the namespaces. Returns problems."""
    problems: list[str] = []
    pids: set[int] = set()
    for name in names:
        try:
            pids |= {int(p) for p in ip("netns", "pids", name, check=False).split()}
        except (OSError, subprocess.SubprocessError, ValueError):
            pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = {p for p in pids if _alive(p)}
        for p in alive:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout_s
        while alive and time.monotonic() < deadline:
            alive = {p for p in alive if _alive(p)}
            time.sleep(0.05)
        if not alive:
            break
    for name in names:
        try:
            ip("netns", "del", name)
        except (OSError, subprocess.SubprocessError, NetnsError) as exc:
            problems.append(str(exc))
    return problems


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def remove_stale(prefix: str = PREFIX) -> list[str]:
    """Delete namespaces of earlier runs whose creating process is gone (``eplbm-<pid>-*``, pid
    dead), ending what still runs in them. Returns the names removed."""
    stale = []
    for name in list_namespaces_safe():
        m = _RUN.match(name)
        if m and name.startswith(prefix) and not _alive(int(m.group(1))):
            stale.append(name)
    if stale:
        log.warning("removing namespaces of dead runs: %s", ", ".join(stale))
        remove_namespaces(stale)
    return stale
