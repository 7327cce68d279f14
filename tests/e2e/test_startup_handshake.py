"""A consumer pointed at a producer with another model, dtype, block size,
KV cache dtype or KV secret refuses to start, naming both values or the
cause. (One whose producers are all down starts: test_hardening.py.)"""

from __future__ import annotations

import shutil

import pytest
import requests
import torch

from pdserve.local_cluster import ServerProcess
from tests.e2e.conftest import KV_SECRET, engine_args


def start_consumer(
    cluster, model: str, extra: list[str], secret: str | None = KV_SECRET
) -> ServerProcess:
    args = ["--model", model, "--kv-role", "consumer", "--producer-url"]
    args += [cluster.producer.url, *engine_args(model, 1024), *extra]
    if secret is not None:
        args += ["--kv-secret", secret]
    return ServerProcess.pdserve("bad-consumer", args, cluster.log_dir)


def exit_output(server: ServerProcess) -> tuple[int, str]:
    code = server.process.wait(timeout=120)
    server.stop()
    return code, server.log_path.read_text()


def test_other_dtype_refused(cluster):
    # The later --dtype wins, as in vLLM's own parser.
    code, log = exit_output(
        start_consumer(cluster, cluster.model, ["--dtype", "bfloat16"])
    )
    assert code != 0
    assert "dtype: consumer='bfloat16' producer='float32'" in log


def test_other_model_refused(cluster, tmp_path):
    other = shutil.copytree(cluster.model, tmp_path / "other-model")
    code, log = exit_output(start_consumer(cluster, str(other), []))
    assert code != 0
    assert f"model: consumer='{other}' producer='{cluster.model}'" in log


@pytest.fixture(autouse=True)
def _producer_still_serves(cluster):
    yield
    assert cluster.producer.process.poll() is None


def test_other_block_size_refused_by_rank_handshake(cluster):
    # Block size only exists once the engine is configured: the consumer's
    # rank compares it with the producer rank's and the engine refuses to start.
    code, log = exit_output(
        start_consumer(cluster, cluster.model, ["--block-size", "64"])
    )
    assert code != 0
    assert "block size: consumer=64 producer=32" in log


def test_wrong_kv_secret_refused(cluster):
    wrong = "not-the-e2e-secret"
    code, log = exit_output(start_consumer(cluster, cluster.model, [], secret=wrong))
    assert code != 0
    assert "KV secret rejected by producer" in log
    assert wrong not in log and KV_SECRET not in log


def test_missing_kv_secret_refused(cluster):
    code, log = exit_output(start_consumer(cluster, cluster.model, [], secret=None))
    assert code != 0
    assert "producer requires a KV secret (--kv-secret / PDSERVE_KV_SECRET)" in log


def test_kv_secret_never_shown(cluster):
    metadata = requests.get(cluster.producer.url + "/pdserve/metadata", timeout=10)
    assert metadata.json()["kv_auth"] is True
    assert KV_SECRET not in metadata.text
    for server in (cluster.producer, cluster.consumer):
        assert KV_SECRET not in server.log_path.read_text(errors="replace")


@pytest.mark.skipif(
    not (torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported()),
    reason="vLLM's CPU backend has an fp8 KV cache only with AVX-512 or AMX",
)
def test_other_kv_cache_dtype_refused_by_rank_handshake(cluster):
    # Same model, dtype and block size; only the KV cache's layout differs.
    code, log = exit_output(
        start_consumer(cluster, cluster.model, ["--kv-cache-dtype", "fp8_e5m2"])
    )
    assert code != 0
    assert "KV cache dtype: consumer='fp8_e5m2' producer='auto'" in log
    layer = "model.layers.0.self_attn.attn"
    assert f"{layer} dtype: consumer='uint8' producer='float32'" in log
