"""Copy KV blocks between two paged caches (or a cache and a staging buffer)
in one kernel launch, for every layer at once.

A layer's block is a few equal contiguous segments (K and V halves, or one
run for blocks-first layouts), found from the tensor's strides. One Triton
program copies one tile of one segment of one (source block, destination
block) pair; addresses are computed in the kernel from per-layer bases and
the two block id lists, so a transfer uploads only its block ids. All
addresses are offsets from one local base pointer: the source may be another
GPU's memory mapped into this process (CUDA/HIP IPC, peer access), read in
place, with no staging anywhere. Triton runs on CUDA and ROCm.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch

from pdserve.log import init_logger

logger = init_logger(__name__)

TILE_WORDS = 1024


@dataclass(frozen=True)
class BlockLayout:
    """Where blocks live in one layer tensor, in bytes."""

    base: int  # address of the tensor's first element
    segment_offsets: tuple[int, ...]  # of each segment of block 0
    segment_bytes: int
    block_stride: int


# More segments per block than this is a layout not worth copying this way.
MAX_SEGMENTS = 4096


def block_layout(tensor: torch.Tensor, block_dim: int) -> BlockLayout:
    """Segments of a block, from strides: the innermost dims that are dense
    make one contiguous segment; every other dim repeats it. Covers K/V-first
    layouts (two segments), blocks-first ones (one) and block-outermost ones,
    where a block holds every layer's page and a layer's page sits between
    the other layers' (vLLM's B-outer KVCacheLayouts)."""
    elem = tensor.element_size()
    dims = sorted(
        (d for d in range(tensor.dim()) if d != block_dim and tensor.shape[d] > 1),
        key=tensor.stride,
    )
    run, dense = 1, 0
    while dense < len(dims) and tensor.stride(dims[dense]) == run:
        run *= tensor.shape[dims[dense]]
        dense += 1
    offsets = [0]
    for d in dims[dense:]:
        offsets = [
            o + i * tensor.stride(d) for o in offsets for i in range(tensor.shape[d])
        ]
        if len(offsets) > MAX_SEGMENTS:
            raise ValueError(
                f"KV layout {tuple(tensor.shape)} / {tensor.stride()} splits a "
                f"block into more than {MAX_SEGMENTS} pieces"
            )
    return BlockLayout(
        base=tensor.data_ptr(),
        segment_offsets=tuple(sorted(o * elem for o in offsets)),
        segment_bytes=run * elem,
        block_stride=tensor.stride(block_dim) * elem,
    )


def staging_layouts(
    base: int, layers: list[tuple[int, int]], num: int
) -> list[BlockLayout]:
    """Layouts of a flat buffer holding ``num`` gathered blocks per layer, as
    (segments, segment_bytes) per layer: layer after layer, segment after
    segment, block after block."""
    result, offset = [], base
    for segments, size in layers:
        span = size * num
        result.append(
            BlockLayout(
                base=offset,
                segment_offsets=tuple(i * span for i in range(segments)),
                segment_bytes=size,
                block_stride=size,
            )
        )
        offset += span * segments
    return result


class BlockCopier:
    """Copies blocks from ``src`` layouts to ``dst`` layouts (layer by layer
    pairs) on ``device``; build once per pair of caches."""

    def __init__(
        self, src: list[BlockLayout], dst: list[BlockLayout], anchor: torch.Tensor
    ) -> None:
        if len(src) != len(dst):
            raise ValueError("source and destination have different layer counts")
        shapes = {(len(s.segment_offsets), s.segment_bytes) for s in src + dst}
        if len(shapes) != 1:
            raise ValueError(f"layers differ in block segments: {sorted(shapes)}")
        ((self.num_segments, self.segment_bytes),) = shapes
        self.src_layouts = src  # ipc reads its source tensors' layouts
        self.word = _word_size(_storage_bytes(anchor).data_ptr(), src + dst)
        # The kernel's one pointer: the anchor's whole storage (any local
        # tensor will do); every address is an offset from it.
        self._base = _storage_bytes(anchor).view(_WORD_DTYPES[self.word])
        base = self._base.data_ptr()
        device = anchor.device

        def table(values: list[int]) -> torch.Tensor:
            assert all(v % self.word == 0 for v in values)
            words = [v // self.word for v in values]
            return torch.tensor(words, dtype=torch.int64, device=device)

        self._src_seg = table(
            [s.base - base + o for s in src for o in s.segment_offsets]
        )
        self._dst_seg = table(
            [d.base - base + o for d in dst for o in d.segment_offsets]
        )
        self._src_stride = table([s.block_stride for s in src])
        self._dst_stride = table([d.block_stride for d in dst])
        self.num_layers = len(src)

    def _args(self, src_blocks: torch.Tensor, dst_blocks: torch.Tensor) -> tuple:
        return (
            self._base,
            self._src_seg,
            self._dst_seg,
            self._src_stride,
            self._dst_stride,
            src_blocks,
            dst_blocks,
            len(src_blocks),
            self.num_segments,
            self.segment_bytes // self.word,
        )

    def warmup(self) -> None:
        """Compile the kernel for this pair of caches now (at pairing), not
        on the first reads: Triton compiles on first launch, milliseconds
        each, inside a request's time to first token."""
        if self._base.device.type != "cuda":
            return  # the CPU interpreter compiles nothing
        one = block_ids_on([0], self._base.device)
        try:
            with torch.cuda.device(self._base.device):
                _kernel().warmup(*self._args(one, one), TILE=TILE_WORDS, grid=(1,))
        except Exception as exc:  # a Triton without warmup: compiled on first use
            logger.info("pdserve: copy kernel not compiled ahead: %r", exc)

    def copy(
        self,
        src_blocks: torch.Tensor,
        dst_blocks: torch.Tensor,
        stream: torch.cuda.Stream | None = None,
    ) -> None:
        """Enqueue the copy of every layer's ``src_blocks[i]`` to
        ``dst_blocks[i]`` (int64 tensors on the anchor's device)."""
        pairs = len(src_blocks)
        if pairs == 0:
            return
        rows = self.num_layers * self.num_segments * pairs
        seg_words = self.segment_bytes // self.word
        grid = (rows, -(-seg_words // TILE_WORDS))
        kernel = _kernel()
        args = self._args(src_blocks, dst_blocks)
        if stream is None or self._base.device.type != "cuda":
            kernel[grid](*args, TILE=TILE_WORDS)
            return
        with torch.cuda.device(self._base.device), torch.cuda.stream(stream):
            kernel[grid](*args, TILE=TILE_WORDS)


def block_ids_on(ids: list[int] | range, device: torch.device) -> torch.Tensor:
    """``ids`` as an int64 tensor on ``device``, uploaded without blocking
    the host: from pinned memory, asynchronously on the current stream (a
    pageable upload would wait for whatever the GPU runs now, e.g. the
    engine's forward). Torch's pinned-memory cache keeps the buffer until
    the copy is done."""
    host = torch.tensor(list(ids), dtype=torch.int64)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _word_size(base: int, layouts: list[BlockLayout]) -> int:
    values = [base, *(lay.base for lay in layouts)]
    values += [o for lay in layouts for o in lay.segment_offsets]
    values += [lay.segment_bytes for lay in layouts] + [
        lay.block_stride for lay in layouts
    ]
    for word in (8, 4, 2, 1):
        if all(v % word == 0 for v in values):
            return word
    return 1


_WORD_DTYPES = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


def _storage_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """All of the tensor's storage as bytes (views and strides aside)."""
    flat = torch.empty(0, dtype=torch.uint8, device=tensor.device)
    flat.set_(tensor.untyped_storage())
    usable = len(flat) // 8 * 8
    return flat[:usable]


@cache
def _kernel():
    # Built on first use: TRITON_INTERPRET (CPU tests) is read at definition.
    import triton
    import triton.language as tl

    # The block count varies per read; specializing on it would compile a new
    # variant the first time a count of new divisibility comes (ms each, on
    # the first requests): one compile, at the session's probe, serves all.
    @triton.jit(do_not_specialize=["pairs"])
    def copy_blocks(
        base,
        src_seg,
        dst_seg,
        src_stride,
        dst_stride,
        src_blocks,
        dst_blocks,
        pairs,
        segments,
        seg_words,
        TILE: tl.constexpr,
    ):
        row = tl.program_id(0)
        tile = tl.program_id(1)
        pair = row % pairs
        seg = (row // pairs) % segments
        layer = row // (pairs * segments)
        src = tl.load(src_seg + layer * segments + seg) + tl.load(
            src_blocks + pair
        ) * tl.load(src_stride + layer)
        dst = tl.load(dst_seg + layer * segments + seg) + tl.load(
            dst_blocks + pair
        ) * tl.load(dst_stride + layer)
        offs = tile * TILE + tl.arange(0, TILE)
        mask = offs < seg_words
        values = tl.load(base + src + offs, mask=mask)
        tl.store(base + dst + offs, values, mask=mask)

    return copy_blocks
