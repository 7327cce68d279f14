"""A consumer pointed at a producer with another model or dtype refuses to
start, naming both values."""

from __future__ import annotations

import shutil

import pytest

from pdserve.local_cluster import ServerProcess
from tests.e2e.conftest import engine_args


def start_consumer(cluster, model: str, extra: list[str]) -> ServerProcess:
    args = ["--model", model, "--kv-role", "consumer", "--producer-url"]
    args += [cluster.producer.url, *engine_args(model, 1024), *extra]
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


def test_unreachable_producer_times_out(tmp_path, tiny_model):
    args = ["--model", tiny_model, "--kv-role", "consumer"]
    args += ["--producer-url", "http://127.0.0.1:9", "--producer-connect-timeout", "3"]
    server = ServerProcess.pdserve("orphan-consumer", args, tmp_path)
    code = server.process.wait(timeout=120)
    server.stop()
    assert code != 0
    assert "not reachable within 3s" in server.log_path.read_text()


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
