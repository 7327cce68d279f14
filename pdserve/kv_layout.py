"""What a rank's KV bytes mean, from vLLM's own KV cache spec and layout.

Two ranks whose layer tensors have equal shapes and dtypes can still hold
unreadable bytes for each other: ROCm's tile-shuffled K/V has the plain
layout's shape, fp8 KV is stored as uint8 everywhere while MI300X writes
e4m3fnuz and MI355X/H100 write e4m3fn, and attention backends differ in what
a page holds. So each rank describes its KV with everything that decides the
meaning of a block's bytes, and the handshake refuses any difference.

A vLLM block may be split into k kernel blocks (AITER's kernel blocks are 16
or 32 tokens under ``--block-size 64``): the layer tensors then have
num_blocks * k rows of kernel blocks, and a vLLM block moves as its k
consecutive kernel blocks.
"""

from __future__ import annotations

import os
from typing import Any

import msgspec
import torch

from pdserve.log import init_logger

logger = init_logger(__name__)


class KVLayout(msgspec.Struct, frozen=True):
    attention_backend: str = ""
    # vLLM's resolved KVCacheLayout name (vLLM >= 0.3x) or its NHD/HND
    # connector layout (older releases).
    layout: str = ""
    # ROCm's tile-shuffled K/V (VLLM_ROCM_SHUFFLE_KV_CACHE_LAYOUT).
    shuffled: bool = False
    block_size: int = 0
    kernel_block_size: int = 0
    # H of vLLM's [B, H, N, C] page: KV heads, or the backend's head slots.
    head_slots: int = 0
    # Bytes of one vLLM block of one layer, as the spec computes them.
    page_bytes: int = 0
    kv_cache_dtype: str = "auto"
    # The platform's fp8 format when the KV cache is fp8 (stored as uint8).
    fp8_format: str = ""


def kernel_blocks_in(
    tensor: torch.Tensor, num_blocks: int, block_size: int, block_dim: int | None
) -> int:
    """k: kernel blocks per vLLM block, from the rows vLLM allocated. Where
    vLLM does not say which dimension holds them (older releases), it is the
    outermost one sized by a whole number of kernel blocks per block."""
    dims = [block_dim] if block_dim is not None else range(tensor.dim())
    fits = [
        d
        for d in dims
        if tensor.shape[d] % num_blocks == 0
        and tensor.shape[d] >= num_blocks
        and block_size % (tensor.shape[d] // num_blocks) == 0
    ]
    if not fits:
        raise ValueError(
            f"no dimension of KV tensor {tuple(tensor.shape)} holds {num_blocks} "
            f"blocks of {block_size} tokens (or kernel blocks splitting them)"
        )
    return tensor.shape[max(fits, key=tensor.stride)] // num_blocks


def check_page_bytes(layout: KVLayout, block_nbytes: list[int]) -> None:
    """Each layer's block must be exactly the page vLLM's spec describes:
    otherwise the layout was misread, and copies would move wrong bytes."""
    wrong = sorted({n for n in block_nbytes if n != layout.page_bytes})
    if wrong:
        raise ValueError(
            f"KV blocks hold {wrong} bytes per layer, vLLM's spec says "
            f"{layout.page_bytes} ({layout.attention_backend}, {layout.layout}): "
            "pdserve cannot move this layout"
        )


def describe_kv_layout(
    vllm_config: Any,
    kv_cache_config: Any,
    kernel_blocks: int,
) -> KVLayout:
    """This rank's layout from vLLM's configs (worker process)."""
    spec = kv_cache_config.kv_cache_groups[0].kv_cache_spec
    cache_dtype = str(vllm_config.cache_config.cache_dtype)
    return KVLayout(
        attention_backend=_attention_backend(vllm_config, kv_cache_config),
        layout=_layout_name(vllm_config, kv_cache_config),
        shuffled=_shuffled(),
        block_size=spec.block_size,
        kernel_block_size=spec.block_size // kernel_blocks,
        head_slots=int(getattr(spec, "num_heads", None) or spec.num_kv_heads),
        # Padding at a page's end is not KV: copies skip it.
        page_bytes=int(getattr(spec, "real_page_size_bytes", spec.page_size_bytes)),
        kv_cache_dtype=cache_dtype,
        fp8_format=_fp8_format() if cache_dtype.startswith("fp8") else "",
    )


def _attention_backend(vllm_config: Any, kv_cache_config: Any) -> str:
    from vllm.distributed.kv_transfer.kv_connector.utils import (
        get_current_attn_backends,
    )

    names = kv_cache_config.kv_cache_groups[0].layer_names
    backends = get_current_attn_backends(vllm_config, names)
    return ",".join(sorted(b.get_name() for b in backends))


def _layout_name(vllm_config: Any, kv_cache_config: Any) -> str:
    resolved = getattr(kv_cache_config, "kv_cache_layout", None)
    if resolved:
        return str(resolved)
    cache_config = vllm_config.cache_config
    if hasattr(cache_config, "get_resolved_kv_cache_layout"):
        return cache_config.get_resolved_kv_cache_layout().name
    try:  # older vLLM: the NHD/HND layout its connectors negotiate
        from vllm.v1.attention.backends.utils import get_kv_cache_layout
    except ImportError:
        return ""
    return str(get_kv_cache_layout())


def _shuffled() -> bool:
    from vllm.platforms import current_platform

    # Only ROCm's AITER backends read the variable.
    value = os.environ.get("VLLM_ROCM_SHUFFLE_KV_CACHE_LAYOUT", "0")
    return current_platform.is_rocm() and value.lower() in ("1", "true")


def _fp8_format() -> str:
    from vllm.platforms import current_platform

    try:
        dtype = current_platform.fp8_dtype()
    except Exception:  # a platform without fp8: nothing to tell apart
        return "unknown"
    return str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else ""
