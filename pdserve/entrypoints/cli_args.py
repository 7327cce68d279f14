"""Command line: pdserve's own flags; every other flag goes to ``vllm serve``."""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable
from urllib.parse import urlparse

from pdserve.ports import free_ports
from pdserve.settings import EXTRA_CONFIG_KEY, KV_SECRET_ENV_VAR, Settings, default
from pdserve.transport import CHOICES

ROLES = {
    "producer": "producer",
    "kv_producer": "producer",
    "consumer": "consumer",
    "kv_consumer": "consumer",
}
DTYPE_ALIASES = {"half": "float16", "float": "float32", "bf16": "bfloat16"}
CONNECTOR_MODULE = "pdserve.connector.connector"
CONNECTOR_CLASS = "PDServeConnector"
MIDDLEWARE = "pdserve.entrypoints.middleware.PDServeMiddleware"
# The first token from the producer needs a scheduler hook (connector/
# first_token.py): on both nodes (the producer puts t1's logprobs in leases).
SCHEDULER_CLS = "pdserve.connector.first_token.make_scheduler"

# vLLM flags pdserve cannot serve: each data/pipeline parallel rank would
# open the same KV ports (and the consumer's pairing knows one engine).
UNSUPPORTED_PARALLEL = {
    "data_parallel_size": "data parallel (--data-parallel-size/-dp)",
    "pipeline_parallel_size": "pipeline parallel (--pipeline-parallel-size/-pp)",
}


# Each flag that sets a Settings field (argparse dest -> field): make_settings
# copies them, and their defaults are the fields' own (one source per fact).
SETTINGS_FLAGS = {
    "kv_role": "role",
    "model": "model",
    "dtype": "dtype",
    "tensor_parallel_size": "tensor_parallel_size",
    "max_model_len": "max_model_len",
    "kv_transport": "transport",
    "kv_host": "kv_host",
    "kv_lease_seconds": "lease_seconds",
    "kv_max_leased_fraction": "max_leased_fraction",
    "producer_url": "producer_urls",
    "producer_saturation_requests": "producer_saturation_requests",
    "local_prefill_max_tokens": "local_prefill_max_tokens",
    "producer_connect_timeout": "connect_timeout",
    "prefill_timeout": "prefill_timeout",
    "kv_transfer_timeout": "transfer_timeout",
    "max_request_body_bytes": "max_request_body_bytes",
}


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(
            f"must be a positive number of seconds, got {text!r}"
        )
    return value


def integer_in(low: int, high: float = math.inf) -> Callable[[str], int]:
    """An argparse type: an integer between ``low`` and ``high``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be an integer, got {text!r}"
            ) from None
        if not low <= value <= high:
            bounds = f">= {low}" if high == math.inf else f"in {low}..{high}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {value}")
        return value

    return parse


port_number = integer_in(0, 65535)


def fraction(text: str) -> float:
    """An argparse type: a number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pdserve",
        description=(
            "Prefill/decode disaggregated vLLM server. Run producers (prefill) "
            "and consumers (decode, the port clients call). Flags not listed "
            "here are passed to `vllm serve` unchanged (listed after ours)."
        ),
        add_help=False,
        allow_abbrev=False,
    )
    parser.add_argument("-h", "--help", action="store_true", help="show this help")
    pd = parser.add_argument_group("pdserve")
    pd.add_argument(
        "--kv-role",
        required=True,
        choices=sorted(ROLES),
        help="producer: prefill node; consumer: decode node that clients call",
    )
    pd.add_argument(
        "--producer-url",
        action="append",
        default=default("producer_urls"),
        help="consumer only (required): a producer's HTTP address; repeat it "
        "or separate URLs with commas for several producers. An http URL whose "
        "host has several addresses (a headless Service) is one producer per "
        "address",
    )
    pd.add_argument(
        "--producer-saturation-requests",
        type=integer_in(1),
        default=default("producer_saturation_requests"),
        help="consumer: a producer with more prefills than this outstanding is "
        "saturated",
    )
    pd.add_argument(
        "--local-prefill-max-tokens",
        type=integer_in(-1),
        default=default("local_prefill_max_tokens"),
        help="consumer: prefill locally when at most this many prompt tokens are "
        "missing from its own prefix cache; -1 (default) derives it from measured "
        "local prefill and remote overhead; 0 never prefills locally for that reason",
    )
    pd.add_argument(
        "--kv-transport",
        default=default("transport"),
        choices=list(CHOICES),
        help="how KV blocks move: auto picks ipc for GPUs on one host, nccl for "
        "GPUs on different hosts, tcp otherwise; a failed one falls back to tcp",
    )
    pd.add_argument(
        "--kv-host",
        default=default("kv_host"),
        help="producer: address its KV ports listen on",
    )
    pd.add_argument(
        "--kv-port",
        type=port_number,
        default=0,
        help="producer: first KV port (one per TP rank); 0 picks free ports",
    )
    pd.add_argument(
        "--kv-lease-seconds",
        type=positive_seconds,
        default=default("lease_seconds"),
        help="producer: free prefilled KV a consumer has not read after this long",
    )
    pd.add_argument(
        "--kv-max-leased-fraction",
        type=fraction,
        default=default("max_leased_fraction"),
        help="producer: leases hold at most this share of its KV cache blocks; "
        "past it a prefill is answered without a lease and the consumer "
        "prefills it itself",
    )
    pd.add_argument(
        "--kv-secret",
        default=None,
        help="both nodes: shared secret the KV side channel requires of every "
        f"connection (HMAC challenge); default ${KV_SECRET_ENV_VAR}, which keeps "
        "it out of the process list",
    )
    pd.add_argument(
        "--producer-connect-timeout",
        type=positive_seconds,
        default=default("connect_timeout"),
        help="consumer: how long to wait at startup for a first producer; "
        "without one it starts anyway and prefills locally until one joins",
    )
    pd.add_argument(
        "--prefill-timeout",
        type=positive_seconds,
        default=default("prefill_timeout"),
        help="consumer: give up on the producers' prefill, all attempts together "
        "(and prefill locally); each attempt but the last gets a share of it",
    )
    pd.add_argument(
        "--kv-transfer-timeout",
        type=positive_seconds,
        default=default("transfer_timeout"),
        help="consumer: bound on each KV socket operation",
    )
    pd.add_argument(
        "--max-request-body-bytes",
        type=integer_in(1),
        default=default("max_request_body_bytes"),
        help="both nodes: larger request bodies are refused (413) before they "
        "are read; the default (64 MiB) leaves room for base64 images",
    )
    common = parser.add_argument_group("vLLM (also passed to vllm serve)")
    common.add_argument("--model", help="model name or path")
    common.add_argument("--host", default=None)
    common.add_argument("--port", type=port_number, default=8000)
    common.add_argument("--dtype", default=default("dtype"))
    common.add_argument("--max-model-len", type=int, default=default("max_model_len"))
    common.add_argument(
        "--tensor-parallel-size",
        "-tp",
        type=integer_in(1),
        default=default("tensor_parallel_size"),
    )
    # Read only to refuse them (see UNSUPPORTED_PARALLEL); never passed on.
    common.add_argument(
        "--data-parallel-size", "-dp", type=int, default=1, help=argparse.SUPPRESS
    )
    common.add_argument(
        "--pipeline-parallel-size", "-pp", type=int, default=1, help=argparse.SUPPRESS
    )
    return parser


def _api_keys(rest: list[str]) -> list[str]:
    """The keys vLLM will accept, as its parser reads them: the values of the
    last --api-key (a repeated flag replaces, it does not add), else the env.

    Only for the consumer's startup handshake: keys never enter Settings."""
    keys: list[str] | None = None
    for i, arg in enumerate(rest):
        if arg.startswith("--api-key="):
            keys = [arg.split("=", 1)[1]]
        elif arg == "--api-key":
            keys = []
            for value in rest[i + 1 :]:
                if value.startswith("-"):
                    break
                keys.append(value)
    return [k for k in (keys or [os.environ.get("VLLM_API_KEY")]) if k]


def normalize_flag(arg: str) -> str:
    """vLLM accepts --foo_bar for --foo-bar; so must our parser."""
    if not arg.startswith("--"):
        return arg
    name, sep, value = arg.partition("=")
    return name.replace("_", "-") + sep + value


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    if "-h" in argv or "--help" in argv:
        return argparse.Namespace(help=True), []
    parser = build_parser()
    args, rest = parser.parse_known_args([normalize_flag(a) for a in argv])
    args.kv_role = ROLES[args.kv_role]
    args.producer_url = producer_urls(args.producer_url)
    if args.kv_role == "consumer" and not args.producer_url:
        parser.error("--producer-url is required with --kv-role consumer")
    if args.kv_role == "producer" and args.producer_url:
        parser.error("--producer-url is for consumers; a producer takes none")
    for url in args.producer_url:
        if not urlparse(url).hostname:
            parser.error(f"--producer-url {url!r} has no host")
    if not args.model:
        parser.error("--model is required")
    owned = "--kv-transfer-config"
    if any(a == owned or a.startswith(owned + "=") for a in rest):
        parser.error(f"{owned} is set by pdserve; use the --kv-* flags instead")
    for name, what in UNSUPPORTED_PARALLEL.items():
        if getattr(args, name) != 1:
            parser.error(
                f"{what} is not supported by pdserve: run one pdserve node per "
                "replica, and --tensor-parallel-size within a node"
            )
    if args.kv_port and args.kv_port + args.tensor_parallel_size - 1 > 65535:
        parser.error(
            f"--kv-port {args.kv_port}: the KV ports of "
            f"{args.tensor_parallel_size} ranks would go past 65535"
        )
    args.dtype = DTYPE_ALIASES.get(args.dtype, args.dtype)
    return args, rest


def _flag_given(args: list[str], flag: str) -> bool:
    """Whether ``flag`` is among ``args`` (``--flag value`` or ``--flag=v``,
    dashes or underscores)."""
    wanted = flag.replace("_", "-")
    return any(normalize_flag(a).split("=", 1)[0] == wanted for a in args)


def producer_urls(given: list[str]) -> list[str]:
    """Every --producer-url, commas split, blanks and repeats dropped."""
    urls: list[str] = []
    for value in given:
        for url in value.split(","):
            if url.strip() and url.strip() not in urls:
                urls.append(url.strip())
    return urls


def make_settings(args: argparse.Namespace, rest: list[str]) -> Settings:
    tp = args.tensor_parallel_size
    settings = Settings(
        **{field: getattr(args, dest) for dest, field in SETTINGS_FLAGS.items()}
    )
    if args.kv_role == "producer":
        settings.kv_ports = (
            [args.kv_port + rank for rank in range(tp)]
            if args.kv_port
            else free_ports(args.kv_host, tp)
        )
    return settings


def vllm_serve_args(
    args: argparse.Namespace, rest: list[str], settings: Settings
) -> list[str]:
    kv_transfer_config = {
        "kv_connector": CONNECTOR_CLASS,
        "kv_connector_module_path": CONNECTOR_MODULE,
        "kv_role": "kv_producer" if settings.role == "producer" else "kv_consumer",
        # A failed pull must fall back to a local prefill, never fail the request.
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {EXTRA_CONFIG_KEY: json.loads(settings.to_json())},
    }
    serve = [args.model, "--port", str(args.port), "--dtype", args.dtype]
    serve += ["--tensor-parallel-size", str(args.tensor_parallel_size)]
    if args.host is not None:
        serve += ["--host", args.host]
    if args.max_model_len is not None:
        serve += ["--max-model-len", str(args.max_model_len)]
    serve += list(rest)
    if not _flag_given(rest, "--scheduler-cls"):
        serve += ["--scheduler-cls", SCHEDULER_CLS]
    serve += ["--kv-transfer-config", json.dumps(kv_transfer_config)]
    serve += ["--middleware", MIDDLEWARE]
    return serve
