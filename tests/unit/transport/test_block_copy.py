"""The one-launch block copy (a Triton kernel, run here by Triton's
interpreter on CPU tensors): every byte of every layer and block position
lands where it should, nothing else is touched, for vLLM's KV layouts; and a
gather into a staging buffer and a scatter back round-trip exactly."""

from __future__ import annotations

import os

import pytest
import torch

os.environ["TRITON_INTERPRET"] = "1"  # before the kernel is first built
pytest.importorskip("triton")

from pdserve.kv_cache import PagedKVCache  # noqa: E402
from pdserve.transport import block_copy  # noqa: E402
from pdserve.transport.block_copy import (  # noqa: E402
    BlockCopier,
    block_layout,
    staging_layouts,
)

N = 23
LAYOUTS = {
    "kv_first": ((2, N, 16, 2, 8), None),
    "blocks_first": ((N, 2, 16, 2, 8), None),
    "heads_before_tokens": ((2, N, 2, 16, 8), None),
    # Logical [N, 2, 16, 2, 8], stored as [N, 2, 2, 16, 8] (an HND stride order).
    "permuted": ((N, 2, 2, 16, 8), (0, 1, 3, 2, 4)),
    "mla_like": ((N, 16, 72), None),
}


@pytest.fixture(autouse=True)
def fresh_kernel():
    block_copy._kernel.cache_clear()
    yield


def cache(layout: str, dtype: torch.dtype, seed: int | None, layers: int = 3):
    shape, permute = LAYOUTS[layout]
    gen = torch.Generator().manual_seed(seed or 0)
    tensors = {}
    for i in range(layers):
        t = (
            torch.randn(shape, generator=gen)
            if seed is not None
            else torch.zeros(shape)
        )
        t = t.to(dtype)
        tensors[f"l{i}"] = t.permute(*permute) if permute else t
    return PagedKVCache(tensors, N)


def layouts(kv: PagedKVCache):
    return [block_layout(t, d) for t, d in zip(kv.layers, kv.block_dims, strict=True)]


def block_bytes(kv: PagedKVCache, layer: int, block: int) -> bytes:
    lay = layouts(kv)[layer]
    raw = raw_bytes(kv.layers[layer])
    return b"".join(
        raw[
            o + block * lay.block_stride : o
            + block * lay.block_stride
            + lay.segment_bytes
        ]
        for o in lay.segment_offsets
    )


def raw_bytes(tensor: torch.Tensor) -> bytes:
    flat = torch.empty(0, dtype=torch.uint8)
    flat.set_(tensor.untyped_storage())
    return flat.numpy().tobytes()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_copy_moves_exactly_the_named_blocks(layout, dtype):
    src, dst = cache(layout, dtype, seed=1), cache(layout, dtype, seed=None)
    src_ids, dst_ids = [20, 3, 11, 0, 22], [1, 17, 4, 21, 9]
    copier = BlockCopier(layouts(src), layouts(dst), anchor=dst.layers[0])

    copier.copy(torch.tensor(src_ids), torch.tensor(dst_ids))

    for layer in range(len(src.layers)):
        for s, d in zip(src_ids, dst_ids, strict=True):
            assert block_bytes(dst, layer, d) == block_bytes(src, layer, s)
        for other in set(range(N)) - set(dst_ids):
            assert not any(block_bytes(dst, layer, other))


def test_layout_segments_follow_strides():
    kv = cache("kv_first", torch.float32, seed=1)
    lay = layouts(kv)[0]
    assert lay.segment_offsets == (0, N * 16 * 2 * 8 * 4)
    assert lay.segment_bytes == lay.block_stride == 16 * 2 * 8 * 4
    assert len(layouts(cache("blocks_first", torch.float32, 1))[0].segment_offsets) == 1


def test_gather_to_staging_and_scatter_back_round_trip():
    src, dst = (
        cache("kv_first", torch.bfloat16, seed=3),
        cache("kv_first", torch.bfloat16, None),
    )
    ids, back = [5, 9, 2, 14], [0, 6, 7, 8]
    shape = [(len(lay.segment_offsets), lay.segment_bytes) for lay in layouts(src)]
    per_block = sum(n * size for n, size in shape)
    staging = torch.zeros(len(ids) * per_block, dtype=torch.uint8)
    staged = staging_layouts(staging.data_ptr(), shape, len(ids))
    slots = torch.arange(len(ids))

    BlockCopier(layouts(src), staged, anchor=src.layers[0]).copy(
        torch.tensor(ids), slots
    )
    # Staging holds each layer's gathered blocks in gather order.
    first_layer = staging[: shape[0][0] * shape[0][1] * len(ids)]
    expected = src.layers[0].index_select(1, torch.tensor(ids)).contiguous()
    assert torch.equal(first_layer, expected.reshape(-1).view(torch.uint8))

    BlockCopier(staged, layouts(dst), anchor=dst.layers[0]).copy(
        slots, torch.tensor(back)
    )
    for layer in range(3):
        for s, d in zip(ids, back, strict=True):
            assert block_bytes(dst, layer, d) == block_bytes(src, layer, s)


def test_empty_copy_launches_nothing():
    src, dst = (
        cache("kv_first", torch.float32, 1),
        cache("kv_first", torch.float32, None),
    )
    BlockCopier(layouts(src), layouts(dst), anchor=dst.layers[0]).copy(
        torch.tensor([], dtype=torch.int64), torch.tensor([], dtype=torch.int64)
    )
    assert not any(raw_bytes(dst.layers[0]))


def test_layers_with_different_segments_are_refused():
    a = cache("kv_first", torch.float32, 1)
    b = cache("blocks_first", torch.float32, 1)
    with pytest.raises(ValueError, match="differ"):
        BlockCopier(layouts(a), layouts(b), anchor=a.layers[0])


def test_layout_with_gaps_copies_only_the_real_bytes():
    padded = torch.zeros(2, N, 16, 2, 10)[..., :8]  # every row padded by 2
    layout = block_layout(padded, 1)
    assert layout.segment_bytes == 8 * 4
    assert len(layout.segment_offsets) == 2 * 16 * 2
    assert layout.segment_offsets[:2] == (0, 10 * 4)  # the padding is skipped
    assert layout.block_stride == 16 * 2 * 10 * 4


def test_layout_split_into_too_many_pieces_is_refused():
    strided = torch.zeros(N, 8192, 2)[..., :1]  # one float per 8 bytes
    with pytest.raises(ValueError, match="pieces"):
        block_layout(strided, 0)


def test_block_outermost_layout_copies_each_layers_page():
    """vLLM's B-outer layouts: one block holds every layer's page."""
    raw = torch.randn(N, 3, 16, 2, 8)  # [B, L, N, H, C]
    src = PagedKVCache({f"l{i}": raw[:, i] for i in range(3)}, N, block_dim=0)
    dst_raw = torch.zeros_like(raw)
    dst = PagedKVCache({f"l{i}": dst_raw[:, i] for i in range(3)}, N, block_dim=0)
    assert block_layout(src.layers[1], 0).block_stride == 3 * 16 * 2 * 8 * 4
    BlockCopier(layouts(src), layouts(dst), anchor=dst_raw).copy(
        torch.tensor([1, 4]), torch.tensor([0, 2])
    )
    assert torch.equal(dst_raw[[0, 2]], raw[[1, 4]])
    assert not dst_raw[[1, 3]].any()
