"""deploy/k8s/: every manifest valid against the Kubernetes API schemas (kubernetes-validate ships
them, so this runs offline), the properties the deployment relies on present, names and ports agreeing
across the manifests, the agent's config and the image, and the HAProxy backend snippet accepted by
HAProxy 2.6 inside a minimal config.

No cluster runs here: scheduling, probes, DNS and the rollout itself are not exercised.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from spoa_mirror.config import parse_config
from tests.support.shipped_configs import (
    SPOE_CONF,
    assert_check_config,
    bufsize,
    dockerfile_instructions,
    haproxy_check,
    section,
)

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
BACKEND_SNIPPET = K8S / "haproxy-agent-backend.cfg"
# The oldest and the newest Kubernetes versions whose schemas kubernetes-validate ships.
KUBERNETES_VERSIONS = (
    kubernetes_validate.utils.all_versions()[0],
    kubernetes_validate.utils.latest_version(),
)
NAMESPACE = "default"  # the manifests name none: kubectl's current namespace, `default` as shipped
DISCONNECT_GRACE = 2.0  # App.shutdown gives HAProxy's connections this long before draining
CONFIG_DIR = "/etc/spoa-mirror"
MINIMAL_HAPROXY = """\
global
    default-path config
    tune.bufsize 32768

defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s

frontend www
    bind 127.0.0.1:8080
    default_backend app

backend app
    filter spoe engine mirror config {spoe}
    server app 127.0.0.1:8081

"""


def manifests() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted(K8S.glob("*.yaml")):
        found += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return found


def manifest(kind: str) -> dict[str, Any]:
    [doc] = [doc for _, doc in manifests() if doc["kind"] == kind]
    return doc


def pod_spec() -> dict[str, Any]:
    return manifest("Deployment")["spec"]["template"]["spec"]


def container() -> dict[str, Any]:
    [agent] = pod_spec()["containers"]
    return agent


def pod_labels() -> dict[str, str]:
    return manifest("Deployment")["spec"]["template"]["metadata"]["labels"]


def agent_config_text() -> str:
    return manifest("ConfigMap")["data"]["config.yaml"]


def agent_config() -> Any:
    return parse_config(yaml.safe_load(agent_config_text()))


def container_port(name: str) -> int:
    [port] = [port["containerPort"] for port in container()["ports"] if port["name"] == name]
    return port


def selects_the_pods(selector: dict[str, str]) -> bool:
    return bool(selector) and selector.items() <= pod_labels().items()


def test_the_manifests_are_all_there() -> None:
    kinds = sorted(doc["kind"] for _, doc in manifests())
    assert kinds == ["ConfigMap", "Deployment", "PodDisruptionBudget", "Service"]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_is_valid_for_kubernetes(version: str) -> None:
    """Strict: a misspelt or misplaced field is an error, not silently dropped as kubectl would."""
    for name, doc in manifests():
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(part) for part in error.path)
            pytest.fail(f"{name}: {doc['kind']} invalid for Kubernetes {version} at {path}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError as error:
            pytest.fail(f"{name}: {error.message}")


def test_deployment_runs_two_agents_on_different_nodes_when_it_can() -> None:
    deployment = manifest("Deployment")
    assert deployment["spec"]["replicas"] >= 2
    assert selects_the_pods(deployment["spec"]["selector"]["matchLabels"])
    [term] = pod_spec()["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert selects_the_pods(term["podAffinityTerm"]["labelSelector"]["matchLabels"])


def test_probes_ask_the_admin_listener() -> None:
    assert container_port("admin") == agent_config().admin.port
    assert container()["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert container()["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}


def test_security_context_matches_the_image_and_drops_everything() -> None:
    [user] = [arguments for keyword, arguments in dockerfile_instructions() if keyword == "USER"]
    pod = pod_spec()["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert str(pod["runAsUser"]) == user.split(":")[0] == "10001"
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container()["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert pod_spec()["automountServiceAccountToken"] is False


def test_resources_have_requests_and_limits() -> None:
    resources = container()["resources"]
    for bound in ("requests", "limits"):
        assert set(resources[bound]) == {"cpu", "memory"}, bound


def test_termination_leaves_time_for_prestop_and_drain() -> None:
    command = container()["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    needed = float(command[1]) + DISCONNECT_GRACE + agent_config().drain_timeout
    assert pod_spec()["terminationGracePeriodSeconds"] > needed


def test_the_configmap_is_the_config_the_agent_reads() -> None:
    [mount] = container()["volumeMounts"]
    [volume] = [volume for volume in pod_spec()["volumes"] if volume["name"] == mount["name"]]
    assert volume["configMap"]["name"] == manifest("ConfigMap")["metadata"]["name"]
    assert mount["mountPath"] == CONFIG_DIR and mount["readOnly"] is True
    assert container()["args"] == ["--config", f"{CONFIG_DIR}/config.yaml"]


def test_configmap_config_passes_check_config_and_listens_on_the_pod_address(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(agent_config_text())
    assert_check_config(config)
    parsed = agent_config()
    assert parsed.listen.address == parsed.admin.address == "0.0.0.0"
    assert parsed.listen.max_frame_size == bufsize((ROOT / "haproxy" / "haproxy.cfg").read_text())


def test_pdb_keeps_one_agent() -> None:
    pdb = manifest("PodDisruptionBudget")["spec"]
    assert pdb["minAvailable"] == 1 < manifest("Deployment")["spec"]["replicas"]
    assert selects_the_pods(pdb["selector"]["matchLabels"])


def test_service_is_headless_on_the_spop_port() -> None:
    service = manifest("Service")["spec"]
    assert service["clusterIP"] == "None"
    assert not service.get("publishNotReadyAddresses", False), "DNS must list ready agents only"
    assert selects_the_pods(service["selector"])
    [port] = service["ports"]
    assert port["port"] == container_port(port["targetPort"]) == agent_config().listen.port


def test_haproxy_snippet_targets_the_headless_service() -> None:
    snippet = BACKEND_SNIPPET.read_text()
    service = manifest("Service")
    [port] = service["spec"]["ports"]
    [(count, address, options)] = re.findall(r"^\s*server-template agent (\d+) (\S+) (.*)$", snippet, re.M)
    assert address == f"{service['metadata']['name']}.{NAMESPACE}.svc.cluster.local:{port['port']}"
    assert int(count) > manifest("Deployment")["spec"]["replicas"], "room for a rollout's extra pod"
    assert options.split() == ["resolvers", "k8s", "init-addr", "none", "check"]
    assert "parse-resolv-conf" in section(snippet, "resolvers k8s")


def test_haproxy_snippet_backend_is_the_production_one_but_for_its_servers() -> None:
    production = (ROOT / "haproxy" / "haproxy.cfg").read_text()

    def without_servers(text: str) -> list[str]:
        return [line for line in section(text, "backend mirror-agents") if not line.startswith("server")]

    assert without_servers(BACKEND_SNIPPET.read_text()) == without_servers(production)


@pytest.mark.haproxy
def test_haproxy_snippet_passes_haproxy_check(tmp_path: Path) -> None:
    """Inside the smallest config that uses it: a frontend whose backend carries the SPOE filter
    of haproxy/mirror.spoe.conf, whose use-backend names the snippet's backend."""
    (tmp_path / SPOE_CONF.name).write_text(SPOE_CONF.read_text())
    config = tmp_path / "haproxy.cfg"
    config.write_text(MINIMAL_HAPROXY.format(spoe=SPOE_CONF.name) + BACKEND_SNIPPET.read_text())
    haproxy_check(config)
