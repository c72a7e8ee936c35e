"""The simulator drives the real cores (leader, one follower per node, one worker agreement per
rank) at 18 nodes x 8 ranks in seconds of wall time: same seed, same result; a clean epoch
commits on both paths, and per-node aggregation spares the leader frames; a dead node aborts the
epoch in flight and the leader core loses it within its node time-out; loss delays epochs but
never breaks invariant I1 (checked from the workers' states)."""

from __future__ import annotations

import dataclasses

import pytest

from eplb.sim.cluster import Costs, EpochTrace, Scenario, Simulation, SimResult
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


@pytest.mark.parametrize("aggregate", [True, False], ids=["per-node", "per-worker"])
def test_epochs_commit_on_a_clean_network(aggregate: bool):
    sim, res = run(scenario(aggregate=aggregate))
    assert [h.outcome for h in res.history] == ["committed", "committed"]
    assert_all_or_none(sim, res)
    assert res.failures == [] and res.node_lost == []
    for trace in res.traces.values():
        assert trace.holds == 0
        assert trace.needed_margin is not None and trace.needed_margin <= trace.margin
    # the leader's own PREPARE -> COMMIT, in virtual ms: a few round trips plus its queue
    assert all(0 < h.agreement_ms < 20 for h in res.history)


def test_a_dead_node_aborts_the_epoch_in_flight_and_the_leader_core_loses_it_in_time():
    sc = scenario(epochs=1, dead_node=17, dead_at_epoch=1)
    sim, res = run(sc)
    assert [h.outcome for h in res.history] == ["aborted"]
    assert res.history[0].cause is AbortCause.NODE_LOST  # the core's own node time-out
    assert [node for node, _ in res.node_lost] == [17]
    assert 17 not in sim.leader.followers()
    noticed = res.node_lost[0][1] - res.dead_at
    # its last frame reached the leader at most one heartbeat period before it died (its PLAN
    # answers never left it), and the core's tick runs every tick_s
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


def test_ranks_joining_on_the_clock_teach_their_follower_s_aggregator_through_the_welcome():
    """Without the joins before the clock: NODE_HELLO and the HELLOs go up on the clock, the
    WELCOMEs come down through the followers, whose aggregators then answer for their ranks."""
    sim, res = run(scenario(epochs=1, prejoin=False))
    assert [h.outcome for h in res.history] == ["committed"]
    assert res.failures == [] and res.node_lost == []
    assert_all_or_none(sim, res)
    for follower in sim.followers.values():
        assert follower.core.aggregator.joined == set(sim.node_ranks[follower.node])
    assert res.leader_msgs.get("NODE_PROMISES", 0) >= sim.sc.nodes - 1


def test_the_all_or_none_check_catches_a_rank_copying_unpromised():
    sim = Simulation(dataclasses.replace(scenario(nodes=2), epochs=0))
    sim.traces[1] = EpochTrace(1, promised=set(range(15)))  # rank 15 never promised
    sim._check_i1(0, 1)
    assert sim.violations and "never promised" in sim.violations[0]


def test_aggregation_commits_every_epoch_with_fewer_frames_at_the_leader():
    """18 x 8 on a clean network: the per-node path commits every epoch, as the per-worker path
    does, and the leader handles fewer messages (NODE_COUNTS / NODE_ACKS / NODE_PROMISES /
    NODE_DONE, one per node, where the per-worker path relays the ranks' own frames)."""
    epochs = 3
    node_sim, node = run(scenario(epochs=epochs, aggregate=True))
    worker_sim, worker = run(scenario(epochs=epochs, aggregate=False))
    for sim, res in ((node_sim, node), (worker_sim, worker)):
        assert [h.outcome for h in res.history] == ["committed"] * epochs
        assert res.failures == [] and res.node_lost == []
        assert_all_or_none(sim, res)
    followers = node_sim.sc.nodes - 1
    for kind in ("NODE_ACKS", "NODE_PROMISES", "NODE_DONE"):
        assert node.leader_msgs.get(kind, 0) >= followers * epochs  # every node answered
        assert kind not in worker.leader_msgs
    assert node.leader_msgs.get("NODE_COUNTS", 0) > 0 and "NODE_COUNTS" not in worker.leader_msgs
    assert sum(node.leader_msgs.values()) < sum(worker.leader_msgs.values())
    assert node.leader_frames < worker.leader_frames  # what the leader decodes
    # what the per-node path still relays is what its aggregator does not hold (the workers'
    # heartbeats): fewer RELAYs than the per-worker path's, which carry every frame
    assert node.leader_msgs["RELAY"] < worker.leader_msgs["RELAY"]
