"""Stateful property test of the aggregated path (issue 17): followers answer for their nodes.

The machine of ``test_agreement_properties.py`` (one leader :class:`EpochAgreement`, ``G`` worker
:class:`WorkerAgreement` objects, hypothesis choosing deliveries, losses, decode steps, clock
ticks and workers leaving, in nice and hostile worlds), with the ranks split into nodes: every
worker message goes to its node's :class:`NodeAggregator` (local ipc: no loss), and what the
aggregator sends up travels on one FIFO channel per node to the leader, where hypothesis may
deliver or drop it. The leader is fed a node's acks, and its promises when none refused, in one
call each (:meth:`EpochAgreement.on_acks`, :meth:`~EpochAgreement.on_promises`, as
:class:`LeaderCore` feeds them), and anything else as :func:`expand` turns it into per-rank
messages; every expanded fact is checked against what the ranks sent. A worker leaving tells its aggregator at once, and the leader
through a WORKER_LEFT on the node's channel (which may be lost). Workers also flush counts every
``F`` steps; the leader side keeps two real :class:`LeaderCore` windows, one fed each node's sums
(through :func:`node_counts_for_window`, as ``LeaderCore._on_counts`` will be), one fed the
per-worker frames those sums cover, in the same order.

Checked, besides every invariant of the base machine (I1 literally, step by step; I2 deadlines;
I5; nice worlds end SUCCEEDED):

* no node message claims an answer its rank did not give: every PLAN_ACK, PROMISE, REFUSE and
  DONE the leader gets from an expansion was sent, with those fields, by that rank;
* counts: every NodeCounts is the exact sum of distinct worker frames of one step range, no frame
  is counted twice, each rank's reported step is at least ``to_step``, and the two leader windows
  are equal after every delivery; with no counts frame lost, every frame a worker sent reaches the
  leader once the aggregators' waits are over;
* I2 for the followers: whatever an aggregator holds has a deadline within its bounded waits, and
  a tick at that deadline releases it.

``test_the_machine_catches_promises_claimed_for_ranks_that_did_not_answer`` plants a bug (an
aggregator reporting every awaited rank as promised as soon as one did) and checks that the machine
finds it.
"""

from __future__ import annotations

import importlib.util
import sys
from collections import deque
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, note, settings
from hypothesis import Phase as HypothesisPhase
from hypothesis import strategies as st
from hypothesis.stateful import initialize, invariant, precondition, rule, run_state_machine_as_test

from eplb.coordinator.agreement import Phase
from eplb.coordinator.aggregate import (AggregatorConfig, NodeAggregator, SendUp,
                                        expand, node_counts_for_window)
from eplb.coordinator.leader import LeaderConfig, LeaderCore
from eplb.proto import (Counts, Done, Hello, NodeAcks, NodeCounts, NodeDone, NodePromises, PlanAck,
                        Promise, Refuse, WorkerLeft, decode, encode)


def _load_sibling(name: str):
    """The base machine's module, by path (the tests directory is no package)."""
    path = Path(__file__).with_name(f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_eplb_sibling_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


base = _load_sibling("test_agreement_properties")
AgreementNetwork, InFlight, checked, worlds = (base.AgreementNetwork, base.InFlight, base.checked,
                                               base.worlds)
L, E, EPOCH = base.L, base.E, base.EPOCH
WINDOW_STEPS = 6


@st.composite
def aggregated_worlds(draw):
    """A world of the base machine, its ranks cut into nodes (contiguous blocks, 1 to G of them),
    the aggregators' waits, and the counts flush period F."""
    world = draw(worlds())
    n = world.num_gpus
    cuts = sorted(draw(st.sets(st.integers(1, n - 1), max_size=n - 1))) if n > 1 else []
    bounds = [0, *cuts, n]
    nodes = tuple(tuple(range(bounds[k], bounds[k + 1])) for k in range(len(bounds) - 1))
    config = AggregatorConfig(counts_wait_factor=2.0, counts_wait_min_s=0.05,
                              counts_wait_max_s=draw(st.sampled_from([0.2, 1.0, 3.0])),
                              answer_wait_s=draw(st.sampled_from([0.1, 0.5, 2.0])),
                              max_rounds=draw(st.sampled_from([2, 64])))
    return world, nodes, config, draw(st.integers(1, 4))


def counts_of(rank: int, lo: int, hi: int) -> torch.Tensor:
    """``[L, E]`` selections of ``rank`` over ``[lo, hi)``: distinct per frame."""
    return torch.arange(L * E, dtype=torch.int64).reshape(L, E) * (rank + 1) + 3 * hi + lo


def answered_ranks(msg) -> tuple[int, ...]:
    """The ranks a node message speaks for."""
    if isinstance(msg, NodePromises):
        return (*msg.promised, *(r[0] for r in msg.refused))
    if isinstance(msg, NodeDone):
        return tuple(r[0] for r in msg.results)
    return msg.ranks


class AggregatedNetwork(AgreementNetwork):
    """The base machine with one :class:`NodeAggregator` per node between workers and leader."""

    aggregator_class = NodeAggregator
    check_facts = True  # off: only the base machine's invariants (I1 literally) judge

    @initialize(case=aggregated_worlds())
    @checked
    def setup(self, case) -> None:
        world, nodes, config, flush_every = case
        note(f"nodes={nodes} config={config} F={flush_every}")
        self.now = 0.0
        self.nodes = nodes
        self.node_of = {r: k for k, ranks in enumerate(nodes) for r in ranks}
        self.aggregators = [self.aggregator_class(k, config) for k in range(len(nodes))]
        for k, agg in enumerate(self.aggregators):
            assert agg.set_joined(nodes[k], 0.0) == []
        self.config = config
        self.flush_every = flush_every
        self.answers: set[tuple] = set()        # every agreement answer a worker gave
        self.held_acks: dict[int, tuple[int, ...]] = {}  # rank -> stamp of its ack in its aggregator
        self.ack_stamps: dict[int, tuple[int, ...]] = {}
        self.frames: dict[tuple[int, int, int], torch.Tensor] = {}  # (rank, from, to) -> counts
        self.flushed_at = list(world.start_steps)
        self.covered: set[tuple[int, int, int]] = set()
        self.lost_counts = False
        self.multi = False
        self.counting = True  # off in the final drain: a counting decode loop never lets it settle
        AgreementNetwork.setup.__wrapped__(self, world)  # the base setup, without its @checked
        self.to_leader = [deque() for _ in nodes]
        self.cores = [self.mirror_core(world), self.mirror_core(world)]  # per node, per worker

    def mirror_core(self, world) -> LeaderCore:
        core = LeaderCore(LeaderConfig(window_steps=WINDOW_STEPS))
        for r in range(world.num_gpus):
            error = core.on_hello(Hello(rank=r, node=self.node_of[r], world_size=world.num_gpus,
                                        num_layers=L, num_experts=E,
                                        num_physical=world.num_physical, bytes_per_expert=0,
                                        step=0, pid=1, phys2log=world.current), 0.0)
            assert error == "", error
        return core

    # --- plumbing -------------------------------------------------------------------------------

    def broadcast(self, msgs: list, phase_before: Phase) -> None:
        super().broadcast(msgs, phase_before)
        for msg in msgs:  # each follower sees the leader's messages pass on their way down
            for k, agg in enumerate(self.aggregators):
                self.send_up(k, agg.on_leader(msg, self.now))

    def from_worker(self, i: int, reply) -> None:
        """A worker's message reaches its node's aggregator (local ipc, no loss)."""
        if isinstance(reply, PlanAck):
            self.ack_stamps[i] = self.held_acks[i] = self.stamp()
            self.answers.add(("ack", i, reply.epoch, reply.step))
        elif isinstance(reply, Promise):
            self.answers.add(("promise", i, reply.epoch))
        elif isinstance(reply, Refuse):
            self.answers.add(("refuse", i, reply.epoch, reply.step, reply.reason))
        elif isinstance(reply, Done):
            self.answers.add(("done", reply))
        elif isinstance(reply, Counts):
            self.frames[(i, reply.from_step, reply.to_step)] = reply.counts
        k = self.node_of[i]
        self.send_up(k, self.aggregators[k].on_worker(reply, self.now))

    def send_up(self, k: int, outputs: list) -> None:
        for out in outputs:
            msg = out.msg
            if isinstance(out, SendUp):
                msg = decode(encode(msg))  # what the leader would decode
                self.multi |= len(answered_ranks(msg)) > 1
            stamp = self.stamp()
            acked = msg.ranks if isinstance(msg, NodeAcks) else (
                (msg.rank,) if isinstance(msg, PlanAck) else ())
            for r in acked:
                self.held_acks.pop(r, None)
                stamp = tuple(map(min, stamp, self.ack_stamps[r]))
            self.to_leader[k].append(InFlight(msg, stamp))

    def leader_receives(self, item) -> None:
        msg = item.msg
        before = self.leader.phase
        if isinstance(msg, WorkerLeft):
            self.broadcast(self.leader.on_worker_left(msg.rank, msg.reason, self.now), before)
            return
        if isinstance(msg, (NodeCounts, Counts)):
            self.window_receives(msg)
            return
        if isinstance(msg, (NodeAcks, NodePromises, NodeDone)):
            per_rank = expand(msg)
            for m in per_rank:
                assert self.node_of[m.rank] == msg.node, f"node {msg.node} answered for rank {m.rank}"
        else:
            per_rank = [msg]
        for m in per_rank:
            fact = (("ack", m.rank, m.epoch, m.step) if isinstance(m, PlanAck) else
                    ("promise", m.rank, m.epoch) if isinstance(m, Promise) else
                    ("refuse", m.rank, m.epoch, m.step, m.reason) if isinstance(m, Refuse) else
                    ("done", m) if isinstance(m, Done) else None)
            if self.check_facts:
                assert fact is None or fact in self.answers, f"the leader got {m}, which no rank sent"
        before = self.leader.phase
        # As LeaderCore takes them: a node's acks, and its promises when none refused, in one
        # call each; everything else one rank at a time.
        if isinstance(msg, NodeAcks):
            self.broadcast(self.leader.on_acks(msg.epoch, msg.steps_by_rank, self.now), before)
            return
        if isinstance(msg, NodePromises) and not msg.refused:
            self.broadcast(self.leader.on_promises(msg.epoch, msg.promised, self.now), before)
            return
        for m in per_rank:
            before = self.leader.phase
            self.broadcast(self.leader.on_message(m, self.now), before)

    def window_receives(self, msg) -> None:
        per_node, per_worker = self.cores
        if isinstance(msg, Counts):  # passed through as it came
            keys, entry, progress = [(msg.rank, msg.from_step, msg.to_step)], msg, {msg.rank: msg.to_step}
        else:
            keys = [(r, msg.from_step, msg.to_step) for r in msg.ranks]
            entry, progress = node_counts_for_window(msg)
            for r, step in progress.items():
                assert step >= msg.to_step, f"rank {r} reported at step {step} < to_step"
        for key in keys:
            assert key in self.frames, f"counts {key} that no worker sent"
            assert key not in self.covered, f"counts {key} counted twice"
            self.covered.add(key)
        expected = sum((self.frames[key] for key in keys), torch.zeros(L, E, dtype=torch.int64))
        assert torch.equal(entry.counts, expected), "a node's counts are not the sum of its frames"
        for r, step in progress.items():
            per_node._progress(per_node.workers[r], step, self.now)
        per_node._on_counts(entry, per_node.workers[entry.rank], self.now)
        for key in keys:
            frame = Counts(rank=key[0], from_step=key[1], to_step=key[2], counts=self.frames[key])
            per_worker.on_message(frame, self.now)
        assert torch.equal(per_node.window_load(), per_worker.window_load()), (
            "the aggregated window differs from the per-worker window over the same frames")

    def may_advance(self, i: int) -> bool:
        """The base delay bound, also over NODE_ACKS in flight (stamped with their oldest ack)
        and acks an aggregator still holds while the leader waits for acks."""
        if not super().may_advance(i):
            return False
        w = self.world
        if w.delay_bound is None or i == w.fast:
            return True
        limit = self.next_step[i] + 1 - w.delay_bound
        stamps = [item.sent_at for channel in self.to_leader for item in channel
                  if isinstance(item.msg, NodeAcks)]
        if self.leader.phase is Phase.PLANNED:
            stamps += self.held_acks.values()
        return all(s[i] >= limit for s in stamps)

    def run_one_step(self, i: int, fail: type | None = None) -> bool:
        """The base decode loop iteration (its replies go through :meth:`from_worker`, so
        through the aggregator), and a counts flush whenever the next step is a multiple of F."""
        step = self.next_step[i]
        if not super().run_one_step(i, fail):
            return False
        if self.counting and (step + 1) % self.flush_every == 0:
            lo, self.flushed_at[i] = self.flushed_at[i], step + 1
            self.from_worker(i, Counts(rank=i, from_step=lo, to_step=step + 1,
                                       counts=counts_of(i, lo, step + 1)))
        return True

    # --- rules that differ ----------------------------------------------------------------------

    def lost_on_the_way_up(self, msg) -> None:
        self.lost_counts |= isinstance(msg, (NodeCounts, Counts))

    @rule(data=st.data())
    @checked
    def tick(self, data) -> None:
        AgreementNetwork.tick.__wrapped__(self, data)  # the base tick, without its @checked
        for k, agg in enumerate(self.aggregators):
            self.send_up(k, agg.on_tick(self.now))

    @precondition(lambda self: self.world.leaving and len(self.live()) > 1)
    @rule(data=st.data())
    @checked
    def leave(self, data) -> None:
        i = data.draw(st.sampled_from(self.live()), label="leaves")
        self.stopped[i] = self.left[i] = True
        self.to_worker[i].clear()
        k = self.node_of[i]
        self.send_up(k, self.aggregators[k].on_left(i, self.now))
        self.to_leader[k].append(InFlight(WorkerLeft(node=k, rank=i, reason="simulated exit"),
                                          self.stamp()))

    # --- invariants -----------------------------------------------------------------------------

    @invariant()
    @checked
    def aggregators_hold_for_a_bounded_time(self) -> None:
        bound = max(self.config.counts_wait_max_s, self.config.answer_wait_s)
        for agg in self.aggregators:
            if agg.held:
                deadline = agg.next_deadline()
                assert deadline is not None and deadline <= self.now + bound, (
                    f"I2: node {agg.node} holds {agg.held} message(s) with deadline {deadline}")

    def teardown(self) -> None:
        if self.broken or self.world is None:
            return
        self.counting = False
        super().teardown()
        self.broken = True
        # I2 for the followers: past every bounded wait, nothing is held, and without counts lost
        # every frame a worker sent reached the leader's window exactly once.
        self.now += max(self.config.counts_wait_max_s, self.config.answer_wait_s) + 1.0
        for k, agg in enumerate(self.aggregators):
            self.send_up(k, agg.on_tick(self.now))
            assert agg.held == 0, f"I2: node {k} still holds {agg.held} message(s)"
        for channel in self.to_leader:
            while channel:
                self.leader_receives(channel.popleft())
        event(f"nodes: {len(self.nodes)}, largest {max(map(len, self.nodes))} rank(s)")
        event(f"a node message answered for several ranks: {self.multi}")
        sent = len(self.frames)
        event(f"counts frames sent: {'0' if not sent else '1-9' if sent < 10 else '10-99' if sent < 100 else '100+'}"
              f", {'some' if self.lost_counts else 'none'} lost")
        if not self.lost_counts:
            assert self.covered == set(self.frames), (
                f"counts frames never reached the leader: {sorted(set(self.frames) - self.covered)}")
        self.broken = False


def _settings(**kwargs) -> settings:
    kwargs.setdefault("max_examples", 200)
    return settings(stateful_step_count=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
                    **kwargs)


AggregatedNetwork.TestCase.settings = _settings()
test_aggregated_network = AggregatedNetwork.TestCase


# --- the machine fails on a planted bug ---------------------------------------------------------

class ClaimsEveryPromise(NodeAggregator):
    """Planted bug: as soon as one rank promised, report every rank awaited as promised."""

    def _answer_up(self, kind, epoch, held):
        out = super()._answer_up(kind, epoch, held)
        if out and isinstance(out[0].msg, NodePromises) and not out[0].msg.refused:
            out = [SendUp(NodePromises(node=self.node, epoch=epoch,
                                       promised=tuple(sorted(held.awaited)), refused=()))]
        return out

    def _flush(self, now):  # and send each promise at once
        for (kind, _), held in self._answers.items():
            if kind.value == "promise" and held.answers:
                held.urgent = True
        return super()._flush(now)


class PlantedBugNetwork(AggregatedNetwork):
    aggregator_class = ClaimsEveryPromise


@pytest.mark.parametrize("check_facts", [True, False], ids=["facts checked", "I1 alone"])
def test_the_machine_catches_promises_claimed_for_ranks_that_did_not_answer(check_facts):
    """With the facts check, the first such NodePromises fails it; without it, the base
    machine's literal I1 check (a step run on two placements, or S passed without copying) does
    (a rank refuses after its node claimed its promise and the leader committed; hypothesis
    needs a few hundred examples to find that, and stops at the first)."""
    PlantedBugNetwork.check_facts = check_facts
    match = "which no rank sent" if check_facts else "I1 broken|without copying at S|without issuing chunk"
    with pytest.raises(AssertionError, match=match):
        run_state_machine_as_test(PlantedBugNetwork, settings=_settings(
            max_examples=2000, database=None, phases=[HypothesisPhase.generate],
            report_multiple_bugs=False))
