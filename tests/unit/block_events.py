"""vLLM's own KV event structs, as the prefix index and its subscriber
receive them."""

from __future__ import annotations

from vllm.distributed.kv_events import BlockRemoved, BlockStored

BS = 4
PROMPT = list(range(100, 117))  # 17 tokens: 4 full blocks + 1


def stored(hashes, parent, tokens, block_size=BS, **kw) -> BlockStored:
    fields = dict(lora_id=None, medium="GPU", lora_name=None, group_idx=0)
    return BlockStored(
        block_hashes=list(hashes),
        parent_block_hash=parent,
        token_ids=list(tokens),
        block_size=block_size,
        **(fields | kw),
    )


def removed(hashes) -> BlockRemoved:
    return BlockRemoved(block_hashes=list(hashes), medium="GPU", group_idx=0)
