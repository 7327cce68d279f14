"""What makes two nodes compute the same KV and tokens beyond model name and
dtype: the weights' revision and quantization, RoPE scaling and config
overrides, tokenizer, the model's generation defaults. Nodes that differ in
any of these would produce other tokens silently, and poison the consumer's
prefix cache with KV of another model: the handshake compares them and
names both values (``connector.compatibility.check_compatible``).

Read from the engine's own resolved config (what vLLM actually loaded), so
flags spelled differently but meaning the same compare equal.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
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


# What the API server renders and constrains with, beyond the engine's own
# config: compared through /pdserve/metadata before any engine starts.
SERVING_LABELS = {
    "chat_template": "chat template (--chat-template)",
    "chat_template_content_format": "--chat-template-content-format",
    "lora_modules": "LoRA adapters (--lora-modules)",
    "tokenizer_mode": "--tokenizer-mode",
    "reasoning_parser": "--reasoning-parser",
    "tool_call_parser": "--tool-call-parser",
    "structured_outputs_backend": "structured outputs backend",
}


def serving_identity(args: Any) -> dict[str, str]:
    """This node's serving identity from ``vllm serve``'s parsed arguments:
    a chat template by its content's digest (a path or inline text), LoRA
    adapters by name and path."""
    structured = getattr(args, "structured_outputs_config", None)
    modules = getattr(args, "lora_modules", None) or []
    return {
        "chat_template": _template_digest(getattr(args, "chat_template", None)),
        "chat_template_content_format": str(
            getattr(args, "chat_template_content_format", "") or ""
        ),
        "lora_modules": ",".join(
            sorted(f"{m.name}={m.path}" for m in modules if hasattr(m, "name"))
        ),
        "tokenizer_mode": str(getattr(args, "tokenizer_mode", "") or ""),
        "reasoning_parser": str(getattr(args, "reasoning_parser", "") or ""),
        "tool_call_parser": str(getattr(args, "tool_call_parser", "") or ""),
        "structured_outputs_backend": str(getattr(structured, "backend", "") or ""),
    }


def _template_digest(template: str | None) -> str:
    if not template:
        return ""  # the tokenizer's own (the model, revision and tokenizer say)
    path = Path(template)
    try:
        data = path.read_bytes() if path.is_file() else template.encode()
    except OSError:
        data = template.encode()
    return "sha256:" + hashlib.sha256(data).hexdigest()[:16]


def serving_pairs(
    mine: dict[str, str], theirs: Any
) -> list[tuple[str, object, object]]:
    """(label, consumer's, producer's) of each serving identity field.
    Metadata without one compares nothing (its pdserve version differs,
    which is refused on its own)."""
    if not isinstance(theirs, dict):
        return []
    return [
        (label, mine.get(key, ""), theirs.get(key, ""))
        for key, label in SERVING_LABELS.items()
    ]


def identity_pairs(
    mine: ModelIdentity, theirs: ModelIdentity
) -> list[tuple[str, object, object]]:
    return [
        (label, getattr(mine, field), getattr(theirs, field))
        for field, label in LABELS.items()
    ]
