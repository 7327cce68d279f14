"""Build (once) and cache a tiny random Qwen2 causal LM that vLLM can serve.

Tests and benchmarks need a real Hugging Face model directory, but model hubs are
unreachable here, so everything (tokenizer included) is produced offline from a
corpus that ships in this module.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

# torch/transformers take seconds to import; deferring them keeps the cached
# path (and importing this module) nearly free.
if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerFast, Qwen2Config

# Bump the suffix whenever the build recipe changes so stale caches are ignored.
DEFAULT_DIR_NAME = "tiny-qwen2-v1"
ENV_VAR = "PDSERVE_TINY_MODEL_DIR"
MARKER = ".complete"
SEED = 1234
VOCAB_SIZE = 1024
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] }}"
    "{{ '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = """\
The weather changed quickly over the hills this morning. A cold wind came down
from the north, the sky turned grey, and by noon a light rain was falling on the
fields. Farmers watched the clouds with care, because a late frost can ruin the
young plants. In the evening the rain stopped, the air smelled of wet grass, and
a thin line of orange light appeared above the western mountains. Forecasters
said the next few days would be mild and dry, with gentle breezes from the sea
and clear nights that are perfect for watching the stars.

Cooking a good soup starts with patience. First, warm some oil in a heavy pot and
add chopped onions, carrots, and celery. Stir them slowly until they are soft and
sweet. Then add garlic, a pinch of salt, and a few fresh herbs such as thyme or
parsley. Pour in the stock, bring it to a simple boil, and lower the heat. Let
the soup cook for at least half an hour so the flavors can blend. A spoon of
lemon juice at the end makes the taste bright, and fresh bread on the side turns
a plain bowl into a real meal for the whole family.

Computer networks move data in small packets. Each packet carries an address, so
routers can decide where to send it next. When a server receives a request, it
reads the message, does some work, and sends a response back across the network.
Latency is the time a packet needs to travel, while bandwidth is how much data
can flow each second. Good systems keep both in mind: they batch small messages,
reuse open connections, and avoid waiting on slow links. When a link fails, the
network finds another path, and the user rarely notices that anything happened.

A large language model reads a prompt, splits it into tokens, and predicts the
next token again and again. Serving such a model well means sharing the work
between machines. One group of workers can process the long prompt, while
another group generates the answer one token at a time. The cache of keys and
values moves between them, and a small scheduler decides which request runs
next. Careful engineers measure the time to the first token, the time between
tokens, and the total number of requests served every minute.
"""


def default_model_dir() -> Path:
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "pdserve" / DEFAULT_DIR_NAME


def _train_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Byte-level BPE can encode any input (emoji, other scripts) despite the tiny
    # English-only corpus, so real-world prompts never hit an unknown token.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Repetition only scales pair counts; it keeps merges stable across runs.
    tok.train_from_iterator([CORPUS] * 20, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
    )


def _random_state_dict(
    config: Qwen2Config, special_ids: list[int]
) -> dict[str, torch.Tensor]:
    import torch
    from transformers import Qwen2ForCausalLM

    # Shapes come from a meta-device model so names always match what loaders
    # expect; values come from our own generator so bytes do not depend on the
    # transformers init code or on parameter registration order.
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Qwen2ForCausalLM(config).state_dict().items()}
    gen = torch.Generator().manual_seed(SEED)
    state: dict[str, torch.Tensor] = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if name.endswith("norm.weight"):
            state[name] = torch.ones(shape)
        elif name.endswith(".bias"):
            state[name] = torch.randn(shape, generator=gen) * 0.02
        elif name in ("model.embed_tokens.weight", "lm_head.weight"):
            # Large std gives peaky, input-dependent logits, so greedy decoding
            # wanders through the vocabulary instead of repeating one token.
            state[name] = torch.randn(shape, generator=gen) * 0.5
        else:
            std = shape[-1] ** -0.5
            state[name] = torch.randn(shape, generator=gen) * std
    # Special tokens never win under greedy decoding, so generations always run
    # to max_tokens and length-based tests stay deterministic.
    state["lm_head.weight"][special_ids] = 0.0
    return {k: v.contiguous() for k, v in state.items()}


def _build(out: Path) -> None:
    from safetensors.torch import save_file
    from transformers import Qwen2Config

    tokenizer = _train_tokenizer()
    vocab = tokenizer.get_vocab()
    special_ids = [vocab[t] for t in SPECIAL_TOKENS]
    eos_id, pad_id = vocab["<|im_end|>"], vocab["<|endoftext|>"]
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        # vLLM's CPU attention kernels need head_dim >= 32 (16 is rejected), so
        # width is 128: 4 query / 2 KV heads of 32 keeps GQA real.
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        use_sliding_window=False,
        bos_token_id=pad_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        dtype="float32",
    )
    # Not a Qwen2Config field in transformers 5, but tools that size KV caches
    # (connectors, older loaders) read it from config.json rather than derive it.
    config.head_dim = 32

    # Keep the chat template inside tokenizer_config.json, where every client
    # (older transformers, vLLM) looks for it.
    tokenizer.save_pretrained(out, save_jinja_files=False)
    config.save_pretrained(out)
    weights = _random_state_dict(config, special_ids)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    gen_cfg = {
        "bos_token_id": pad_id,
        "eos_token_id": [eos_id, pad_id],
        "pad_token_id": pad_id,
        "do_sample": False,
    }
    (out / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n")
    # mkdtemp/safetensors create owner-only modes; a shared cache needs readable.
    out.chmod(0o755)
    for f in out.iterdir():
        f.chmod(0o644)
    # Written last: its presence means every other file is fully on disk.
    (out / MARKER).write_text("ok\n")


def ensure_tiny_model(path: str | None = None) -> str:
    """Return a directory holding the tiny model, building it on first use."""
    target = Path(path).expanduser() if path else default_model_dir()
    if (target / MARKER).is_file():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target so the final rename stays on one filesystem and is
    # atomic; concurrent builders then either win the rename or see a full copy.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        _build(tmp)
        if target.exists() and not (target / MARKER).is_file():
            # Leftover partial directory (not produced by us); it is unusable.
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else None
    sys.stdout.write(ensure_tiny_model(path) + "\n")


if __name__ == "__main__":
    main()
