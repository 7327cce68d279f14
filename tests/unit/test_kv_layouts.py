"""Every KV layout vLLM can hand the connector, built with vLLM's own
``create_kv_cache_views``: each spec kind (bf16, fp8 stored as uint8, packed
head slots, MLA, fp8 with per-token-head scales inline) in every
``KVCacheLayout``, block sizes 16/32/64 with kernel blocks 16/32. Whatever ROCm
(AITER's kernel blocks, B-outer layouts) hands us must be read as vLLM means
it, or refused at the handshake: never silently moved wrong.
"""

from __future__ import annotations

from types import SimpleNamespace

import msgspec
import pytest
import torch

pytest.importorskip("vllm.v1.kv_cache_layout")

from vllm.v1.kv_cache_interface import (  # noqa: E402
    FullAttentionSpec,
    KVCacheTensor,
    KVQuantMode,
    MLAAttentionSpec,
    compute_layout_strides,
    create_kv_cache_views,
)
from vllm.v1.kv_cache_layout import KVCacheLayout  # noqa: E402

from pdserve.connector.compatibility import check_compatible
from pdserve.incompatible import IncompatibleProducer
from pdserve.kv_cache import PagedKVCache  # noqa: E402
from pdserve.kv_layout import KVLayout, check_page_bytes, kernel_blocks_in  # noqa: E402
from pdserve.side_channel.leases import LeaseTable  # noqa: E402
from tests.unit.side_channel_fakes import (  # noqa: E402
    link_to,
    load_of,
    make_lease,
    one,
    pump,
    rank_info_for,
    start_server,
)

LAYERS = 3
NUM_BLOCKS = 10


def _spec(kind: str, block_size: int):
    common = {"block_size": block_size, "num_kv_heads": 2, "head_size": 8}
    if kind == "bf16":
        return FullAttentionSpec(**common, dtype=torch.bfloat16)
    if kind == "fp8_as_uint8":
        return FullAttentionSpec(**common, dtype=torch.uint8)
    if kind == "head_slots":  # a backend packing K and V heads in 4 slots
        return FullAttentionSpec(
            **common, dtype=torch.bfloat16, num_head_slots=4, state_content_bytes=16
        )
    if kind == "mla":
        return MLAAttentionSpec(
            block_size=block_size, num_kv_heads=1, head_size=24, dtype=torch.bfloat16
        )
    if kind == "fp8_per_token_head_scales":  # K, V and two fp32 scales
        return FullAttentionSpec(
            **common,
            dtype=torch.uint8,
            kv_quant_mode=KVQuantMode.FP8_PER_TOKEN_HEAD,
            state_content_bytes=8 + 8 + 2 * 4,
        )
    raise AssertionError(kind)


SPEC_KINDS = ["bf16", "fp8_as_uint8", "head_slots", "mla", "fp8_per_token_head_scales"]
BLOCK_KERNEL = [(16, 16), (32, 16), (32, 32), (64, 16), (64, 32)]


def vllm_views(spec, layout: KVCacheLayout, kernel: int, seed: int | None):
    """What vLLM's worker allocates and registers with the connector."""
    layer_stride, block_stride, *_ = compute_layout_strides(
        spec, NUM_BLOCKS, LAYERS, layout
    )
    size = spec.page_size_bytes * LAYERS * NUM_BLOCKS
    raw = torch.zeros(size, dtype=torch.int8)
    if seed is not None:
        gen = torch.Generator().manual_seed(seed)
        raw = torch.randint(-128, 128, (size,), dtype=torch.int8, generator=gen)
    names = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]
    tensor = KVCacheTensor(
        size=size, layers=names, layer_stride=layer_stride, block_stride=block_stride
    )
    kernel_block = None if kernel == spec.block_size else kernel
    views = create_kv_cache_views(raw, spec, NUM_BLOCKS, layout, tensor, kernel_block)
    return raw, dict(zip(names, views, strict=True))


def paged(spec, views: dict[str, torch.Tensor]) -> PagedKVCache:
    first = next(iter(views.values()))
    k = kernel_blocks_in(first, NUM_BLOCKS, spec.block_size, block_dim=0)
    return PagedKVCache(views, NUM_BLOCKS, k, block_dim=0)


def block_bytes(view: torch.Tensor, block: int, k: int) -> torch.Tensor:
    """Block ``block`` as vLLM reads it: its k kernel-block rows."""
    return view[block * k : (block + 1) * k].contiguous().reshape(-1).view(torch.uint8)


def _cases():
    for kind in SPEC_KINDS:
        for layout in KVCacheLayout:
            for block, kernel in BLOCK_KERNEL:
                yield pytest.param(
                    kind,
                    layout,
                    block,
                    kernel,
                    id=f"{kind}-{layout.name}-{block}k{kernel}",
                )


def views_or_skip(kind: str, layout: KVCacheLayout, block: int, kernel: int, seed):
    spec = _spec(kind, block)
    try:
        raw, views = vllm_views(spec, layout, kernel, seed)
    except (ValueError, AssertionError) as exc:
        pytest.skip(f"vLLM itself refuses this layout: {exc}")
    return spec, raw, views


@pytest.mark.parametrize(("kind", "layout", "block", "kernel"), list(_cases()))
def test_blocks_are_vllm_pages_and_round_trip(kind, layout, block, kernel):
    spec, _, src_views = views_or_skip(kind, layout, block, kernel, seed=1)
    dst_raw, dst_views = vllm_views(spec, layout, kernel, seed=None)
    src, dst = paged(spec, src_views), paged(spec, dst_views)
    k = block // kernel
    assert src.kernel_blocks == k
    for layer in range(LAYERS):
        assert src.block_nbytes(layer) == spec.page_size_bytes
    check_page_bytes(
        KVLayout(page_bytes=spec.page_size_bytes),
        [src.block_nbytes(i) for i in range(LAYERS)],
    )

    ids, to = [7, 0, 4], [2, 9, 5]
    for layer in range(LAYERS):
        blocks = src.gather(layer, src.index(ids))
        dst.scatter(layer, dst.index(to), blocks)

    names = list(src_views)
    for name in names:
        for a, b in zip(ids, to, strict=True):
            assert torch.equal(
                block_bytes(src_views[name], a, k), block_bytes(dst_views[name], b, k)
            )
    # Nothing outside the destination blocks was written.
    for name in names:
        for b in to:
            dst_views[name][b * k : (b + 1) * k].zero_()
    assert not dst_raw.any()


@pytest.mark.parametrize(
    ("kind", "layout", "block", "kernel"),
    [
        ("bf16", KVCacheLayout.LBHNC, 64, 32),
        ("fp8_as_uint8", KVCacheLayout.BLNHC, 32, 16),
        ("mla", KVCacheLayout.LBNHC, 64, 16),
        ("head_slots", KVCacheLayout.BHLNC, 16, 16),
    ],
)
def test_tcp_moves_every_layout_between_two_nodes(closing, kind, layout, block, kernel):
    spec, _, src_views = views_or_skip(kind, layout, block, kernel, seed=3)
    _, dst_views = vllm_views(spec, layout, kernel, seed=None)
    producer, consumer = paged(spec, src_views), paged(spec, dst_views)
    check_compatible(rank_info_for(consumer), rank_info_for(producer))
    leases = LeaseTable(30)
    server = start_server(producer, leases)
    closing(server)
    lease = make_lease("r", [8, 1, 6], server.port)
    leases.grant("r", lease.block_ids, lease.prompt_hash)
    link = link_to(server, consumer)
    closing(link)
    link.submit(load_of(lease, [0, 3, 9]))

    (load,) = pump(link, server, one)

    assert load.error is None
    k = block // kernel
    for name in src_views:
        for a, b in zip([8, 1, 6], [0, 3, 9], strict=True):
            assert torch.equal(
                block_bytes(src_views[name], a, k), block_bytes(dst_views[name], b, k)
            )


def test_handshake_refuses_a_kernel_split_on_one_side_only():
    spec = _spec("bf16", 64)
    _, whole = vllm_views(spec, KVCacheLayout.LBHNC, 64, None)
    _, split = vllm_views(spec, KVCacheLayout.LBHNC, 32, None)
    with pytest.raises(IncompatibleProducer, match="KV layout"):
        check_compatible(
            rank_info_for(paged(spec, whole)), rank_info_for(paged(spec, split))
        )


LAYOUT = KVLayout(
    attention_backend="ROCM_AITER_FA",
    layout="LBHNC",
    block_size=64,
    kernel_block_size=32,
    head_slots=4,
    page_bytes=32768,
    kv_cache_dtype="fp8",
    fp8_format="float8_e4m3fnuz",
)


@pytest.mark.parametrize(
    ("field", "other", "named"),
    [
        ("shuffled", True, "shuffled"),
        ("fp8_format", "float8_e4m3fn", "fp8 format"),
        ("attention_backend", "FLASH_ATTN", "attention backend"),
        ("kernel_block_size", 16, "kernel block size"),
        ("layout", "BLHNC", "KV cache layout"),
        ("head_slots", 8, "head slots"),
    ],
)
def test_handshake_names_what_the_shapes_cannot_show(field, other, named):
    """Same shapes, different meaning: refused, naming both values."""
    spec = _spec("bf16", 16)
    kv = paged(spec, vllm_views(spec, KVCacheLayout.LBHNC, 16, None)[1])
    mine = rank_info_for(kv)
    mine.kv_layout = LAYOUT
    theirs = rank_info_for(kv)
    theirs.kv_layout = msgspec.structs.replace(LAYOUT, **{field: other})
    with pytest.raises(IncompatibleProducer, match=named) as refused:
        check_compatible(mine, theirs)
    assert repr(getattr(LAYOUT, field)) in str(refused.value)
    assert repr(other) in str(refused.value)


def test_page_bytes_that_differ_from_vllms_spec_are_refused():
    with pytest.raises(ValueError, match="cannot move this layout"):
        check_page_bytes(KVLayout(page_bytes=4096), [4096, 2048])


def test_kernel_rows_that_do_not_split_a_block_are_refused():
    with pytest.raises(ValueError, match="no dimension"):
        kernel_blocks_in(torch.zeros(30, 2, 16, 8), 10, 64, block_dim=0)  # k = 3


def test_worker_reads_aiter_kernel_blocks_from_vllms_spec(monkeypatch):
    """AITER under --block-size 64 splits each block into two 32-token
    kernel blocks: the worker used to fail in register_kv_caches."""
    from pdserve.connector.worker import PDServeWorker
    from pdserve.settings import Settings

    monkeypatch.setattr(
        "pdserve.kv_layout._attention_backend", lambda *_: "ROCM_AITER_FA"
    )
    spec = _spec("bf16", 64)
    _, views = vllm_views(spec, KVCacheLayout.LBHNC, 32, seed=1)
    group = SimpleNamespace(kv_cache_spec=spec, layer_names=list(views))
    kv_cache_config = SimpleNamespace(
        num_blocks=NUM_BLOCKS, kv_cache_layout="LBHNC", kv_cache_groups=[group]
    )
    vllm_config = SimpleNamespace(cache_config=SimpleNamespace(cache_dtype="auto"))
    worker = PDServeWorker(
        Settings(role="producer", model="m"), vllm_config, kv_cache_config, 0
    )

    kv = worker.view_kv_caches(views)

    assert kv.kernel_blocks == 2
    assert worker.layout == KVLayout(
        attention_backend="ROCM_AITER_FA",
        layout="LBHNC",
        block_size=64,
        kernel_block_size=32,
        head_slots=2,
        page_bytes=spec.page_size_bytes,
        kv_cache_dtype="auto",
    )
    assert [kv.block_nbytes(i) for i in range(LAYERS)] == [spec.page_size_bytes] * 3
