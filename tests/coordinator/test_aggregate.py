"""Example-based tests of :class:`NodeAggregator` (a follower answering for its node) and of the
leader-side :func:`expand` / :func:`node_counts_for_window`. Plain values, a clock that is a number."""

from __future__ import annotations

import torch

from eplb.coordinator.aggregate import (AggregatorConfig, NodeAggregator, PassThrough, SendUp,
                                        expand, node_counts_for_window)
from eplb.coordinator.leader import LeaderConfig, LeaderCore
from eplb.placement.rules import default_placement, placement_hash
from eplb.proto import (Abort, Bye, Commit, Counts, Done, Heartbeat, Hello, NodeAcks, NodeCounts,
                        NodeDone, NodePromises, OutcomeQuery, Plan, PlanAck, Prepare, Promise, Refuse,
                        decode, encode)

L, E, P = 3, 4, 8
NODE = 1
RANKS = (4, 5, 6)
CFG = AggregatorConfig(counts_wait_factor=2.0, counts_wait_min_s=0.1, counts_wait_max_s=3.0,
                       answer_wait_s=0.5)


def aggregator(ranks=RANKS) -> NodeAggregator:
    agg = NodeAggregator(NODE, CFG)
    assert agg.set_joined(ranks, 0.0) == []
    return agg


def counts(rank: int, lo: int, hi: int, value: int = 1) -> Counts:
    return Counts(rank=rank, from_step=lo, to_step=hi,
                  counts=torch.full((L, E), value, dtype=torch.int64) * (rank + 1))


def sent(outputs) -> list:
    """The node messages, each through the wire and back (what the leader decodes)."""
    assert all(isinstance(o, (SendUp, PassThrough)) for o in outputs)
    return [decode(encode(o.msg)) for o in outputs if isinstance(o, SendUp)]


def plan(epoch: int = 3) -> Plan:
    p = default_placement(L, E, P)
    return Plan(epoch=epoch, phys2log=p, plan_hash=placement_hash(p), layers_per_chunk=1)


# --- counts -------------------------------------------------------------------------------------

def test_counts_go_up_once_summed_when_every_joined_rank_contributed():
    agg = aggregator()
    assert agg.on_worker(counts(4, 0, 64), 1.0) == []
    assert agg.on_worker(counts(5, 0, 64), 1.01) == []
    [msg] = sent(agg.on_worker(counts(6, 0, 64), 1.02))
    assert isinstance(msg, NodeCounts) and msg.node == NODE
    assert (msg.ranks, msg.steps, msg.from_step, msg.to_step) == (RANKS, (64, 64, 64), 0, 64)
    assert torch.equal(msg.counts, torch.full((L, E), 5 + 6 + 7, dtype=torch.int64))
    assert agg.held == 0 and agg.next_deadline() is None


def test_a_slow_rank_does_not_hold_the_node_counts_past_the_bounded_wait():
    agg = aggregator()
    agg.on_worker(counts(4, 0, 64), 10.0)
    agg.on_worker(counts(5, 0, 64), 10.2)
    assert agg.next_deadline() == 10.0 + CFG.counts_wait_max_s  # no interval measured yet
    assert agg.on_tick(12.9) == []
    [partial] = sent(agg.on_tick(13.0))
    assert partial.ranks == (4, 5) and int(partial.counts[0, 0]) == 5 + 6
    [late] = sent(agg.on_worker(counts(6, 0, 64), 14.0))  # the straggler goes up at once
    assert late.ranks == (6,) and int(late.counts[0, 0]) == 7 and (late.from_step, late.to_step) == (0, 64)
    assert agg.held == 0
    assert [type(o) for o in agg.on_worker(counts(6, 0, 64), 14.1)] == [PassThrough]  # a duplicate


def test_the_counts_wait_follows_twice_the_flush_interval_seen():
    agg = aggregator(ranks=(4,))
    for i in range(4):
        agg.on_worker(counts(4, 64 * i, 64 * (i + 1)), 1.0 + 0.4 * i)
    assert abs(agg.counts_wait_s() - 0.8) < 1e-9
    agg.set_joined((4, 5), 3.0)
    agg.on_worker(counts(4, 256, 320), 3.0)
    assert agg.next_deadline() == 3.0 + agg.counts_wait_s()


def test_a_rank_leaving_releases_the_counts_waiting_for_it_and_its_progress_is_reported():
    agg = aggregator()
    agg.on_worker(Heartbeat(rank=4, step=70), 0.5)
    agg.on_worker(counts(4, 0, 64), 1.0)
    agg.on_worker(counts(5, 0, 64), 1.0)
    [msg] = sent(agg.on_left(6, 1.1))
    assert msg.ranks == (4, 5) and msg.steps == (70, 64)


def test_ranged_rounds_are_not_mixed_and_unjoined_or_misshaped_frames_pass_through():
    agg = aggregator(ranks=(4, 5))
    agg.on_worker(counts(4, 0, 64), 1.0)
    agg.on_worker(counts(5, 0, 128), 1.0)  # this rank skipped a snapshot: another round
    assert agg.held == 2
    odd = Counts(rank=5, from_step=0, to_step=64, counts=torch.ones(L + 1, E, dtype=torch.int64))
    stranger = counts(9, 0, 64)
    for msg in (odd, stranger):
        assert agg.on_worker(msg, 1.1) == [PassThrough(msg)]


def test_at_most_max_rounds_are_held():
    agg = NodeAggregator(NODE, AggregatorConfig(max_rounds=2))
    agg.set_joined((4, 5), 0.0)
    assert agg.on_worker(counts(4, 0, 1), 0.0) == [] and agg.on_worker(counts(4, 1, 2), 0.0) == []
    [oldest] = sent(agg.on_worker(counts(4, 2, 3), 0.0))
    assert (oldest.from_step, oldest.to_step, oldest.ranks) == (0, 1, (4,))


# --- agreement answers --------------------------------------------------------------------------

def test_one_node_acks_once_every_rank_acked_and_it_expands_to_the_exact_plan_acks():
    agg = aggregator()
    assert agg.on_leader(plan(), 0.0) == []
    acks = [PlanAck(rank=r, epoch=3, step=100 + r) for r in RANKS]
    assert agg.on_worker(acks[0], 0.1) == [] and agg.on_worker(acks[1], 0.1) == []
    [msg] = sent(agg.on_worker(acks[2], 0.1))
    assert isinstance(msg, NodeAcks) and msg.steps_by_rank == {4: 104, 5: 105, 6: 106}
    assert expand(msg) == acks
    late = PlanAck(rank=4, epoch=3, step=200)
    assert agg.on_worker(late, 0.2) == [PassThrough(late)]  # every rank answered: acks are over


def test_a_refusal_goes_up_at_once_with_the_promises_held_so_far():
    agg = aggregator()
    agg.on_leader(plan(), 0.0)
    assert agg.on_worker(Promise(rank=5, epoch=3), 1.0) == []
    refuse = Refuse(rank=4, epoch=3, step=140, reason="already at step 140 >= S=120")
    [msg] = sent(agg.on_worker(refuse, 1.0))
    assert isinstance(msg, NodePromises)
    assert msg.promised == (5,) and msg.refused == ((4, 140, refuse.reason, refuse.code),)
    assert expand(msg) == [refuse, Promise(rank=5, epoch=3)]


def test_promises_are_never_claimed_for_a_rank_that_did_not_promise():
    agg = aggregator()
    agg.on_leader(plan(), 0.0)
    agg.on_worker(Promise(rank=4, epoch=3), 1.0)
    assert agg.on_tick(1.49) == []
    [partial] = sent(agg.on_tick(1.5))  # answer_wait_s: what is known goes up
    assert partial.promised == (4,) and partial.refused == ()
    [rest] = sent(agg.on_left(6, 1.6) + agg.on_worker(Promise(rank=5, epoch=3), 1.7))
    assert rest.promised == (5,)
    assert agg.on_worker(Promise(rank=5, epoch=3), 1.8)[0] == PassThrough(Promise(rank=5, epoch=3))


def test_a_rank_leaving_while_awaited_sends_what_is_known():
    agg = aggregator()
    agg.on_leader(plan(), 0.0)
    agg.on_worker(PlanAck(rank=4, epoch=3, step=9), 0.1)
    agg.on_worker(PlanAck(rank=5, epoch=3, step=9), 0.1)
    [msg] = sent(agg.set_joined((4, 5), 0.2))
    assert msg.ranks == (4, 5)


def test_commit_and_abort_drop_what_is_held_for_the_epoch_and_later_answers_pass_through():
    agg = aggregator()
    agg.on_leader(plan(3), 0.0)
    agg.on_worker(PlanAck(rank=4, epoch=3, step=9), 0.1)
    agg.on_leader(Abort(epoch=3, reason="timeout"), 0.2)
    assert agg.held == 0 and agg.next_deadline() is None
    ack = PlanAck(rank=5, epoch=3, step=9)
    assert agg.on_worker(ack, 0.3) == [PassThrough(ack)]
    agg.on_leader(plan(4), 1.0)
    agg.on_worker(Promise(rank=4, epoch=4), 1.1)
    agg.on_leader(Commit(epoch=4, step=50), 1.2)
    assert agg.held == 0
    assert agg.on_worker(Promise(rank=5, epoch=4), 1.3) == [PassThrough(Promise(rank=5, epoch=4))]


def test_a_later_plan_ends_every_kind_of_an_earlier_epoch():
    agg = aggregator()
    agg.on_leader(plan(3), 0.0)
    agg.on_leader(Commit(epoch=3, step=50), 0.1)
    agg.on_worker(done(4, 3), 0.2)
    agg.on_leader(plan(4), 0.3)
    assert agg.held == 0 and agg.on_tick(100.0) == []


def done(rank: int, epoch: int, ok: bool = True) -> Done:
    return Done(rank=rank, epoch=epoch, ok=ok, error="" if ok else "copy failed", bytes_received=rank * 10,
                copy_seconds=0.5, hold_seconds=0.01 * rank)


def test_dones_go_up_together_an_error_at_once_and_they_expand_to_the_exact_dones():
    agg = aggregator()
    agg.on_leader(plan(), 0.0)
    agg.on_leader(Prepare(epoch=3, step=40), 0.0)
    agg.on_leader(Commit(epoch=3, step=40), 0.0)
    assert agg.on_worker(done(4, 3), 1.0) == []
    [failed] = sent(agg.on_worker(done(5, 3, ok=False), 1.0))
    assert isinstance(failed, NodeDone) and expand(failed) == [done(4, 3), done(5, 3, ok=False)]
    [last] = sent(agg.on_worker(done(6, 3), 1.1))
    assert expand(last) == [done(6, 3)]
    again = done(6, 3)  # a rank answers a resent COMMIT with its DONE again
    assert agg.on_worker(again, 5.0) == [PassThrough(again)]


def test_messages_that_are_not_aggregated_pass_through_untouched():
    agg = aggregator()
    hello = Hello(rank=4, node=NODE, world_size=8, num_layers=L, num_experts=E, num_physical=P,
                  bytes_per_expert=0, step=0, pid=1, phys2log=default_placement(L, E, P))
    for msg in (hello, Heartbeat(rank=99, step=3), Bye(rank=5), OutcomeQuery(rank=6, epoch=3)):
        assert agg.on_worker(msg, 0.0) == [PassThrough(msg)]  # rank 99 has not joined here


def test_a_joined_rank_s_heartbeat_stops_here_and_its_step_goes_up_in_the_node_s():
    agg = aggregator(ranks=(4, 5))
    assert agg.progress() == ()
    assert agg.on_worker(Heartbeat(rank=4, step=30), 0.0) == []
    assert agg.on_worker(Heartbeat(rank=4, step=29), 0.1) == []  # reordered: the latest stays
    agg.on_worker(counts(5, 0, 64), 0.2)
    assert agg.progress() == ((4, 30), (5, 64))
    agg.on_left(4, 0.3)
    assert agg.progress() == ((5, 64),)


def test_answers_of_ranks_that_joined_after_the_plan_pass_through():
    agg = aggregator(ranks=(4, 5))
    agg.on_leader(plan(), 0.0)
    agg.on_joined(6)
    ack = PlanAck(rank=6, epoch=3, step=1)
    assert agg.on_worker(ack, 0.1) == [PassThrough(ack)]


def test_expand_refuses_node_counts():
    try:
        expand(NodeCounts(node=1, ranks=(4,), steps=(1,), from_step=0, to_step=1,
                          counts=torch.zeros(L, E, dtype=torch.int64)))
    except TypeError:
        return
    raise AssertionError("NodeCounts expanded")


# --- the leader's window --------------------------------------------------------------------------

def leader(world: int) -> LeaderCore:
    core = LeaderCore(LeaderConfig(window_steps=128))
    for rank in range(world):
        assert core.on_hello(Hello(rank=rank, node=rank // 2, world_size=world, num_layers=L,
                                   num_experts=E, num_physical=P, bytes_per_expert=0, step=0, pid=1,
                                   phys2log=default_placement(L, E, P)), 0.0) == ""
    return core


def test_node_counts_enter_the_leader_window_once_and_every_rank_progresses():
    """The wiring proposed for LeaderCore._on_counts, on the real window code: a NodeCounts is
    one window entry; the per-rank path over the same frames leaves the same window."""
    per_rank, per_node = leader(4), leader(4)
    agg = NodeAggregator(0, CFG)
    agg.set_joined(range(4), 0.0)
    now = 0.0
    for i in range(5):  # five flushes of 64 steps: the window (128 steps) drops the oldest
        for rank in range(4):
            now += 0.01
            frame = Counts(rank=rank, from_step=64 * i, to_step=64 * (i + 1),
                           counts=torch.randint(0, 1000, (L, E)))
            per_rank.on_message(frame, now)
            for msg in sent(agg.on_worker(frame, now)):
                entry, progress = node_counts_for_window(msg)
                for r, step in progress.items():
                    per_node._progress(per_node.workers[r], step, now)
                per_node._on_counts(entry, per_node.workers[min(progress)], now)
    assert torch.equal(per_node.window_load(), per_rank.window_load())
    assert len(per_node._window) == 2 and len(per_rank._window) == 8
    assert {r: w.step for r, w in per_node.workers.items()} == {r: 320 for r in range(4)}
    assert per_node.min_step() == per_rank.min_step() == 320


def test_only_the_epoch_of_the_latest_plan_is_held():
    agg = aggregator()
    agg.on_leader(plan(4), 0.0)
    stray = [PlanAck(rank=4, epoch=9, step=1), Promise(rank=4, epoch=3), done(5, 2)]
    for msg in stray:
        assert agg.on_worker(msg, 0.1) == [PassThrough(msg)]
    assert agg.held == 0
