"""The network between the simulated nodes: one-way latency per frame, loss as TCP sees it, and
each node's NIC as a serial resource. No sockets; times are virtual seconds.

Each node's NIC sends one frame at a time (``bandwidth_Bps``); the receiving side is not
modelled (the leader takes in far less than it sends: COUNTS of 8,000 ranks are ~0.7 GB/s, a PLAN
broadcast to 999 followers is 999 frames). Per link (one direction between a follower and the
leader) frames arrive in the order they were sent, as on one TCP connection: a frame's arrival
is its own latency draw, but never before the frame sent ahead of it. A lost segment is not a
lost frame on TCP: it arrives one retransmission timeout (RTO) late, and holds up every frame
behind it on that link (head-of-line blocking). Loss is drawn per frame, not per segment: a
multi-megabyte PLAN is as likely to be delayed as a heartbeat.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class NetworkModel:
    """Intra-datacenter defaults: one-way latency lognormal with p50 0.1 ms and p99 0.5 ms
    (round trip p50 ~0.2 ms, p99 ~0.75 ms, see :meth:`Network.rtt_quantiles`).

    Args:
        one_way_p50_s, one_way_p99_s: lognormal one-way latency between two nodes.
        loss: probability that a frame needs a retransmission.
        rto_s: what one retransmission costs (Linux's minimum RTO, 200 ms).
        ipc_s: a worker to its own node's sidecar and back the other way (ipc socket).
        bandwidth_Bps: each NIC, each direction, bytes per second (100 Gbit/s).
        slow_extra_s: extra one-way delay of every frame to or from the slow node.
    """

    one_way_p50_s: float = 100e-6
    one_way_p99_s: float = 500e-6
    loss: float = 0.0
    rto_s: float = 0.200
    ipc_s: float = 30e-6
    bandwidth_Bps: float = 12.5e9
    slow_extra_s: float = 1e-3

    @property
    def sigma(self) -> float:
        return math.log(self.one_way_p99_s / self.one_way_p50_s) / 2.3263478740408408

    def describe(self) -> str:
        return (f"one-way lognormal p50 {self.one_way_p50_s * 1e3:g} ms / p99 "
                f"{self.one_way_p99_s * 1e3:g} ms, loss {self.loss:g} (RTO "
                f"{self.rto_s * 1e3:g} ms), {self.bandwidth_Bps * 8 / 1e9:g} Gbit/s NICs")


class Network:
    """Delivery times between nodes. ``slow``: the node whose frames are delayed, or None."""

    def __init__(self, model: NetworkModel, rng: random.Random, slow: int | None = None) -> None:
        self.model = model
        self.rng = rng
        self.slow = slow
        self._mu = math.log(model.one_way_p50_s)
        self._sigma = model.sigma
        self._last: dict[tuple[int, int], float] = {}  # (src, dst) -> last arrival on the link
        self._nic_out: dict[int, float] = {}  # node -> when its NIC is free to send
        self.retransmissions = 0
        self.bytes_sent = 0

    def latency(self) -> float:
        return self.rng.lognormvariate(self._mu, self._sigma)

    def deliver(self, src: int, dst: int, sent: float, nbytes: int) -> float:
        """When a frame of ``nbytes`` that node ``src`` hands to its socket at ``sent`` is
        received by node ``dst`` (``src != dst``)."""
        m = self.model
        wire = nbytes / m.bandwidth_Bps
        depart = max(sent, self._nic_out.get(src, 0.0)) + wire
        self._nic_out[src] = depart
        arrive = depart + self.latency()
        if self.slow is not None and self.slow in (src, dst):
            arrive += m.slow_extra_s
        if m.loss and self.rng.random() < m.loss:
            arrive += m.rto_s
            self.retransmissions += 1
        link = (src, dst)
        arrive = max(arrive, self._last.get(link, 0.0))
        self._last[link] = arrive
        self.bytes_sent += nbytes
        return arrive

    def rtt_quantiles(self, samples: int = 20000, seed: int = 1) -> tuple[float, float]:
        """p50 and p99 of a round trip (two one-way draws, no loss), seconds."""
        rng = random.Random(seed)
        rtts = sorted(rng.lognormvariate(self._mu, self._sigma)
                      + rng.lognormvariate(self._mu, self._sigma) for _ in range(samples))
        return rtts[samples // 2], rtts[int(samples * 0.99)]
