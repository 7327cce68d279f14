"""Start pdserve (or plain vLLM) servers as local processes: for the demo,
the tests and the benchmarks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from pdserve.ports import free_ports

# Plain vLLM through the same serve path pdserve uses, minus the connector.
PLAIN_VLLM = (
    "import sys\n"
    "from pdserve.entrypoints.api_server import run_vllm_serve\n"
    "if __name__ == '__main__':\n"
    "    run_vllm_serve(sys.argv[1:])\n"
)


def scrape_metrics(url: str) -> dict[str, float]:
    """Every sample on ``url``'s /metrics, summed over labels, by name."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url + "/metrics", timeout=30) as response:
        text = response.read().decode()
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def scrape_by_label(url: str, name: str, label: str) -> dict[str, float]:
    """The samples of metric ``name`` on ``url``'s /metrics, by ``label``."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url + "/metrics", timeout=30) as response:
        text = response.read().decode()
    return {
        sample.labels.get(label, ""): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    }


def free_port() -> int:
    return free_ports("127.0.0.1", 1)[0]


def cpu_env(kv_cache_gib: int = 1, cores: str | None = None) -> dict[str, str]:
    """Environment of a vLLM CPU server; ``cores`` pins its OpenMP team
    (vLLM's VLLM_CPU_OMP_THREADS_BIND), so that nodes sharing one machine
    do not spin on each other's cores."""
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    env.setdefault("PYTHONUNBUFFERED", "1")
    if cores is not None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = cores
    return env


def split_cores() -> tuple[str | None, str | None]:
    """Cores for a producer and a consumer on this machine, or no pinning."""
    count = os.cpu_count() or 1
    if count < 2:
        return None, None
    half = count // 2
    return core_range(half, count - 1), core_range(0, half - 1)


def core_range(first: int, last: int) -> str:
    """Cores first..last as VLLM_CPU_OMP_THREADS_BIND spells them."""
    return str(first) if first == last else f"{first}-{last}"


class ServerProcess:
    def __init__(
        self, name: str, argv: list[str], port: int, log_dir: Path, env: dict
    ) -> None:
        self.name = name
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - lives with the process
        self.process = subprocess.Popen(
            argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )

    @classmethod
    def pdserve(
        cls,
        name: str,
        args: list[str],
        log_dir: Path,
        env: dict | None = None,
        port: int | None = None,
    ) -> ServerProcess:
        port = port or free_port()
        argv = [sys.executable, "-m", "pdserve.entrypoints.api_server"]
        argv += ["--port", str(port), "--host", "127.0.0.1", *args]
        return cls(name, argv, port, log_dir, env or cpu_env())

    @classmethod
    def plain_vllm(
        cls, name: str, args: list[str], log_dir: Path, env: dict | None = None
    ) -> ServerProcess:
        port = free_port()
        script = log_dir / "plain_vllm.py"
        script.write_text(PLAIN_VLLM)
        argv = [sys.executable, str(script), args[0], "--port", str(port)]
        argv += ["--host", "127.0.0.1", *args[1:]]
        return cls(name, argv, port, log_dir, env or cpu_env())

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.process.returncode}:\n{self.tail()}"
                )
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1)
        raise TimeoutError(f"{self.name} not ready after {timeout}s:\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        self._log.flush()
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def kill(self) -> None:
        """SIGKILL the whole server (API, engine and workers), no cleanup."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self, timeout: float = 30) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()
