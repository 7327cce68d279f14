"""The consumer's prefix index, fed vLLM's own event structs."""

from __future__ import annotations

from vllm.distributed.kv_events import AllBlocksCleared, BlockStored

from pdserve.frontend.prefix_index import PrefixIndex
from tests.unit.block_events import BS, PROMPT, removed, stored


def test_chain_lookup_counts_full_blocks_and_never_the_last_token():
    index = PrefixIndex(BS)
    index.apply([stored([1, 2], None, PROMPT[:8]), stored([3], 2, PROMPT[8:12])])
    assert index.cached_tokens(PROMPT) == 12
    assert index.cached_tokens(PROMPT[:10]) == 8
    # vLLM recomputes the last prompt token: 12 tokens can hit 8 at most.
    assert index.cached_tokens(PROMPT[:12]) == 8
    assert index.cached_tokens(PROMPT[:13]) == 12
    # A partial trailing block never counts.
    assert index.cached_tokens(PROMPT[:11]) == 8
    assert index.entry(3) == (2, PROMPT[8:12])


def test_same_tokens_under_another_parent_do_not_match():
    index = PrefixIndex(BS)
    index.apply([stored([1, 2], None, [9, 9, 9, 9] + PROMPT[4:8])])
    assert index.cached_tokens(PROMPT) == 0
    other = [7, 7, 7, 7] + PROMPT[4:]
    assert index.cached_tokens(other) == 0


def test_removal_makes_children_unreachable_and_restore_revives_them():
    index = PrefixIndex(BS)
    index.apply([stored([1, 2, 3], None, PROMPT[:12])])
    index.apply([removed([2])])
    assert index.cached_tokens(PROMPT) == 4
    index.apply([removed([1])])
    assert index.cached_tokens(PROMPT) == 0
    # vLLM re-caches the evicted parents; the child it kept is reachable again.
    index.apply([stored([1, 2], None, PROMPT[:8])])
    assert index.cached_tokens(PROMPT) == 12


def test_child_of_unknown_parent_is_ignored():
    index = PrefixIndex(BS)
    index.apply([stored([5], 99, PROMPT[4:8])])
    assert len(index) == 0 and index.ignored_events == 1


def test_all_blocks_cleared():
    index = PrefixIndex(BS)
    index.apply([stored([1, 2], None, PROMPT[:8])])
    index.apply([AllBlocksCleared()])
    assert index.cached_tokens(PROMPT) == 0 and len(index) == 0


def test_other_block_sizes_groups_media_are_not_counted():
    index = PrefixIndex(BS)
    # vLLM's sub-block "partial" entry: one hash, block_size < the engine's.
    index.apply([stored([1], None, PROMPT[:2], block_size=2)])
    index.apply(
        [BlockStored(**{**_fields(stored([2], None, PROMPT[:4])), "group_idx": 1})]
    )
    index.apply(
        [BlockStored(**{**_fields(stored([3], None, PROMPT[:4])), "medium": "CPU"})]
    )
    # Hash/token mismatch (null blocks skipped): not indexable.
    index.apply([stored([4], None, PROMPT[:8])])
    assert len(index) == 0 and index.ignored_events == 4


def _fields(event) -> dict:
    return {f: getattr(event, f) for f in event.__struct_fields__}


def test_block_size_adopted_from_first_event():
    index = PrefixIndex()
    index.apply([stored([1], None, PROMPT[:4])])
    assert index.block_size == BS and index.cached_tokens(PROMPT) == 4


def test_cache_salt_and_lora_extra_keys():
    index = PrefixIndex(BS)
    index.apply([stored([1, 2], None, PROMPT[:8], extra_keys=[("salt-a",), None])])
    assert index.cached_tokens(PROMPT) == 0
    assert index.cached_tokens(PROMPT, cache_salt="salt-b") == 0
    assert index.cached_tokens(PROMPT, cache_salt="salt-a") == 8
    lora = PrefixIndex(BS)
    lora.apply([stored([1], None, PROMPT[:4], lora_name="ad", extra_keys=[("ad",)])])
    assert lora.cached_tokens(PROMPT) == 0


def test_restore_is_idempotent_and_memory_is_bounded():
    index = PrefixIndex(BS, max_blocks=3)
    index.apply([stored([1, 2], None, PROMPT[:8])])
    index.apply([stored([1, 2], None, PROMPT[:8])])  # "full" report mode re-store
    assert len(index) == 2
    index.apply([stored([3, 4], 2, PROMPT[8:16])])
    assert len(index) == 3 and index.dropped_blocks == 1
    # The oldest (block 1, the root) went: nothing is reachable.
    assert index.cached_tokens(PROMPT) == 0
