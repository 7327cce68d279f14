"""Which producer ranks hold the KV heads a consumer rank needs.

vLLM splits a model's KV heads evenly across TP ranks (rank r of TP t holds
heads [r*H/t, (r+1)*H/t)) or, with fewer heads than ranks, gives each rank
one head shared by t/H ranks. A consumer rank of another TP size than its
producer reads each of its heads from a producer rank that holds it: a
slice of heads per producer rank, copied into its own heads at an offset.
Equal TP sizes map rank r to rank r, all heads.
"""

from __future__ import annotations

import msgspec


class HeadSlice(msgspec.Struct, frozen=True):
    """Copy ``count`` heads from producer rank ``producer_rank`` (its local
    heads from ``remote_start``) into this rank's heads from ``local_start``."""

    producer_rank: int
    remote_start: int
    local_start: int
    count: int


class UnsupportedMapping(ValueError):
    pass


def rank_heads(total_heads: int, tp_size: int, rank: int) -> range:
    """The model's KV heads a rank holds."""
    if total_heads >= tp_size:
        if total_heads % tp_size:
            raise UnsupportedMapping(
                f"{total_heads} KV heads do not split evenly over TP {tp_size}"
            )
        per_rank = total_heads // tp_size
        return range(rank * per_rank, (rank + 1) * per_rank)
    if tp_size % total_heads:
        raise UnsupportedMapping(
            f"TP {tp_size} is not a multiple of the model's {total_heads} KV heads"
        )
    head = rank // (tp_size // total_heads)
    return range(head, head + 1)


def head_slices(
    total_heads: int, producer_tp: int, consumer_tp: int, consumer_rank: int
) -> list[HeadSlice]:
    """Where consumer rank ``consumer_rank`` reads each of its heads."""
    if total_heads < 1:
        raise UnsupportedMapping("the number of KV heads is unknown")
    mine = rank_heads(total_heads, consumer_tp, consumer_rank)
    holders = [rank_heads(total_heads, producer_tp, p) for p in range(producer_tp)]
    slices: list[HeadSlice] = []
    for head in mine:
        rank = _holder(holders, head, consumer_rank)
        remote, local = head - holders[rank].start, head - mine.start
        last = slices[-1] if slices else None
        if (
            last is not None
            and last.producer_rank == rank
            and last.remote_start + last.count == remote
            and last.local_start + last.count == local
        ):
            slices[-1] = msgspec.structs.replace(last, count=last.count + 1)
        else:
            slices.append(HeadSlice(rank, remote, local, 1))
    return slices


def _holder(holders: list[range], head: int, consumer_rank: int) -> int:
    """A producer rank holding ``head``: the consumer's own index when it
    does (equal TP: rank to rank), else spread over the replicas."""
    ranks = [p for p, heads in enumerate(holders) if head in heads]
    if consumer_rank in ranks:
        return consumer_rank
    return ranks[consumer_rank % len(ranks)]


def whole_blocks(slices: list[HeadSlice], local_heads: int, remote_heads: int) -> bool:
    """One producer rank holds exactly this rank's heads: blocks move whole
    (any transport), not head by head (tcp only)."""
    return (
        len(slices) == 1
        and slices[0].remote_start == slices[0].local_start == 0
        and slices[0].count == local_heads == remote_heads
    )


class RankRole(msgspec.Struct, frozen=True):
    """What one consumer rank does with one producer rank."""

    # Read from (else only released: its heads' copies are read elsewhere).
    read: bool
    # This node's consumer ranks that release the producer rank's part of a
    # lease: the last of them ends it there.
    readers: int
    # Blocks move whole (any transport); otherwise each read names its run
    # of heads (tcp only).
    whole: bool
    # KV heads the producer rank must hold (None: equal TP sizes, whatever
    # the engine holds per rank).
    heads: int | None


class TPPlan(msgspec.Struct, frozen=True):
    """One consumer rank's part of one producer's TP ranks, fixed at pairing:
    the runs of heads it reads (from which producer rank) and every producer
    rank it lets go of a lease on."""

    slices: list[HeadSlice]  # at most one per producer rank (runs merged)
    roles: dict[int, RankRole]

    @property
    def ranks(self) -> list[int]:
        return sorted(self.roles)


def tp_plan(
    total_heads: int,
    producer_tp: int,
    consumer_tp: int,
    consumer_rank: int,
    local_heads: int,
) -> TPPlan:
    """Raises UnsupportedMapping when the heads do not map."""
    if producer_tp == consumer_tp:
        whole = HeadSlice(consumer_rank, 0, 0, max(local_heads, 1))
        return TPPlan([whole], {consumer_rank: RankRole(True, 1, True, None)})
    every = [
        head_slices(total_heads, producer_tp, consumer_tp, c)
        for c in range(consumer_tp)
    ]
    slices = every[consumer_rank]
    roles = {}
    for p in range(producer_tp):
        readers = sum(any(s.producer_rank == p for s in mine) for mine in every)
        read = any(s.producer_rank == p for s in slices)
        # vLLM frees a lease's blocks only once every producer rank let go:
        # the ranks nobody here reads are released by one consumer rank each.
        if not read and (readers or p % consumer_tp != consumer_rank):
            continue
        heads = len(rank_heads(total_heads, producer_tp, p))
        whole = whole_blocks(slices, local_heads, heads)
        roles[p] = RankRole(read, readers if read else 1, whole, heads)
    return TPPlan(slices, roles)
