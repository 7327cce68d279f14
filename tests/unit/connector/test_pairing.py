"""Pairing off the engine's thread (connector/pairing.py) and the files that
tell the HTTP layer what each rank has paired with (pairings.py)."""

from __future__ import annotations

import threading

from pdserve.connector.pairing import Pairer
from pdserve.incompatible import IncompatibleProducer
from pdserve.pairings import (
    NodePairings,
    NodeState,
    PairingTarget,
    targets_reader,
    write_targets,
)
from tests.eventually import eventually

TARGET = PairingTarget("10.0.0.1", (7001, 7002), "instance-a")


class FakePeer:
    def __init__(self, target: PairingTarget) -> None:
        self.target = target
        self.closed = False

    def close(self, reason: str) -> list:
        self.closed = True
        return []


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_backoff_counts_from_the_end_of_a_failed_attempt():
    """A slow failure (here the attempt outlasts the backoff) must still be
    followed by a full backoff, not retried at once."""
    clock = Clock()
    release = threading.Event()

    def slow_failure(target):
        release.wait(5)
        clock.now += 3.0  # the attempt took 3 s, longer than the backoff
        raise OSError("connection refused")

    pairer = Pairer(0, slow_failure, backoff=1.0, clock=clock)
    assert pairer.want(TARGET)
    assert not pairer.want(TARGET)  # one attempt at a time
    release.set()
    eventually(lambda: pairer.failed_recently(TARGET), 5, "the attempt to fail")
    assert not pairer.want(TARGET)  # just failed: backing off
    clock.now += 0.9
    assert not pairer.want(TARGET)
    clock.now += 0.2
    assert pairer.failed_recently(TARGET) is None
    assert pairer.want(TARGET)


def test_paired_peers_are_handed_to_the_engine_thread_once():
    pairer = Pairer(0, FakePeer, backoff=1.0)
    assert pairer.want(TARGET)
    (peer,) = eventually(pairer.take_ready, 5, "the pairing")
    assert peer.target == TARGET
    assert pairer.take_ready() == []
    assert not pairer.want(TARGET)  # paired: nothing to do


def test_each_rank_publishes_what_it_paired_with(tmp_path):
    """The HTTP layer sends a producer work only once every rank paired with
    that instance; a mismatch says why and that it will not heal."""
    run_dir = str(tmp_path)
    node = NodePairings(run_dir, tp_size=2)
    assert node.state(TARGET) == NodeState(False)

    rank0 = Pairer(0, FakePeer, backoff=1.0, run_dir=run_dir)
    rank0.want(TARGET)
    eventually(rank0.take_ready, 5, "rank 0 to pair")
    assert node.state(TARGET)[0] is False  # rank 1 has not paired yet

    def mismatch(target):
        raise IncompatibleProducer("dtype: consumer='float32' producer='bfloat16'")

    rank1 = Pairer(1, mismatch, backoff=1.0, run_dir=run_dir)
    rank1.want(TARGET)
    state = eventually(lambda: (s := node.state(TARGET)).error and s, 5, "rank 1")
    assert not state.paired and state.incompatible and not state.gone
    assert "rank 1" in state.error and "bfloat16" in state.error

    rank1 = Pairer(1, FakePeer, backoff=1.0, run_dir=run_dir)
    rank1.want(TARGET)
    eventually(lambda: node.state(TARGET)[0], 5, "both ranks paired")
    other_instance = PairingTarget(TARGET.host, TARGET.kv_ports, "instance-b")
    assert node.state(other_instance)[0] is False

    rank0.forget(TARGET)  # rank 0 let go of it (gone, evicted)
    assert node.state(TARGET)[0] is False


def test_targets_round_trip_and_are_read_again_only_when_changed(tmp_path):
    run_dir = str(tmp_path)
    reader = targets_reader(run_dir)
    assert reader.read() is None
    write_targets(run_dir, [TARGET])
    assert reader.read() == [TARGET]
    (tmp_path / "targets.json").write_text("not json")
    assert reader.read() is None  # unreadable: treated as absent, no raise


def test_a_restarted_instance_is_gone_not_incompatible(tmp_path):
    """Its ports answer as another instance: the HTTP layer looks it up
    again (it may pair fine), it does not write the producer off."""
    from pdserve.incompatible import InstanceGone

    def restarted(target):
        raise InstanceGone(f"instance {target.instance_id} is gone: its ports serve b")

    run_dir = str(tmp_path)
    pairer = Pairer(0, restarted, backoff=1.0, run_dir=run_dir)
    pairer.want(TARGET)
    node = NodePairings(run_dir, tp_size=1)
    state = eventually(lambda: (s := node.state(TARGET)).error and s, 5, "the failure")
    assert state.gone and not state.incompatible
