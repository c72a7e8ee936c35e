"""The network model: frames on one link arrive in order (TCP), a lost frame costs one RTO and
holds up the frames behind it, and the latency quantiles are the ones asked for."""

from __future__ import annotations

import random

from eplb.sim.network import Network, NetworkModel


def test_frames_on_a_link_arrive_in_order_and_a_loss_holds_up_the_ones_behind_it():
    net = Network(NetworkModel(loss=1.0), random.Random(0))
    first = net.deliver(1, 0, 0.0, 100)
    assert first >= 0.200  # one RTO
    net.model = NetworkModel(loss=0.0)
    second = net.deliver(1, 0, 0.001, 100)
    assert second >= first  # behind the retransmitted frame
    other_link = net.deliver(2, 0, 0.001, 100)
    assert other_link < 0.01  # another connection is not held up
    assert net.retransmissions == 1


def test_latency_quantiles_match_the_model():
    model = NetworkModel(one_way_p50_s=100e-6, one_way_p99_s=500e-6)
    net = Network(model, random.Random(1))
    draws = sorted(net.latency() for _ in range(20000))
    assert abs(draws[10000] / 100e-6 - 1) < 0.05
    assert abs(draws[19800] / 500e-6 - 1) < 0.1
    p50, p99 = net.rtt_quantiles()
    assert 150e-6 < p50 < 250e-6 and 500e-6 < p99 < 1e-3


def test_the_nic_serializes_large_frames():
    net = Network(NetworkModel(bandwidth_Bps=1e9), random.Random(0))
    a = net.deliver(0, 1, 0.0, 10_000_000)  # 10 ms on the wire
    b = net.deliver(0, 2, 0.0, 10_000_000)  # waits for the first to leave the leader's NIC
    assert a >= 0.010 and b >= 0.020
