"""pdserve's command line: its own flags, and everything else handed to
``vllm serve`` unchanged together with the connector and middleware."""

from __future__ import annotations

import ast
import inspect
import json
import re
import socket
import textwrap
from pathlib import Path

import msgspec
import pytest

from pdserve.entrypoints.cli_args import (
    CONNECTOR_CLASS,
    CONNECTOR_MODULE,
    MIDDLEWARE,
    SETTINGS_FLAGS,
    _api_keys,
    build_parser,
    make_settings,
    parse,
    vllm_serve_args,
)
from pdserve.settings import EXTRA_CONFIG_KEY, Settings, default

PRODUCER = ["--kv-role", "producer", "--model", "m"]
CONSUMER = ["--kv-role", "consumer", "--model", "m", "--producer-url", "http://p:8100"]


def launch(argv: list[str]) -> tuple[Settings, list[str]]:
    args, rest = parse(argv)
    settings = make_settings(args, rest)
    return settings, vllm_serve_args(args, rest, settings)


def kv_transfer_config(serve: list[str]) -> dict:
    assert serve.count("--kv-transfer-config") == 1
    return json.loads(serve[serve.index("--kv-transfer-config") + 1])


def parser_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        parse(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("flag", "role", "kv_role"),
    [
        ("producer", "producer", "kv_producer"),
        ("kv_producer", "producer", "kv_producer"),
        ("consumer", "consumer", "kv_consumer"),
        ("kv_consumer", "consumer", "kv_consumer"),
    ],
)
def test_roles_and_vllm_aliases(flag, role, kv_role):
    argv = ["--kv-role", flag, "--model", "m"]
    if role == "consumer":
        argv += ["--producer-url", "http://10.0.0.7:8100"]
    args, rest = parse(argv)
    assert args.kv_role == role and rest == []
    settings, serve = launch(argv)
    assert settings.role == role
    config = kv_transfer_config(serve)
    assert config["kv_role"] == kv_role
    assert config["kv_connector"] == CONNECTOR_CLASS == "PDServeConnector"
    assert config["kv_connector_module_path"] == CONNECTOR_MODULE
    assert CONNECTOR_MODULE == "pdserve.connector.connector"


def test_unknown_role_refused(capsys):
    err = parser_error(capsys, ["--kv-role", "both", "--model", "m"])
    assert "--kv-role" in err and "invalid choice" in err


def test_consumer_needs_producer_url(capsys):
    err = parser_error(capsys, ["--kv-role", "consumer", "--model", "m"])
    assert "--producer-url is required with --kv-role consumer" in err


def test_producer_refuses_producer_url(capsys):
    err = parser_error(capsys, [*PRODUCER, "--producer-url", "http://p:8100"])
    assert "--producer-url is for consumers" in err


def test_producer_url_without_host_refused(capsys):
    argv = ["--kv-role", "consumer", "--model", "m", "--producer-url", "p:8100"]
    err = parser_error(capsys, argv)
    assert "has no host" in err


@pytest.mark.parametrize(
    "flags",
    [
        ["--producer-url", "http://a:1", "--producer-url", "http://b:2"],
        ["--producer-url", "http://a:1,http://b:2"],
        ["--producer-url", "http://a:1, http://b:2,", "--producer-url=http://a:1"],
        ["--producer_url", "http://a:1", "--producer-url=http://b:2"],
    ],
)
def test_several_producer_urls(flags):
    settings, serve = launch(["--kv-role", "consumer", "--model", "m", *flags])
    assert settings.producer_urls == ["http://a:1", "http://b:2"]
    assert "--producer-url" not in serve and "http://a:1" not in serve


def test_each_producer_url_needs_a_host(capsys):
    argv = ["--kv-role", "consumer", "--model", "m"]
    argv += ["--producer-url", "http://a:1,b:2"]
    assert "'b:2' has no host" in parser_error(capsys, argv)


def test_producer_saturation_setting():
    settings, _ = launch([*CONSUMER, "--producer-saturation-requests", "3"])
    assert settings.producer_saturation_requests == 3
    assert launch(CONSUMER)[0].producer_saturation_requests == 8


def test_model_required(capsys):
    err = parser_error(capsys, ["--kv-role", "producer"])
    assert "--model is required" in err


def test_kv_role_required(capsys):
    err = parser_error(capsys, ["--model", "m"])
    assert "--kv-role" in err


@pytest.mark.parametrize(
    "extra",
    [
        ["--kv-transfer-config", "{}"],
        ["--kv-transfer-config={}"],
        ["--kv_transfer_config", "{}"],
        ["--kv_transfer_config={}"],
    ],
)
def test_kv_transfer_config_refused(capsys, extra):
    err = parser_error(capsys, [*PRODUCER, *extra])
    assert "is set by pdserve" in err


def test_help_short_circuits():
    # Help wins even over otherwise invalid command lines.
    assert parse(["--help"])[0].help is True
    assert parse(["-h", "--kv-role", "nonsense"]) == (parse(["-h"])[0], [])
    args, rest = parse(PRODUCER)
    assert args.help is False and rest == []


def test_unknown_vllm_flags_pass_through_in_order():
    unknown = [
        "--enable-prefix-caching",
        "--max-num-seqs",
        "8",
        "--api-key",
        "k",
        "--block-size=16",
    ]
    # Interleave them with pdserve's flags: order among themselves is kept.
    argv = [
        unknown[0],
        "--kv-role",
        "producer",
        *unknown[1:3],
        "--model",
        "m",
        *unknown[3:],
        "--port",
        "8100",
    ]
    args, rest = parse(argv)
    assert rest == unknown
    settings = make_settings(args, rest)
    serve = vllm_serve_args(args, rest, settings)
    start = serve.index(unknown[0])
    assert serve[start : start + len(unknown)] == unknown
    assert serve[0] == "m"
    assert serve[serve.index("--port") + 1] == "8100"
    # pdserve's own flags never reach vLLM.
    assert not [a for a in serve if a.startswith(("--kv-role", "--kv-port"))]


def test_serve_args_layout():
    argv = [
        *PRODUCER,
        "--host",
        "127.0.0.1",
        "--max-model-len",
        "512",
        "-tp",
        "2",
        "--dtype",
        "bfloat16",
        "--seed",
        "3",
    ]
    _, serve = launch(argv)
    assert serve[:2] == ["m", "--port"]
    pairs = dict(zip(serve[1::2], serve[2::2], strict=False))
    assert pairs["--port"] == "8000"
    assert pairs["--dtype"] == "bfloat16"
    assert pairs["--tensor-parallel-size"] == "2"
    assert pairs["--host"] == "127.0.0.1"
    assert pairs["--max-model-len"] == "512"
    assert serve[-2:] == ["--middleware", MIDDLEWARE]
    assert MIDDLEWARE == "pdserve.entrypoints.middleware.PDServeMiddleware"
    assert serve[-4] == "--kv-transfer-config"
    assert serve.index("--seed") < serve.index("--kv-transfer-config")


def test_host_and_max_model_len_omitted_by_default():
    _, serve = launch(PRODUCER)
    assert "--host" not in serve and "--max-model-len" not in serve


def test_settings_round_trip_through_kv_transfer_config():
    argv = [
        *CONSUMER,
        "--dtype",
        "half",
        "-tp",
        "2",
        "--max-model-len",
        "4096",
        "--prefill-timeout",
        "7.5",
        "--kv-transfer-timeout",
        "3",
        "--producer-connect-timeout",
        "11",
        "--api-key",
        "secret",
    ]
    settings, serve = launch(argv)
    config = kv_transfer_config(serve)
    assert set(config["kv_connector_extra_config"]) == {EXTRA_CONFIG_KEY}
    decoded = Settings.from_extra_config(config["kv_connector_extra_config"])
    assert decoded == settings
    assert decoded.role == "consumer"
    assert decoded.model == "m"
    assert decoded.dtype == "float16"
    assert decoded.tensor_parallel_size == 2
    assert decoded.max_model_len == 4096
    assert decoded.prefill_timeout == 7.5
    assert decoded.transfer_timeout == 3.0
    assert decoded.connect_timeout == 11.0
    assert decoded.producer_urls == ["http://p:8100"]
    # Found by the startup handshake, not by parsing.
    assert decoded.producers == []
    assert decoded.kv_ports == []


def test_producer_settings_round_trip():
    argv = [*PRODUCER, "--kv-host", "127.0.0.1", "--kv-lease-seconds", "5"]
    settings, serve = launch(argv)
    config = kv_transfer_config(serve)
    decoded = Settings.from_extra_config(config["kv_connector_extra_config"])
    assert decoded == settings
    assert decoded.kv_host == "127.0.0.1"
    assert decoded.lease_seconds == 5.0
    assert decoded.producer_urls == [] and decoded.producers == []


@pytest.mark.parametrize("tp_flag", ["-tp", "--tensor-parallel-size"])
def test_producer_kv_ports_from_first_port(tp_flag):
    settings, _ = launch([*PRODUCER, "--kv-port", "9000", tp_flag, "4"])
    assert settings.kv_ports == [9000, 9001, 9002, 9003]
    assert settings.tensor_parallel_size == 4


@pytest.mark.parametrize("tp", [1, 3])
def test_producer_kv_ports_default_to_free_ports(tp):
    settings, _ = launch([*PRODUCER, "--kv-host", "127.0.0.1", "-tp", str(tp)])
    ports = settings.kv_ports
    assert len(ports) == tp and len(set(ports)) == tp
    assert all(0 < p < 65536 for p in ports)
    # They were free: each can be bound now.
    for port in ports:
        socket.create_server(("127.0.0.1", port)).close()


def test_consumer_has_no_kv_ports():
    settings, _ = launch([*CONSUMER, "--kv-port", "9000", "-tp", "2"])
    assert settings.kv_ports == []


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("half", "float16"),
        ("float", "float32"),
        ("bf16", "bfloat16"),
        ("bfloat16", "bfloat16"),
        ("auto", "auto"),
    ],
)
def test_dtype_aliases(given, expected):
    args, _ = parse([*PRODUCER, "--dtype", given])
    assert args.dtype == expected
    settings, serve = launch([*PRODUCER, "--dtype", given])
    assert settings.dtype == expected
    assert serve[serve.index("--dtype") + 1] == expected


def test_dtype_defaults_to_auto():
    settings, _ = launch(PRODUCER)
    assert settings.dtype == "auto"


@pytest.mark.parametrize(
    ("extra", "keys"),
    [
        ([], []),
        (["--api-key", "k1"], ["k1"]),
        (["--api-key=k1"], ["k1"]),
        (["--api_key=k1"], ["k1"]),
        (["--api-key", "k1", "k2", "--seed", "0"], ["k1", "k2"]),
        # As vLLM's parser: a repeated flag replaces the earlier values.
        (["--api-key", "k1", "--seed", "0", "--api-key=k2"], ["k2"]),
        (["--api-key"], []),
    ],
)
def test_api_keys_as_vllm_reads_them(monkeypatch, extra, keys):
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    _, rest = parse([*PRODUCER, *extra])
    assert _api_keys(rest) == keys


def test_api_key_flag_wins_over_env(monkeypatch):
    monkeypatch.setenv("VLLM_API_KEY", "env-key")
    assert _api_keys(parse(PRODUCER)[1]) == ["env-key"]
    assert _api_keys(parse([*PRODUCER, "--api-key", "k1"])[1]) == ["k1"]


@pytest.mark.parametrize("argv", [PRODUCER, CONSUMER])
def test_api_key_stays_out_of_settings_and_kv_config(monkeypatch, argv):
    monkeypatch.setenv("VLLM_API_KEY", "env-key-7f3a")
    settings, serve = launch([*argv, "--api-key", "flag-key-91c2"])
    for text in (settings.to_json(), json.dumps(kv_transfer_config(serve))):
        assert "flag-key-91c2" not in text and "env-key-7f3a" not in text
    assert "api_key" not in settings.to_json()
    # vLLM gets the key only as the user's own flag, once.
    assert serve.count("flag-key-91c2") == 1
    assert serve[serve.index("flag-key-91c2") - 1] == "--api-key"
    assert not [a for a in serve if "env-key-7f3a" in a]


def test_underscore_spelling_of_tensor_parallel_size():
    settings, _ = launch(
        [*PRODUCER, "--kv-port", "9000", "--tensor_parallel_size", "2"]
    )
    assert settings.tensor_parallel_size == 2
    assert settings.kv_ports == [9000, 9001]


# --- what pdserve cannot run -------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "what"),
    [
        (["--data-parallel-size", "2"], "data parallel"),
        (["-dp", "2"], "data parallel"),
        (["--data-parallel-size=4"], "data parallel"),
        (["--data_parallel_size", "2"], "data parallel"),
        (["-dp=2"], "data parallel"),
        (["--pipeline-parallel-size", "2"], "pipeline parallel"),
        (["-pp", "2"], "pipeline parallel"),
        (["--pipeline_parallel_size=3"], "pipeline parallel"),
    ],
)
@pytest.mark.parametrize("role", [PRODUCER, CONSUMER])
def test_data_and_pipeline_parallel_refused(capsys, role, flags, what):
    err = parser_error(capsys, [*role, *flags])
    assert f"{what} (" in err and "is not supported by pdserve" in err


@pytest.mark.parametrize("flags", [["-dp", "1"], ["--pipeline-parallel-size", "1"]])
def test_one_replica_is_fine_and_not_passed_on(flags):
    _, serve = launch([*PRODUCER, *flags])
    assert not [a for a in serve if "parallel-size" in a and "tensor" not in a]
    assert "-dp" not in serve and "-pp" not in serve


# --- numbers -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--prefill-timeout", "0", "positive number of seconds"),
        ("--prefill-timeout", "-1", "positive number of seconds"),
        ("--prefill-timeout", "nan", "positive number of seconds"),
        ("--prefill-timeout", "inf", "positive number of seconds"),
        ("--kv-transfer-timeout", "0", "positive number of seconds"),
        ("--producer-connect-timeout", "-5", "positive number of seconds"),
        ("--kv-lease-seconds", "0", "positive number of seconds"),
        ("--kv-lease-seconds", "soon", "positive number of seconds"),
        ("--kv-port", "65536", "must be in 0..65535, got 65536"),
        ("--kv-port", "-1", "must be in 0..65535, got -1"),
        ("--port", "70000", "must be in 0..65535, got 70000"),
        ("--producer-saturation-requests", "0", "must be >= 1, got 0"),
        ("--local-prefill-max-tokens", "-2", "must be >= -1, got -2"),
        ("--local-prefill-max-tokens", "1.5", "must be an integer, got '1.5'"),
        ("--max-request-body-bytes", "0", "must be >= 1, got 0"),
        ("--tensor-parallel-size", "0", "must be >= 1, got 0"),
    ],
)
def test_numeric_flags_validated_at_parse(capsys, flag, value, message):
    err = parser_error(capsys, [*CONSUMER, f"{flag}={value}"])
    assert f"argument {flag}" in err and message in err


def test_kv_ports_must_fit_below_65536(capsys):
    err = parser_error(capsys, [*PRODUCER, "--kv-port", "65535", "-tp", "2"])
    assert "KV ports of 2 ranks would go past 65535" in err
    settings, _ = launch([*PRODUCER, "--kv-port", "65534", "-tp", "2"])
    assert settings.kv_ports == [65534, 65535]


@pytest.mark.parametrize(
    "flags",
    [
        ["--prefill-timeout", "0.5"],
        ["--local-prefill-max-tokens", "-1"],
        ["--local-prefill-max-tokens", "0"],
        ["--producer-saturation-requests", "1"],
        ["--kv-port", "0"],
        ["--port", "0"],
    ],
)
def test_edge_values_accepted(flags):
    parse([*CONSUMER, *flags])


def test_max_request_body_bytes_setting():
    settings, serve = launch([*CONSUMER, "--max-request-body-bytes", "1000"])
    assert settings.max_request_body_bytes == 1000
    assert "--max-request-body-bytes" not in serve
    assert launch(CONSUMER)[0].max_request_body_bytes == 64 * 1024 * 1024


# Flags that set no Settings field (each says where its value goes instead).
NOT_SETTINGS = {
    "help",  # pdserve's own help
    "kv_port",  # the first of Settings.kv_ports, or free ports
    "kv_secret",  # the environment only: Settings are logged
    "host",  # vllm serve's
    "port",  # vllm serve's
    "data_parallel_size",  # refused unless 1
    "pipeline_parallel_size",  # refused unless 1
}


def test_every_flag_is_a_setting_or_named_as_none():
    dests = {action.dest for action in build_parser()._actions}
    assert dests - NOT_SETTINGS == set(SETTINGS_FLAGS)
    assert set(SETTINGS_FLAGS.values()) <= set(Settings.__struct_fields__)


@pytest.mark.parametrize(("dest", "field"), sorted(SETTINGS_FLAGS.items()))
def test_flag_default_is_the_settings_default(dest, field):
    """A literal default written again beside a flag fails here."""
    (action,) = [a for a in build_parser()._actions if a.dest == dest]
    expected = default(field)
    if expected is msgspec.NODEFAULT:  # required: the flag has none either
        assert action.required or action.default is None
    else:
        assert action.default == expected and type(action.default) is type(expected)


def test_flag_defaults_are_written_only_as_settings_defaults():
    """Equal values are not enough (30 s is two fields' default): the parser
    names the field, ``default("lease_seconds")``, never a literal."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(build_parser)))
    seen = set()
    for call in ast.walk(tree):
        if not (
            isinstance(call, ast.Call)
            and getattr(call.func, "attr", "") == "add_argument"
        ):
            continue
        dest = call.args[0].value.removeprefix("--").replace("-", "_")
        given = {k.arg: k.value for k in call.keywords}.get("default")
        if dest in SETTINGS_FLAGS and given is not None:
            assert ast.unparse(given) == f"default({SETTINGS_FLAGS[dest]!r})", dest
            seen.add(dest)
        else:
            assert dest in NOT_SETTINGS or given is None, dest
    assert seen == set(SETTINGS_FLAGS) - {"kv_role", "model"}


def test_defaults_reach_settings_unchanged():
    settings, _ = launch(CONSUMER)
    plain = Settings(role="consumer", model="m", producer_urls=["http://p:8100"])
    for field in SETTINGS_FLAGS.values():
        assert getattr(settings, field) == getattr(plain, field), field
    assert default("producer_urls") == []  # repeated --producer-url never adds to it


def readme_flag_rows() -> list[tuple[str, str]]:
    """(argparse dest, row) of each flag in README's Flags table."""
    text = (Path(__file__).parents[3] / "README.md").read_text()
    table = text.split("\n## Flags\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| `--")]
    return [(re.match(r"\| `--([a-z-]+)", r)[1].replace("-", "_"), r) for r in rows]


def stated_defaults(row: str) -> list[object]:
    """What a README row says its default is: "(30 s)", "(0.5)", "(64 MiB: ...)",
    "`auto` (default)"."""
    found: list[object] = []
    for number, unit in re.findall(r"\((-?[0-9.]+)( s| MiB)?[):;]", row):
        value = float(number) * (1 << 20 if unit == " MiB" else 1)
        found.append(value)
    found += re.findall(r"`([^`]+)` \(default\)", row)
    return found


def test_readme_flags_table_states_the_settings_defaults():
    rows = readme_flag_rows()
    assert len(rows) >= 10
    for dest, row in rows:
        field = SETTINGS_FLAGS.get(dest)
        if field is None:
            continue
        value = default(field)
        stated = stated_defaults(row)
        if isinstance(value, int | float):
            assert stated, f"README's --{dest} row states no default ({value})"
        for said in stated:
            assert said == (value if isinstance(said, float) else str(value)), row


@pytest.mark.parametrize("value", ["0", "-0.5", "1.5", "nan", "half"])
def test_leased_fraction_must_be_a_share(value, capsys):
    with pytest.raises(SystemExit):
        parse(
            ["--kv-role", "producer", "--model", "m", "--kv-max-leased-fraction", value]
        )
    assert "--kv-max-leased-fraction" in capsys.readouterr().err


def test_leased_fraction_reaches_the_producer():
    args, rest = parse(
        ["--kv-role", "producer", "--model", "m", "--kv-max-leased-fraction", "0.25"]
    )
    assert make_settings(args, rest).max_leased_fraction == 0.25
