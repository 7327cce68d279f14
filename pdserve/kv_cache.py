"""A rank's paged KV cache as the transports see it: layers of blocks.

Where vLLM says which dimension holds the blocks (its [B, H, N, C] layer
views, vLLM >= 0.3x: dimension 0) that is used; older releases hand over
backend-specific shapes (K/V first or blocks first), where the block
dimension is the one sized by the block count. A vLLM block split into k
kernel blocks (num_blocks * k rows) is viewed as (num_blocks, k): a block
moves as its k kernel blocks. Gather and scatter are batched tensor ops (index_select /
index_copy_), the same on CPU, CUDA and ROCm tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pdserve.side_channel.protocol import LayerInfo

# A run of KV heads of a rank's layers: (first, count); None = all of them.
HeadRange = tuple[int, int] | None


def find_block_dim(tensor: torch.Tensor, num_blocks: int) -> int:
    candidates = [d for d, size in enumerate(tensor.shape) if size == num_blocks]
    if not candidates:
        raise ValueError(
            f"no dimension of KV tensor {tuple(tensor.shape)} has num_blocks="
            f"{num_blocks}"
        )
    # The paged dimension is the outermost one that is not K/V: largest stride.
    return max(candidates, key=lambda d: tensor.stride(d))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def group_kernel_blocks(
    tensor: torch.Tensor, block_dim: int, kernel_blocks: int
) -> torch.Tensor:
    """View num_blocks * k kernel-block rows as (num_blocks, k)."""
    if kernel_blocks == 1:
        return tensor
    return tensor.unflatten(block_dim, (-1, kernel_blocks))


class PagedKVCache:
    def __init__(
        self,
        kv_caches: dict[str, torch.Tensor],
        num_blocks: int,
        kernel_blocks: int = 1,
        block_dim: int | None = None,
    ) -> None:
        """``block_dim``: where vLLM puts the (kernel) blocks, when it says;
        ``kernel_blocks``: kernel blocks per vLLM block."""
        self.names = list(kv_caches)
        self.num_blocks = num_blocks
        self.kernel_blocks = kernel_blocks
        rows = num_blocks * kernel_blocks
        self.block_dims = [
            find_block_dim(t, rows) if block_dim is None else block_dim
            for t in kv_caches.values()
        ]
        for tensor, dim in zip(kv_caches.values(), self.block_dims, strict=True):
            if tensor.shape[dim] != rows:
                raise ValueError(
                    f"KV tensor {tuple(tensor.shape)} has {tensor.shape[dim]} "
                    f"rows in dimension {dim}, expected {rows}"
                )
        self.layers = [
            group_kernel_blocks(kv_caches[name], dim, kernel_blocks)
            for name, dim in zip(self.names, self.block_dims, strict=True)
        ]
        # Where each layer keeps its KV heads, once known (``locate_heads``):
        # needed only to move some of a block's heads (TP sizes differ).
        self.head_dims: list[int] | None = None
        self.num_heads = 0

    def locate_heads(self, head_dims: list[int], num_heads: int) -> None:
        for layer, dim in zip(self.layers, head_dims, strict=True):
            if layer.shape[dim] != num_heads:
                raise ValueError(
                    f"KV tensor {tuple(layer.shape)} has no {num_heads} heads "
                    f"in dimension {dim}"
                )
        self.head_dims, self.num_heads = list(head_dims), num_heads

    def _heads(self, layer: int, heads: HeadRange) -> torch.Tensor:
        """The layer, or a view of some of its heads."""
        tensor = self.layers[layer]
        if heads is None:
            return tensor
        if self.head_dims is None:
            raise ValueError("this rank's KV heads were not located")
        first, count = heads
        if first < 0 or count < 1 or first + count > self.num_heads:
            raise ValueError(f"heads {first}..{first + count} of {self.num_heads}")
        return tensor.narrow(self.head_dims[layer], first, count)

    @property
    def device(self) -> torch.device:
        return self.layers[0].device

    def layer_infos(self) -> list[LayerInfo]:
        return [
            LayerInfo(
                name=name,
                shape=list(layer.shape),
                dtype=dtype_name(layer.dtype),
                block_dim=dim,
                head_dim=-1 if self.head_dims is None else self.head_dims[i],
            )
            for i, (name, layer, dim) in enumerate(
                zip(self.names, self.layers, self.block_dims, strict=True)
            )
        ]

    def block_nbytes(self, layer: int, heads: HeadRange = None) -> int:
        tensor = self._heads(layer, heads)
        return (
            tensor.element_size()
            * tensor.numel()
            // tensor.shape[self.block_dims[layer]]
        )

    def bytes_per_block(self) -> int:
        """Bytes one block occupies summed over all layers."""
        return sum(self.block_nbytes(i) for i in range(len(self.layers)))

    def gathered_shape(
        self, layer: int, num: int, heads: HeadRange = None
    ) -> list[int]:
        shape = list(self._heads(layer, heads).shape)
        shape[self.block_dims[layer]] = num
        return shape

    def index(self, block_ids: Sequence[int]) -> torch.Tensor:
        return torch.tensor(block_ids, dtype=torch.long, device=self.device)

    def gather(
        self, layer: int, index: torch.Tensor, heads: HeadRange = None
    ) -> torch.Tensor:
        """A contiguous copy of the layer's blocks at ``index`` (some heads)."""
        tensor, dim = self._heads(layer, heads), self.block_dims[layer]
        if tensor.device.type == "cpu":
            return host_gather(tensor, dim, index)
        return tensor.index_select(dim, index).contiguous()

    def scatter(
        self,
        layer: int,
        index: torch.Tensor,
        blocks: torch.Tensor,
        heads: HeadRange = None,
    ) -> None:
        tensor, dim = self._heads(layer, heads), self.block_dims[layer]
        if tensor.device.type == "cpu":
            host_scatter(tensor, dim, index, blocks)
        else:
            tensor.index_copy_(dim, index, blocks)


# Transfers run on background threads of vLLM's CPU worker. torch's CPU ops
# would start a second OpenMP team there, pinned to the cores the engine's
# team spins on, and stall both; numpy's indexing is single-threaded.
_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _as_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.view(_SAME_SIZE_INT[tensor.element_size()]).numpy()


def host_gather(tensor: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    taken = np.take(_as_numpy(tensor), index.numpy(), axis=dim)
    return torch.from_numpy(taken).view(tensor.dtype)


def host_scatter(
    tensor: torch.Tensor, dim: int, index: torch.Tensor, blocks: torch.Tensor
) -> None:
    selector = (slice(None),) * dim + (index.numpy(),)
    _as_numpy(tensor)[selector] = _as_numpy(blocks.contiguous())
