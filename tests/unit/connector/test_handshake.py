"""Startup handshake: a consumer refuses any producer whose KV it could not
use, and says exactly what differs."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import msgspec
import pytest

import pdserve
from pdserve.connector.compatibility import check_compatible
from pdserve.entrypoints.middleware import node_metadata
from pdserve.frontend.producer_metadata import (
    METADATA_PATH,
    check_producer_metadata,
    fetch_metadata_once,
)
from pdserve.identity import (
    SERVING_LABELS,
    ModelIdentity,
    engine_identity,
    serving_identity,
)
from pdserve.incompatible import IncompatibleProducer
from pdserve.settings import Settings
from pdserve.side_channel.protocol import LayerInfo, RankInfo

NUM_BLOCKS = 500


def layers(
    num_blocks: int = NUM_BLOCKS, count: int = 2, heads: int = 4, head_dim: int = 3
) -> list[LayerInfo]:
    shape = [2, num_blocks, 16, heads, 64]
    return [
        LayerInfo(f"model.layers.{i}.self_attn", shape, "bf16", 1, head_dim)
        for i in range(count)
    ]


def info(**changes) -> RankInfo:
    base = RankInfo(
        pdserve_version="0.1.0",
        protocol_version=1,
        vllm_version="0.32.0",
        model="Qwen/Qwen3-0.6B",
        dtype="bfloat16",
        tp_size=2,
        tp_rank=0,
        block_size=16,
        num_blocks=NUM_BLOCKS,
        layers=layers(),
        transports=["tcp"],
        total_kv_heads=8,
    )
    return msgspec.structs.replace(base, **changes)


def mismatch(local: RankInfo, remote: RankInfo) -> str:
    with pytest.raises(IncompatibleProducer) as exc:
        check_compatible(local, remote)
    return str(exc.value)


def test_identical_infos_pass():
    check_compatible(info(), info())


def test_ranks_of_other_tp_sizes_pass_when_their_heads_agree():
    """TP 2 (4 heads a rank) reading TP 4 (2 heads a rank): which rank holds
    which heads is the mapping's business; the bytes of a head must agree."""
    half = info(tp_size=4, tp_rank=3, layers=layers(heads=2))
    check_compatible(info(), half, whole=False)
    check_compatible(half, info(), whole=False)
    wider = info(tp_size=4, layers=[
        LayerInfo(layer.name, [2, NUM_BLOCKS, 16, 2, 128], "bf16", 1, 3)
        for layer in layers()
    ])  # fmt: skip
    with pytest.raises(IncompatibleProducer, match="KV layout"):
        check_compatible(info(), wider, whole=False)


def test_heads_that_cannot_be_told_apart_refuse_other_tp_sizes():
    unknown = [LayerInfo(x.name, x.shape, x.dtype, 1) for x in layers(heads=2)]
    with pytest.raises(IncompatibleProducer, match="same --tensor-parallel-size"):
        check_compatible(info(), info(tp_size=4, layers=unknown), whole=False)


def test_different_num_blocks_pass():
    # Each node sizes its own KV cache; only the layout must agree.
    remote = info(num_blocks=80, layers=layers(80))
    check_compatible(info(), remote)
    check_compatible(remote, info())


@pytest.mark.parametrize(
    ("shape", "block_dim"),
    [
        (lambda n: [n, 2, 16, 4, 64], 0),  # blocks first
        (lambda n: [2, n, 16, 4, 64], 1),  # K/V first
        (lambda n: [2, 4, n, 16, 64], 2),
        (lambda n: [n, 16, 576], 0),  # MLA-like, no K/V split
    ],
)
def test_num_blocks_ignored_in_any_block_dim(shape, block_dim):
    def with_blocks(n: int) -> RankInfo:
        layer = LayerInfo("model.layers.0.self_attn", shape(n), "bf16", block_dim)
        return info(num_blocks=n, layers=[layer])

    check_compatible(with_blocks(500), with_blocks(37))
    # The same layer with one other dimension changed is refused.
    other = with_blocks(500)
    wider = list(other.layers[0].shape)
    wider[-1] += 1
    other.layers[0] = LayerInfo(other.layers[0].name, wider, "bf16", block_dim)
    with pytest.raises(IncompatibleProducer, match="KV layout"):
        check_compatible(with_blocks(37), other)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            {"model": "other/model"},
            "model: consumer='Qwen/Qwen3-0.6B' producer='other/model'",
        ),
        ({"dtype": "float32"}, "dtype: consumer='bfloat16' producer='float32'"),
        (
            {"tp_size": 4, "total_kv_heads": 16},
            "KV heads of the model: consumer=8 producer=16",
        ),
        ({"block_size": 32}, "block size: consumer=16 producer=32"),
        (
            {"kv_cache_dtype": "fp8_e5m2"},
            "KV cache dtype: consumer='auto' producer='fp8_e5m2'",
        ),
        ({"protocol_version": 2}, "protocol version: consumer=1 producer=2"),
        (
            {"pdserve_version": "0.2.0"},
            "pdserve version: consumer='0.1.0' producer='0.2.0'",
        ),
        (
            {"vllm_version": "0.31.0"},
            "vLLM version: consumer='0.32.0' producer='0.31.0'",
        ),
        ({"layers": layers(count=3)}, "number of KV layers: consumer=2 producer=3"),
        (
            {"identity": ModelIdentity(revision="abc123")},
            "model revision: consumer='' producer='abc123'",
        ),
        (
            {"identity": ModelIdentity(quantization="awq")},
            "quantization: consumer='' producer='awq'",
        ),
        (
            {"identity": ModelIdentity(rope='{"rope_scaling": {"factor": 4.0}}')},
            "RoPE scaling: consumer='' producer='{\"rope_scaling\"",
        ),
        (
            {"identity": ModelIdentity(hf_overrides='{"num_layers": 2}')},
            "--hf-overrides: consumer='' producer='{\"num_layers\": 2}'",
        ),
        (
            {"identity": ModelIdentity(tokenizer="other/tok")},
            "tokenizer: consumer='' producer='other/tok'",
        ),
        (
            {"identity": ModelIdentity(generation_defaults='{"temperature": 0.7}')},
            "generation defaults (generation config): consumer=''",
        ),
    ],
)
def test_mismatch_names_both_values(change, expected):
    message = mismatch(info(), info(**change))
    assert expected in message
    # Only the field that differs is reported.
    assert message.count("consumer=") == 1


def test_layer_block_dim_mismatch():
    remote_layers = [
        LayerInfo(layer.name, [NUM_BLOCKS, 2, 16, 4, 64], layer.dtype, 0)
        for layer in layers()
    ]
    message = mismatch(info(), info(layers=remote_layers))
    assert "model.layers.0.self_attn block dim: consumer=1 producer=0" in message
    assert "model.layers.1.self_attn block dim: consumer=1 producer=0" in message


@pytest.mark.parametrize("dim", [0, 2, 3, 4])
def test_layer_shape_mismatch_outside_block_dim(dim):
    shape = [2, NUM_BLOCKS, 16, 4, 64]
    shape[dim] *= 2
    remote_layers = [
        LayerInfo(layers()[0].name, shape, "bf16", 1),
        layers()[1],
    ]
    message = mismatch(info(), info(layers=remote_layers))
    assert "model.layers.0.self_attn KV layout" in message
    assert "model.layers.1" not in message
    expected = [2, -1, 16, 4, 64]
    theirs = list(expected)
    theirs[dim] = shape[dim]
    assert f"consumer={expected!r} producer={theirs!r}" in message


def test_layer_rank_mismatch():
    remote_layers = [LayerInfo(layers()[0].name, [2, 9, 16, 256], "bf16", 1)]
    remote_layers.append(layers()[1])
    assert "model.layers.0.self_attn KV layout" in mismatch(
        info(), info(layers=remote_layers)
    )


def test_layer_dtype_mismatch():
    remote_layers = [LayerInfo(x.name, x.shape, "f32", x.block_dim) for x in layers()]
    message = mismatch(info(), info(layers=remote_layers))
    assert "model.layers.0.self_attn dtype: consumer='bf16' producer='f32'" in message


def test_all_mismatches_reported_together():
    message = mismatch(info(), info(model="x", dtype="float16", block_size=8))
    assert message.count("consumer=") == 3


# --- metadata check before any engine starts ---------------------------------


def producer_metadata(**overrides) -> dict:
    settings = Settings(
        role="producer",
        model="Qwen/Qwen3-0.6B",
        dtype="bfloat16",
        tensor_parallel_size=2,
        kv_ports=[9000, 9001],
        instance_id="0123456789abcdef",
    )
    # Through JSON, as the consumer receives it.
    metadata = json.loads(json.dumps(node_metadata(settings)))
    metadata.update(overrides)
    return metadata


def consumer_metadata(**overrides) -> dict:
    theirs = producer_metadata()
    mine = {
        key: theirs[key]
        for key in (
            "protocol_version",
            "pdserve_version",
            "vllm_version",
            "model",
            "dtype",
            "tensor_parallel_size",
        )
    }
    mine.update(overrides)
    return mine


def metadata_mismatch(mine: dict, theirs: dict) -> str:
    with pytest.raises(IncompatibleProducer) as exc:
        check_producer_metadata(mine, theirs)
    return str(exc.value)


def test_matching_metadata_passes():
    metadata = producer_metadata()
    assert metadata["protocol_version"] == pdserve.PROTOCOL_VERSION
    assert metadata["kv_ports"] == [9000, 9001]
    check_producer_metadata(consumer_metadata(), metadata)


@pytest.mark.parametrize(
    ("key", "mine", "theirs", "expected"),
    [
        ("model", "a/b", "c/d", "model: consumer='a/b' producer='c/d'"),
        (
            "dtype",
            "float16",
            "bfloat16",
            "dtype: consumer='float16' producer='bfloat16'",
        ),
        ("protocol_version", 1, 2, "protocol_version: consumer=1 producer=2"),
    ],
)
def test_metadata_mismatch_names_both_values(key, mine, theirs, expected):
    message = metadata_mismatch(
        consumer_metadata(**{key: mine}), producer_metadata(**{key: theirs})
    )
    assert expected in message
    assert message.count("consumer=") == 1


@pytest.mark.parametrize(
    ("mine", "theirs"),
    [("auto", "bfloat16"), ("float16", "auto"), ("auto", "auto")],
)
def test_auto_dtype_not_compared(mine, theirs):
    check_producer_metadata(
        consumer_metadata(dtype=mine), producer_metadata(dtype=theirs)
    )


@pytest.mark.parametrize("role", ["consumer", None])
def test_non_producer_refused(role):
    theirs = producer_metadata(role=role)
    if role is None:
        del theirs["role"]
    message = metadata_mismatch(consumer_metadata(), theirs)
    assert "role" in message and repr(role) in message


# --- fetching the metadata ---------------------------------------------------


@pytest.fixture
def metadata_server():
    seen: list[dict] = []
    body = json.dumps(producer_metadata()).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            seen.append({"path": self.path, **dict(self.headers)})
            if self.path != METADATA_PATH:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.mark.parametrize("suffix", ["", "/"])
def test_fetch_metadata_once(metadata_server, suffix):
    url, seen = metadata_server
    got = fetch_metadata_once(url + suffix, timeout=5)
    assert got == producer_metadata()
    assert [s["path"] for s in seen] == [METADATA_PATH]


def test_fetch_sends_headers(metadata_server):
    url, seen = metadata_server
    fetch_metadata_once(url, timeout=5, headers={"Authorization": "Bearer k"})
    assert seen[0]["Authorization"] == "Bearer k"


def test_fetch_on_a_closed_port_means_not_up_yet():
    # OSError: startup (startup_producers) asks again until its deadline.
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    with pytest.raises(OSError):
        fetch_metadata_once(f"http://127.0.0.1:{port}", timeout=1.5)


def test_tp_sizes_may_differ():
    # Heterogeneous TP: the engine pairs ranks of different sizes.
    check_producer_metadata(
        consumer_metadata(tensor_parallel_size=1), producer_metadata()
    )


def test_identity_is_read_from_vllms_resolved_config():
    """What vLLM loaded, not how the flags were spelled."""

    class HfConfig:
        rope_scaling = {"rope_type": "yarn", "factor": 4.0}
        rope_theta = 1e6

    class ModelConfig:
        revision = "main"
        quantization = "fp8"
        hf_config = HfConfig()
        hf_overrides = {"max_position_embeddings": 65536}
        tokenizer = "Qwen/Qwen2-7B-Instruct"
        tokenizer_revision = None

        def get_diff_sampling_param(self):
            return {"top_p": 0.8, "temperature": 0.7}

    identity = engine_identity(ModelConfig())
    assert identity.quantization == "fp8"
    assert '"factor": 4.0' in identity.rope
    assert '"rope_theta": 1000000.0' in identity.rope
    assert identity.hf_overrides == '{"max_position_embeddings": 65536}'
    assert identity.generation_defaults == '{"temperature": 0.7, "top_p": 0.8}'
    assert identity.tokenizer_revision == ""


@pytest.mark.parametrize(
    ("field", "mine", "theirs", "expected"),
    [
        (
            "chat_template",
            "sha256:aaaa",
            "sha256:bbbb",
            "chat template (--chat-template): consumer='sha256:aaaa' "
            "producer='sha256:bbbb'",
        ),
        (
            "lora_modules",
            "sql=/a/sql",
            "",
            "LoRA adapters (--lora-modules): consumer='sql=/a/sql' producer=''",
        ),
        (
            "reasoning_parser",
            "qwen3",
            "deepseek_r1",
            "--reasoning-parser: consumer='qwen3' producer='deepseek_r1'",
        ),
    ],
)
def test_serving_identity_mismatch_names_both_values(field, mine, theirs, expected):
    """Nodes rendering or constraining differently give other tokens: their
    chat template, LoRA adapters and parsers must agree."""
    base = {k: "" for k in SERVING_LABELS}
    consumer = consumer_metadata(serving_identity=base | {field: mine})
    producer = producer_metadata(serving_identity=base | {field: theirs})
    message = metadata_mismatch(consumer, producer)
    assert expected in message
    assert message.count("consumer=") == 1


def test_serving_identity_from_vllms_arguments(tmp_path):
    from argparse import Namespace
    from dataclasses import dataclass

    @dataclass
    class Module:
        name: str
        path: str

    template = tmp_path / "t.jinja"
    template.write_text("{{ messages }}")
    args = Namespace(
        chat_template=str(template),
        lora_modules=[Module("b", "/b"), Module("a", "/a")],
        tokenizer_mode="auto",
    )
    identity = serving_identity(args)
    assert identity["lora_modules"] == "a=/a,b=/b"
    assert identity["chat_template"].startswith("sha256:")
    inline = serving_identity(Namespace(chat_template="{{ messages }}"))
    assert inline["chat_template"] == identity["chat_template"]  # same content
    assert serving_identity(Namespace())["chat_template"] == ""
