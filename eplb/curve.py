"""CURVE keys for the TCP link between sidecars (ZeroMQ's CurveZMQ: encryption, and the leader
serves only followers whose public key it knows).

One directory holds ZeroMQ certificate files (the format of :mod:`zmq.auth`), made by
``eplbctl keys DIR``:

- ``leader.key_secret``: the leader's key pair; ``leader.key``: its public half, which followers
  need to reach it.
- ``node.key_secret``: the key pair followers present; ``node.key``: its public half.

The leader serves a follower only when the follower's public key is in one of the public
certificates (``*.key``) of the directory, so a node can also get a key pair of its own: add its
``.key`` file to the leader's directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

LEADER = "leader"
NODE = "node"


class CurveKeyError(RuntimeError):
    """The keys are missing or unreadable; the message says how to make them."""


@dataclass(frozen=True)
class CurveKeys:
    """What one sidecar needs (z85-encoded keys, as pyzmq takes them).

    Attributes:
        public, secret: this sidecar's key pair (the leader's, or the followers').
        leader_public: the key followers expect the leader to hold.
        authorized: leader only: the public keys of followers it serves.
    """

    public: bytes
    secret: bytes
    leader_public: bytes
    authorized: frozenset[bytes]


def create_keys(directory: Path) -> list[Path]:
    """Write a leader key pair and a follower key pair into ``directory`` (created 0700; secret
    files 0600). Refuses to overwrite existing keys. Returns the files written."""
    directory = Path(directory)
    names = [directory / f"{who}.{ext}" for who in (LEADER, NODE) for ext in ("key", "key_secret")]
    existing = [str(p) for p in names if p.exists()]
    if existing:
        raise CurveKeyError(f"refusing to overwrite existing keys: {', '.join(existing)}; "
                            "remove them first or choose another directory")
    _require_curve()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    for who in (LEADER, NODE):
        _, secret_file = zmq.auth.create_certificates(str(directory), who)
        os.chmod(secret_file, 0o600)
    return names


def load_keys(directory: Path, leader: bool) -> CurveKeys:
    """The keys of the leader (``leader=True``) or of a follower, from ``directory``.

    Raises:
        CurveKeyError: a file is missing or not a certificate, or libzmq lacks CURVE.
    """
    _require_curve()
    directory = Path(directory)
    own = LEADER if leader else NODE
    public, secret = _load(directory / f"{own}.key_secret", secret=True)
    leader_public = public if leader else _load(directory / f"{LEADER}.key", secret=False)[0]
    authorized: frozenset[bytes] = frozenset()
    if leader:
        try:
            certs = zmq.auth.load_certificates(str(directory))
        except (OSError, ValueError) as exc:
            raise CurveKeyError(f"cannot read the public certificates in {directory}: {exc}") from None
        authorized = frozenset(k for k in certs if k != public)
        if not authorized:
            raise CurveKeyError(f"no follower public key (*.key besides leader.key) in {directory}; "
                                "eplbctl keys writes node.key")
    return CurveKeys(public, secret, leader_public, authorized)


def _load(path: Path, secret: bool) -> tuple[bytes, bytes | None]:
    hint = "create the keys with `eplbctl keys DIR` and point --curve-keys at DIR"
    try:
        public, secret_key = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise CurveKeyError(f"cannot read CURVE certificate {path}: {exc}; {hint}") from None
    if not _valid(public) or (secret and not _valid(secret_key)):
        raise CurveKeyError(f"{path} holds no valid CURVE {'key pair' if secret else 'public key'}"
                            f"; {hint}")
    return public, secret_key


def _valid(key: bytes | None) -> bool:
    return key is not None and len(key) == 40


def _require_curve() -> None:
    if not zmq.has("curve"):
        raise CurveKeyError("this libzmq was built without CURVE; install pyzmq's wheels, which "
                            "include it")
