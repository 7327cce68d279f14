"""What makes two nodes compute the same KV and tokens beyond model name and
dtype: the weights' revision and quantization, RoPE scaling and config
overrides, tokenizer, the model's generation defaults. Nodes that differ in
any of these would produce other tokens silently, and poison the consumer's
prefix cache with KV of another model: the handshake compares them and
names both values (``handshake.check_compatible``).

Read from the engine's own resolved config (what vLLM actually loaded), so
flags spelled differently but meaning the same compare equal.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec


class ModelIdentity(msgspec.Struct, frozen=True, kw_only=True):
    revision: str = ""
    quantization: str = ""
    rope: str = ""
    hf_overrides: str = ""
    tokenizer: str = ""
    tokenizer_revision: str = ""
    generation_defaults: str = ""


LABELS = {
    "revision": "model revision",
    "quantization": "quantization",
    "rope": "RoPE scaling",
    "hf_overrides": "--hf-overrides",
    "tokenizer": "tokenizer",
    "tokenizer_revision": "tokenizer revision",
    "generation_defaults": "generation defaults (generation config)",
}


def _canonical(value: Any) -> str:
    """A stable text of a config value ("" for none)."""
    if value in (None, {}, [], ""):
        return ""
    if callable(value):
        name = getattr(value, "__qualname__", type(value).__name__)
        return f"{getattr(value, '__module__', '')}.{name}"
    return json.dumps(value, sort_keys=True, default=str)


def _rope(hf_config: Any) -> str:
    text_config = getattr(hf_config, "get_text_config", lambda: hf_config)()
    fields = ("rope_scaling", "rope_parameters", "rope_theta")
    return _canonical({f: getattr(text_config, f, None) for f in fields} or None)


def _generation_defaults(model_config: Any) -> str:
    try:
        return _canonical(model_config.get_diff_sampling_param())
    except Exception as exc:  # a config vLLM cannot read: compare the error
        return f"unreadable: {type(exc).__name__}"


def engine_identity(model_config: Any) -> ModelIdentity:
    """This node's identity from vLLM's resolved ModelConfig."""
    return ModelIdentity(
        revision=str(getattr(model_config, "revision", None) or ""),
        quantization=str(getattr(model_config, "quantization", None) or ""),
        rope=_rope(getattr(model_config, "hf_config", None)),
        hf_overrides=_canonical(getattr(model_config, "hf_overrides", None)),
        tokenizer=str(getattr(model_config, "tokenizer", None) or ""),
        tokenizer_revision=str(getattr(model_config, "tokenizer_revision", None) or ""),
        generation_defaults=_generation_defaults(model_config),
    )


def identity_pairs(
    mine: ModelIdentity, theirs: ModelIdentity
) -> list[tuple[str, object, object]]:
    return [
        (label, getattr(mine, field), getattr(theirs, field))
        for field, label in LABELS.items()
    ]
