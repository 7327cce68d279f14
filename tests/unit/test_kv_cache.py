"""Gather/scatter of paged KV: the host path (numpy, used on CPU workers) and
the device path (index_select / index_copy_, used on GPUs) agree bit for bit,
on CPU tensors of every layout and dtype."""

from __future__ import annotations

import math

import pytest
import torch

from pdserve.kv_cache import PagedKVCache, find_block_dim, host_gather, host_scatter
from pdserve.transport.base import layer_sizes

NUM_BLOCKS = 23
SHAPES = [
    (2, NUM_BLOCKS, 32, 4, 16),
    (NUM_BLOCKS, 2, 32, 4, 16),
    (2, NUM_BLOCKS, 4, 32, 16),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_host_and_device_paths_agree(shape, dtype):
    tensor = torch.randn(shape).to(dtype)
    dim = find_block_dim(tensor, NUM_BLOCKS)
    index = torch.tensor([7, 0, 22, 3])
    gathered = host_gather(tensor, dim, index)
    assert torch.equal(
        gathered.view(torch.uint8), tensor.index_select(dim, index).view(torch.uint8)
    )

    by_host, by_device = torch.zeros_like(tensor), torch.zeros_like(tensor)
    target = torch.tensor([1, 2, 20, 9])
    host_scatter(by_host, dim, target, gathered)
    by_device.index_copy_(dim, target, gathered)
    assert torch.equal(by_host.view(torch.uint8), by_device.view(torch.uint8))
    assert torch.equal(
        by_host.index_select(dim, target).view(torch.uint8), gathered.view(torch.uint8)
    )


def test_block_dim_is_the_paged_one_even_when_sizes_collide():
    # K/V dim of size 2 and a block count of 2: the paged dim has the larger stride.
    assert find_block_dim(torch.zeros(2, 2, 16, 4, 8), 2) == 0
    assert find_block_dim(torch.zeros(2, NUM_BLOCKS, 16, 4, 8), NUM_BLOCKS) == 1
    with pytest.raises(ValueError, match="num_blocks=5"):
        find_block_dim(torch.zeros(2, 4, 8), 5)


def test_gathered_blocks_fill_each_layers_bytes():
    caches = {
        "a": torch.zeros(2, NUM_BLOCKS, 32, 4, 16, dtype=torch.bfloat16),
        "b": torch.zeros(NUM_BLOCKS, 2, 32, 4, 16, dtype=torch.bfloat16),
    }
    kv = PagedKVCache(caches, NUM_BLOCKS)
    sizes = layer_sizes(kv, 3)
    assert sum(sizes) == kv.bytes_per_block() * 3
    for layer, size in enumerate(sizes):
        shape = kv.gathered_shape(layer, 3)
        assert shape[kv.block_dims[layer]] == 3
        assert math.prod(shape) * 2 == size  # bfloat16: 2 bytes
