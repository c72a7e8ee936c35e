"""The simulator drives the real cores at 18 nodes x 8 ranks in seconds of wall time: same seed,
same result; a clean epoch commits; a dead node aborts the epoch in flight and is noticed within
the node timeout; loss delays epochs but never breaks invariant I1 (checked from the workers'
states)."""

from __future__ import annotations

import dataclasses

from eplb.sim.cluster import (Costs, EpochTrace, Scenario, Simulation, SimResult,
                              nodes_timed_out)
from eplb.sim.cores import AbortCause
from eplb.sim.network import NetworkModel

FIXED = Costs(measured=False)  # deterministic CPU charges: same seed, same virtual times


def scenario(**kw) -> Scenario:
    # 16 layers (two copy chunks of 8): the planner and the PLAN checks are quicker than at 58
    return Scenario(**{"nodes": 18, "epochs": 2, "costs": FIXED, "num_layers": 16, **kw})


def run(sc: Scenario) -> tuple[Simulation, SimResult]:
    sim = Simulation(sc)
    return sim, sim.run()


def assert_all_or_none(sim: Simulation, res: SimResult) -> None:
    """I1 from the workers' side: per epoch, every rank started its copies at the same S, or
    none did; a committed epoch is applied by every live rank."""
    assert res.violations == []
    ranks = range(sim.sc.world_size)
    for h in res.history:
        trace = res.traces.get(h.epoch, EpochTrace(h.epoch))
        if h.outcome == "committed":
            assert set(trace.copied_at) == set(ranks), h
            assert set(trace.copied_at.values()) == {h.switch_step}, h
            assert trace.promised == set(ranks), h
        elif h.outcome == "aborted":
            assert trace.copied_at == {}, h
    last = max((h.epoch for h in res.history if h.outcome == "committed"), default=0)
    assert all(sim.ranks[r].port.applied_epoch == last for r in ranks if sim.ranks[r].alive)


def test_same_seed_same_result_different_seed_differs():
    a = run(scenario(seed=3))[1].summary()
    b = run(scenario(seed=3))[1].summary()
    c = run(scenario(seed=4))[1].summary()
    assert a == b
    assert a != c


def test_epochs_commit_on_a_clean_network():
    sim, res = run(scenario())
    assert [h.outcome for h in res.history] == ["committed", "committed"]
    assert_all_or_none(sim, res)
    assert res.failures == [] and res.node_lost == []
    for trace in res.traces.values():
        assert trace.holds == 0
        assert trace.needed_margin is not None and trace.needed_margin <= trace.margin
    # the leader's own PREPARE -> COMMIT, in virtual ms: a few round trips plus its queue
    assert all(0 < h.agreement_ms < 20 for h in res.history)


def test_a_dead_node_aborts_the_epoch_in_flight_and_is_noticed_within_the_node_timeout():
    sc = scenario(epochs=1, dead_node=17, dead_at_epoch=1)
    sim, res = run(sc)
    assert [h.outcome for h in res.history] == ["aborted"]
    assert res.history[0].cause is AbortCause.RANK_LEFT
    assert [node for node, _ in res.node_lost] == [17]
    noticed = res.node_lost[0][1] - res.dead_at
    # its last heartbeat came at most one heartbeat period before it died
    assert sc.node_timeout_s - sc.heartbeat_s <= noticed <= sc.node_timeout_s + 2 * sc.tick_s
    assert_all_or_none(sim, res)
    assert res.failures == []  # no rank held past its hold timeout: the ABORT reached them


def test_loss_delays_epochs_but_never_breaks_all_or_none():
    clean = run(scenario(epochs=3))[1]
    sim, res = run(scenario(epochs=3, network=NetworkModel(loss=0.02)))
    assert res.retransmissions > 0
    assert_all_or_none(sim, res)
    assert any(h.outcome == "committed" for h in res.history)
    slowest = max(t.last_commit_at - t.prepare_sent for t in res.traces.values()
                  if t.commit_steps)
    fastest_clean = max(t.last_commit_at - t.prepare_sent for t in clean.traces.values())
    assert slowest >= sim.sc.network.rto_s > fastest_clean  # one retransmission at least


def test_the_all_or_none_check_catches_a_rank_copying_unpromised():
    sim = Simulation(dataclasses.replace(scenario(nodes=2), epochs=0))
    sim.traces[1] = EpochTrace(1, promised=set(range(15)))  # rank 15 never promised
    sim._check_i1(0, 1)
    assert sim.violations and "never promised" in sim.violations[0]


def test_node_timeout_rule():
    assert nodes_timed_out(10.0, {1: 6.9, 2: 7.1, 3: 9.0}, 3.0) == [1]
