"""deploy/kubernetes: the overlays render (kustomize, as built into kubectl),
every object validates against the Kubernetes schema (strict: no unknown
fields), and the objects agree with each other and with pdserve's flags."""

from __future__ import annotations

from urllib.parse import urlparse

import kubernetes_validate
import pytest
import yaml

from tests.deploy.helpers import KUBERNETES, OVERLAYS, render

# Pinned: the oldest and the newest Kubernetes the manifests are checked for
# (kubernetes-validate bundles both schemas; nothing is downloaded).
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
SECRET_EXAMPLE = KUBERNETES / "secret.example.yaml"
SECRET_NAME = "pdserve-secrets"


def objects(overlay: str, kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in render(overlay) if o["kind"] == kind}


def container(deployment: dict) -> dict:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def flags(deployment: dict) -> dict[str, str]:
    args = container(deployment)["args"]
    assert all(isinstance(a, str) for a in args), "quote numbers in args"
    return {a: b for a, b in zip(args, args[1:], strict=False) if a.startswith("--")}


def port_named(deployment: dict, name: str) -> int:
    ports = {p["name"]: p["containerPort"] for p in container(deployment)["ports"]}
    return ports[name]


def test_every_object_validates_against_the_schema():
    checked = 0
    files = [SECRET_EXAMPLE, *(KUBERNETES / "base").glob("*.yaml")]
    docs = [
        doc
        for path in files
        if path.name != "kustomization.yaml"
        for doc in yaml.safe_load_all(path.read_text())
    ]
    docs += [doc for overlay in ("base", *OVERLAYS) for doc in render(overlay)]
    for version in KUBERNETES_VERSIONS:
        for doc in docs:
            kubernetes_validate.validate(doc, version, strict=True)
            checked += 1
    assert checked >= 2 * 9


def test_validation_is_strict():
    """The check above would catch a misplaced or misspelled field."""
    bad = yaml.safe_load(
        yaml.safe_dump(objects("cuda", "Deployment")["pdserve-producer"])
    )
    container(bad)["readyProbe"] = container(bad).pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, "1.37.0", strict=True)


def test_overlays_render_the_same_objects():
    names = {(o["kind"], o["metadata"]["name"]) for o in render("base")}
    assert names == {
        ("Deployment", "pdserve-producer"),
        ("Deployment", "pdserve-consumer"),
        ("Service", "pdserve-producer"),
        ("Service", "pdserve"),
    }
    for overlay in OVERLAYS:
        assert {(o["kind"], o["metadata"]["name"]) for o in render(overlay)} == names


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_sets_image_and_one_gpu_per_pod(overlay):
    gpu = OVERLAYS[overlay]
    other = {g for g in OVERLAYS.values() if g != gpu}
    for deployment in objects(overlay, "Deployment").values():
        c = container(deployment)
        assert c["image"].split(":")[0].endswith(f"pdserve-{overlay}")
        assert ":" in c["image"], "the overlay pins a tag"
        assert c["resources"]["limits"] == {gpu: "1"}
        assert c["resources"]["requests"][gpu] == "1"
        assert "cpu" in c["resources"]["requests"]  # the base's, kept
        assert not other & (c["resources"]["limits"].keys())
        assert flags(deployment)["--tensor-parallel-size"] == "1"


def test_deployments_parse_with_pdserve_and_default_to_one_replica():
    from pdserve.entrypoints.cli_args import parse

    roles = {}
    for name, deployment in objects("base", "Deployment").items():
        assert deployment["spec"]["replicas"] == 1
        args, _ = parse(container(deployment)["args"])
        roles[name] = args.kv_role
        pod = deployment["spec"]["template"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= (
            pod["metadata"]["labels"].items()
        )
        # Same-host ipc between pods would need both; pdserve uses nccl/tcp.
        assert not pod["spec"].get("hostIPC")
        assert pod["spec"]["enableServiceLinks"] is False
    assert roles == {"pdserve-producer": "producer", "pdserve-consumer": "consumer"}


def test_services_select_their_pods():
    deployments = objects("base", "Deployment")
    services = objects("base", "Service")
    for service, deployment in (
        ("pdserve-producer", "pdserve-producer"),
        ("pdserve", "pdserve-consumer"),
    ):
        labels = deployments[deployment]["spec"]["template"]["metadata"]["labels"]
        selector = services[service]["spec"]["selector"]
        assert selector.items() <= labels.items()
        other = {d for d in deployments if d != deployment}.pop()
        other_labels = deployments[other]["spec"]["template"]["metadata"]["labels"]
        assert not selector.items() <= other_labels.items()


def test_producer_service_is_headless_and_exposes_http_and_kv_ports():
    producer = objects("base", "Deployment")["pdserve-producer"]
    service = objects("base", "Service")["pdserve-producer"]
    assert service["spec"]["clusterIP"] == "None"
    f = flags(producer)
    http = int(f["--port"])
    assert port_named(producer, "http") == http
    # One KV port per TP rank, from --kv-port (0 would pick free ports).
    first_kv = int(f["--kv-port"])
    tp = int(f["--tensor-parallel-size"])
    assert first_kv > 0
    kv_ports = [first_kv + rank for rank in range(tp)]
    by_name = {p["name"]: p for p in service["spec"]["ports"]}
    assert by_name["http"]["port"] == http
    for rank, port in enumerate(kv_ports):
        assert port_named(producer, f"kv-rank{rank}") == port
        assert by_name[f"kv-rank{rank}"]["port"] == port
        assert by_name[f"kv-rank{rank}"]["targetPort"] == f"kv-rank{rank}"


def test_consumer_points_at_the_producer_service_and_serves_port_8000():
    deployments = objects("base", "Deployment")
    services = objects("base", "Service")
    url = urlparse(flags(deployments["pdserve-consumer"])["--producer-url"])
    assert url.scheme == "http"
    assert url.hostname == "pdserve-producer"
    assert url.hostname in services
    assert url.port == int(flags(deployments["pdserve-producer"])["--port"])
    consumer_port = int(flags(deployments["pdserve-consumer"])["--port"])
    assert consumer_port == port_named(deployments["pdserve-consumer"], "http")
    (user_port,) = services["pdserve"]["spec"]["ports"]
    assert (user_port["port"], user_port["targetPort"]) == (8000, "http")
    assert consumer_port == 8000


def test_probes_use_health_on_the_serving_port():
    for deployment in objects("base", "Deployment").values():
        c = container(deployment)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
        assert port_named(deployment, "http") == int(flags(deployment)["--port"])


def test_secrets_come_from_the_secret():
    example = yaml.safe_load(SECRET_EXAMPLE.read_text())
    assert example["metadata"]["name"] == SECRET_NAME
    for deployment in objects("base", "Deployment").values():
        env = {e["name"]: e for e in container(deployment)["env"]}
        assert all("value" not in e for e in env.values()), "no secret in clear"
        kv = env["PDSERVE_KV_SECRET"]["valueFrom"]["secretKeyRef"]
        assert kv["name"] == SECRET_NAME and not kv.get("optional")
        assert kv["key"] in example["stringData"]
        api = env["VLLM_API_KEY"]["valueFrom"]["secretKeyRef"]
        assert api["name"] == SECRET_NAME and api["optional"] is True
        assert api["key"] in example["stringData"]
        # Never on the command line, where the process list shows it.
        args = container(deployment)["args"]
        assert "--kv-secret" not in args and "--api-key" not in args
