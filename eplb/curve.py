"""CURVE keys for the TCP link between sidecars (ZeroMQ's CurveZMQ: encryption, and mutual
authentication: the leader serves only followers whose public key it knows, and a follower
completes the handshake only with a server that holds the leader's secret key).

One directory holds ZeroMQ certificate files (the format of :mod:`zmq.auth`), made by
``eplbctl keys DIR --nodes N``:

- ``leader.key_secret``: the leader's key pair; ``leader.key``: its public half, which every
  follower needs to authenticate the leader.
- ``node-K.key_secret`` for each follower node ``K`` in ``1 .. N-1``: node K's own key pair;
  ``node-K.key``: its public half, which the leader needs.

What each node needs: the leader (node 0) ``leader.key_secret`` and every ``node-K.key``; node K
``leader.key`` and ``node-K.key_secret``. The leader names each authenticated connection by the
file its key came from (``node-K``) and accepts from it only frames that speak for node K.

Legacy layout: one shared ``node.key_secret`` for every follower (``node.key`` on the leader).
It still works, but any holder of it can pose as any node, so both sides warn at start.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.auth

LEADER = "leader"
#: The legacy shared follower key: its holder may speak for any node.
SHARED = "node"
_NODE_FILE = re.compile(r"node-(\d+)")

HINT = "run `eplbctl keys DIR --nodes N` and pass --curve-keys DIR"


class CurveKeyError(RuntimeError):
    """The keys are missing or unreadable; the message says how to make them."""


def node_name(node: int) -> str:
    """The certificate name and the ZAP User-Id of follower ``node``: ``node-K``."""
    return f"node-{node}"


def node_of(user_id: str) -> int | None:
    """The node a User-Id names (``node-3`` -> 3); None for anything else (``node``: shared)."""
    m = _NODE_FILE.fullmatch(user_id)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class CurveKeys:
    """What one sidecar needs (z85-encoded keys, as pyzmq takes them).

    Attributes:
        public, secret: this sidecar's key pair (the leader's, or this follower's).
        leader_public: the key followers expect the leader to hold.
        authorized: leader only: follower public key -> User-Id (``node-K``, or ``node`` for the
            legacy shared key, which may speak for any node).
        shared: a legacy shared follower key is in use (any holder can pose as any node).
        warnings: things to log at start (missing node keys, ignored files).
    """

    public: bytes
    secret: bytes
    leader_public: bytes
    authorized: dict[bytes, str] = field(default_factory=dict)
    shared: bool = False
    warnings: tuple[str, ...] = ()


def key_files(nodes: int) -> list[str]:
    """The file names ``eplbctl keys --nodes N`` writes, in order."""
    names = [LEADER] + [node_name(k) for k in range(1, nodes)]
    return [f"{who}.{ext}" for who in names for ext in ("key", "key_secret")]


def create_keys(directory: Path, nodes: int) -> list[Path]:
    """Write the leader's key pair and one pair per follower (``node-1`` .. ``node-{nodes-1}``)
    into ``directory`` (created 0700; secret files 0600). Refuses to overwrite existing keys.
    Returns the files written."""
    if nodes < 2:
        raise CurveKeyError(f"--nodes {nodes}: a cluster with keys has at least 2 nodes (a single "
                            "node uses no TCP link)")
    directory = Path(directory)
    names = [directory / f for f in key_files(nodes)]
    existing = [str(p) for p in names if p.exists()]
    if existing:
        raise CurveKeyError(f"refusing to overwrite existing keys: {', '.join(existing)}; "
                            "remove them first or choose another directory")
    _require_curve()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    for who in [LEADER] + [node_name(k) for k in range(1, nodes)]:
        _, secret_file = zmq.auth.create_certificates(str(directory), who)
        os.chmod(secret_file, 0o600)
    return names


def load_keys(directory: Path, node: int, num_nodes: int) -> CurveKeys:
    """The keys of the sidecar of ``node`` (0: the leader) from ``directory``.

    Raises:
        CurveKeyError: a file is missing or not a certificate, two files hold one key, or libzmq
            lacks CURVE.
    """
    _require_curve()
    directory = Path(directory)
    if node == 0:
        return _load_leader(directory, num_nodes)
    own = directory / f"{node_name(node)}.key_secret"
    shared = directory / f"{SHARED}.key_secret"
    warnings: tuple[str, ...] = ()
    if not own.exists() and shared.exists():
        own = shared
        warnings = (f"using the shared follower key {shared}: whoever holds it can pose as any "
                    f"node; give each node its own key ({HINT}, then copy leader.key and "
                    f"{node_name(node)}.key_secret to node {node})",)
    elif not own.exists():
        raise CurveKeyError(f"no {own.name} in {directory}: node {node} needs its own key pair "
                            f"and leader.key; {HINT} on one machine and copy leader.key and "
                            f"{own.name} to this node")
    public, secret = _load(own, secret=True)
    leader_public = _load(directory / f"{LEADER}.key", secret=False)[0]
    if public == leader_public:
        raise CurveKeyError(f"{own} holds the leader's key; {HINT}")
    assert secret is not None
    warnings += tuple(filter(None, [exposed_secret_warning(own)]))
    return CurveKeys(public, secret, leader_public, shared=own == shared, warnings=warnings)


def _load_leader(directory: Path, num_nodes: int) -> CurveKeys:
    public, secret = _load(directory / f"{LEADER}.key_secret", secret=True)
    assert secret is not None
    authorized: dict[bytes, str] = {}
    warnings: list[str] = list(filter(None, [exposed_secret_warning(
        directory / f"{LEADER}.key_secret")]))
    try:
        certs = sorted(directory.glob("*.key"))
    except OSError as exc:
        raise CurveKeyError(f"cannot list the public certificates in {directory}: {exc}") from None
    for path in certs:
        who = path.name.removesuffix(".key")
        if who == LEADER:
            continue
        k = node_of(who)
        if who != SHARED and (k is None or not 0 < k < num_nodes):
            warnings.append(f"ignoring {path}: only node-1.key .. node-{num_nodes - 1}.key (and "
                            f"the legacy shared node.key) authorize followers (--num-nodes "
                            f"{num_nodes})")
            continue
        key = _load(path, secret=False)[0]
        if key == public:
            raise CurveKeyError(f"{path} holds the leader's own public key; {HINT}")
        if key in authorized:
            raise CurveKeyError(f"{path} and {authorized[key]}.key hold the same public key, so "
                                f"the leader could not tell those nodes apart; {HINT}")
        authorized[key] = who
    if not authorized:
        raise CurveKeyError(f"no follower public key (node-K.key) in {directory}; {HINT}")
    missing = [k for k in range(1, num_nodes) if node_name(k) not in authorized.values()]
    shared = SHARED in authorized.values()
    if missing and not shared:
        warnings.append(f"no key for node(s) {missing} in {directory} (node-K.key): those nodes "
                        "cannot join")
    if shared:
        warnings.append(f"{directory / (SHARED + '.key')} (the legacy shared follower key) is "
                        "authorized: whoever holds node.key_secret can pose as any node; "
                        f"{HINT} and remove node.key")
    return CurveKeys(public, secret, public, authorized, shared=shared, warnings=tuple(warnings))


def exposed_secret_warning(path: Path) -> str | None:
    """A warning if the secret key file ``path`` is readable by more users than need it: by
    others, or by its group when this user owns it (a file of another owner, root say, that this
    user reads through its group, as deploy/ sets it up, is fine). None if it is private."""
    try:
        info = Path(path).stat()
    except OSError:
        return None
    mode = stat.S_IMODE(info.st_mode)
    ours = info.st_uid == os.getuid()
    if not (mode & 0o004 or (ours and mode & 0o040)):
        return None
    who = "every user on this machine" if mode & 0o004 else "its group"
    fix = f"chmod 600 {path}" if ours else f"chmod o-rwx {path}"
    return (f"secret key {path} (mode {mode:04o}) is readable by {who}, who could pose as this "
            f"node on the TCP link; it is used anyway: run `{fix}`")


def _load(path: Path, secret: bool) -> tuple[bytes, bytes | None]:
    try:
        public, secret_key = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise CurveKeyError(f"cannot read CURVE certificate {path}: {exc}; {HINT}") from None
    if not _valid(public) or (secret and not _valid(secret_key)):
        raise CurveKeyError(f"{path} holds no valid CURVE {'key pair' if secret else 'public key'}"
                            f"; {HINT}")
    return public, secret_key


def _valid(key: bytes | None) -> bool:
    return key is not None and len(key) == 40


def _require_curve() -> None:
    if not zmq.has("curve"):
        raise CurveKeyError("this libzmq was built without CURVE; install pyzmq's wheels, which "
                            "include it")
