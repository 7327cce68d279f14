"""The per-rank handshake's verdict: can this consumer rank read that producer
rank's KV (same model, weights and serving identity, same KV bytes)?"""

from __future__ import annotations

from pdserve.identity import identity_pairs
from pdserve.incompatible import IncompatibleProducer, describe_mismatches, raise_if
from pdserve.side_channel.protocol import LayerInfo, RankInfo


def check_compatible(local: RankInfo, remote: RankInfo, whole: bool = True) -> None:
    """Refuse a producer rank whose KV this rank cannot read. ``whole``:
    blocks move whole (the ranks hold the same heads); otherwise some heads
    of each block move, and only the bytes of one head must agree."""
    pairs: list[tuple[str, object, object]] = [
        ("protocol version", local.protocol_version, remote.protocol_version),
        ("pdserve version", local.pdserve_version, remote.pdserve_version),
        ("vLLM version", local.vllm_version, remote.vllm_version),
        ("model", local.model, remote.model),
        ("dtype", local.dtype, remote.dtype),
        ("block size", local.block_size, remote.block_size),
        ("KV cache dtype", local.kv_cache_dtype, remote.kv_cache_dtype),
        ("number of KV layers", len(local.layers), len(remote.layers)),
        *identity_pairs(local.identity, remote.identity),
        *_layout_pairs(local, remote, whole),
    ]
    # Which producer rank holds which heads is the pairing's business
    # (tp_mapping); here only whether their bytes can be read.
    if local.tp_size != remote.tp_size:
        pairs.append(
            ("KV heads of the model", local.total_kv_heads, remote.total_kv_heads)
        )
    for mine, theirs in zip(local.layers, remote.layers, strict=False):
        pairs += [
            (f"{mine.name} block dim", mine.block_dim, theirs.block_dim),
            (f"{mine.name} dtype", mine.dtype, theirs.dtype),
            (
                f"{mine.name} KV layout (block dim as -1)",
                _layout(mine, whole),
                _layout(theirs, whole),
            ),
        ]
        if not whole:
            pairs.append((f"{mine.name} head dim", mine.head_dim, theirs.head_dim))
    if not whole and -1 in [layer.head_dim for layer in local.layers + remote.layers]:
        raise IncompatibleProducer(
            "the TP sizes differ, and this KV layout's heads cannot be told apart "
            "(packed head slots, or a backend pdserve cannot slice): start both "
            "nodes with the same --tensor-parallel-size"
        )
    raise_if(describe_mismatches(pairs))


# What decides the meaning of a block's bytes beyond shapes and dtypes.
LAYOUT_FIELDS = {
    "attention_backend": "attention backend",
    "layout": "KV cache layout",
    "shuffled": "ROCm shuffled KV layout (VLLM_ROCM_SHUFFLE_KV_CACHE_LAYOUT)",
    "block_size": "KV block size",
    "kernel_block_size": "attention kernel block size",
    "head_slots": "KV head slots per page",
    "page_bytes": "bytes per KV page",
    "kv_cache_dtype": "KV cache dtype",
    "fp8_format": "fp8 format of the KV cache",
}


# Fields that scale with a rank's share of the heads.
PER_RANK_FIELDS = ("head_slots", "page_bytes")


def _layout_pairs(
    local: RankInfo, remote: RankInfo, whole: bool
) -> list[tuple[str, object, object]]:
    pairs = [
        (label, getattr(local.kv_layout, field), getattr(remote.kv_layout, field))
        for field, label in LAYOUT_FIELDS.items()
        if whole or field not in PER_RANK_FIELDS
    ]
    if not whole:
        pairs.append(
            ("bytes per KV head of a page", _head_bytes(local), _head_bytes(remote))
        )
    return pairs


def _head_bytes(info: RankInfo) -> float:
    slots = info.kv_layout.head_slots
    return info.kv_layout.page_bytes / slots if slots else 0.0


def _layout(layer: LayerInfo, whole: bool) -> list[int]:
    """The layer's shape with the block dim (and, moving heads, the head
    dim) as -1: those may differ between ranks."""
    loose = {layer.block_dim} if whole else {layer.block_dim, layer.head_dim}
    return [-1 if d in loose else size for d, size in enumerate(layer.shape)]
