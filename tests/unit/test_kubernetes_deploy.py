"""deploy/: every overlay renders with `kubectl kustomize`, validates (strict, Kubernetes 1.30+)
and keeps kernelfleet's policies: no root, no privilege, requests and limits everywhere,
default-deny networking in every kernel namespace, least-privilege RBAC, and generated
parts (pool manifests, kernelspec selection) in step with kernelspecs/."""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from kernelfleet.config import load_config
from kernelfleet.kernelspecs.render_kubernetes_pools import pool_manifests
from kernelfleet.kernelspecs.spec import load_kernelspec
from kernelfleet.kubernetes_settings import KubernetesSettings, placeholder_name
from tests.support.kubernetes_versions import validate

REPO = Path(__file__).resolve().parents[2]
OVERLAYS = ["cpu-only", "gpu"]
KERNEL_NS = KubernetesSettings().namespace
METADATA_IP = ipaddress.ip_address("169.254.169.254")
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet")
#: Only these talk to the Kubernetes API and so get a service-account token.
API_CLIENTS = {"enterprise-gateway", "scheduler"}

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")


@cache
def rendered(overlay: str) -> tuple[dict[str, Any], ...]:
    """The manifests of ``deploy/overlays/<overlay>`` as `kubectl kustomize` renders them."""
    result = subprocess.run(
        ["kubectl", "kustomize", str(REPO / "deploy" / "overlays" / overlay)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return tuple(d for d in yaml.safe_load_all(result.stdout) if d)


def of_kind(docs: tuple[dict[str, Any], ...], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def named(docs: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    (found,) = [d for d in of_kind(docs, kind) if d["metadata"]["name"] == name]
    return found


def pod_specs(docs: tuple[dict[str, Any], ...]) -> Iterator[tuple[str, dict[str, Any]]]:
    for doc in docs:
        if doc["kind"] in WORKLOADS:
            yield doc["metadata"]["name"], doc["spec"]["template"]["spec"]


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return list(pod.get("initContainers", [])) + list(pod["containers"])


def platform_config(overlay: str, tmp_path: Path) -> Any:
    """kernelfleet.yaml of the overlay's ConfigMap, loaded as the scheduler loads it."""
    (config_map,) = of_kind(rendered(overlay), "ConfigMap")
    path = tmp_path / "kernelfleet.yaml"
    path.write_text(config_map["data"]["kernelfleet.yaml"])
    return load_config(path), config_map["data"]["kernelspecs"].split()


# --- rendering and schemas ---------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates_strictly(overlay: str) -> None:
    docs = rendered(overlay)
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "Deployment", "Service", "StatefulSet", "Role", "ClusterRole",
            "PriorityClass", "NetworkPolicy", "DaemonSet", "ConfigMap"} <= kinds  # fmt: skip
    for doc in docs:
        validate(doc)


def test_strict_validation_catches_a_typo() -> None:
    broken = yaml.safe_load(yaml.safe_dump(named(rendered("gpu"), "Deployment", "scheduler")))
    broken["spec"]["template"]["spec"]["containers"][0]["resourcez"] = {}
    with pytest.raises(Exception, match="resourcez"):
        validate(broken)


def test_base_has_platform_and_kernel_namespaces() -> None:
    docs = rendered("cpu-only")
    roles = {n["metadata"]["name"]: n["metadata"]["labels"]["kernelfleet.io/role"]
             for n in of_kind(docs, "Namespace")}  # fmt: skip
    assert roles == {"kernelfleet": "platform", KERNEL_NS: "kernels"}
    assert {d["metadata"]["name"] for d in of_kind(docs, "StatefulSet")} == {"redis"}
    redis = named(docs, "StatefulSet", "redis")
    assert "--appendonly" in redis["spec"]["template"]["spec"]["containers"][0]["command"]
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {("Deployment", "enterprise-gateway"), ("Service", "enterprise-gateway"),
            ("Deployment", "scheduler"), ("Service", "scheduler")} <= names  # fmt: skip


# --- pod policies ------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_root_no_privilege_no_host_access(overlay: str) -> None:
    for name, pod in pod_specs(rendered(overlay)):
        context = pod.get("securityContext", {})
        assert context.get("runAsNonRoot") is True, name
        assert context.get("runAsUser", 1) != 0, name
        assert context.get("seccompProfile") == {"type": "RuntimeDefault"}, name
        assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), name
        assert not any("hostPath" in v for v in pod.get("volumes", [])), name
        for container in containers(pod):
            security = container.get("securityContext", {})
            where = f"{name}/{container['name']}"
            assert security.get("allowPrivilegeEscalation") is False, where
            assert security.get("privileged") is not True, where
            assert "ALL" in security.get("capabilities", {}).get("drop", []), where
            assert not security.get("capabilities", {}).get("add"), where
            assert security.get("runAsUser", 1) != 0 and security.get("runAsNonRoot") is not False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_requests_and_limits(overlay: str) -> None:
    for name, pod in pod_specs(rendered(overlay)):
        for container in containers(pod):
            resources = container.get("resources", {})
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(kind, {})), (name, kind)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_api_clients_get_a_service_account_token(overlay: str) -> None:
    docs = rendered(overlay)
    for name, pod in pod_specs(docs):
        if pod.get("automountServiceAccountToken") is not False:
            assert name in API_CLIENTS, name
    for account in of_kind(docs, "ServiceAccount"):
        if account["metadata"]["namespace"] == KERNEL_NS:
            assert account.get("automountServiceAccountToken") is False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_are_pinned(overlay: str) -> None:
    for name, pod in pod_specs(rendered(overlay)):
        for container in containers(pod):
            image = container["image"]
            assert ":" in image.split("/")[-1] and not image.endswith(":latest"), (name, image)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_priority_classes_exist_and_placeholders_are_lowest(overlay: str) -> None:
    docs = rendered(overlay)
    values = {p["metadata"]["name"]: p["value"] for p in of_kind(docs, "PriorityClass")}
    for name, pod in pod_specs(docs):
        assert pod["priorityClassName"] in values, name
    assert values["kernelfleet-placeholder"] < 0 < values["kernelfleet-kernel"]
    assert values["kernelfleet-kernel"] < values["kernelfleet-system"]
    placeholder = named(docs, "PriorityClass", "kernelfleet-placeholder")
    assert placeholder["preemptionPolicy"] == "Never"


# --- network policies --------------------------------------------------------------------


def _denies_all(policy: dict[str, Any]) -> bool:
    spec = policy["spec"]
    return (spec["podSelector"] == {} and set(spec["policyTypes"]) == {"Ingress", "Egress"}
            and not spec.get("ingress") and not spec.get("egress"))  # fmt: skip


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_namespace_denies_by_default(overlay: str) -> None:
    docs = rendered(overlay)
    policies = of_kind(docs, "NetworkPolicy")
    kernel_namespaces = [
        n["metadata"]["name"]
        for n in of_kind(docs, "Namespace")
        if n["metadata"]["labels"].get("kernelfleet.io/role") == "kernels"
    ]
    assert kernel_namespaces == [KERNEL_NS]
    for namespace in [n["metadata"]["name"] for n in of_kind(docs, "Namespace")]:
        assert any(_denies_all(p) for p in policies if p["metadata"]["namespace"] == namespace)


def _ip_blocks(policy: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for rule in policy["spec"].get("egress", []) + policy["spec"].get("ingress", []):
        for peer in rule.get("to", []) + rule.get("from", []):
            if "ipBlock" in peer:
                yield peer["ipBlock"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_nothing_may_reach_the_cloud_metadata_service(overlay: str) -> None:
    for policy in of_kind(rendered(overlay), "NetworkPolicy"):
        for block in _ip_blocks(policy):
            if METADATA_IP in ipaddress.ip_network(block["cidr"]):
                excepted = [ipaddress.ip_network(e) for e in block.get("except", [])]
                assert any(METADATA_IP in e for e in excepted), policy["metadata"]["name"]


def _egress_peers(docs: tuple[dict[str, Any], ...], namespace: str, app: str) -> list[dict]:
    peers = []
    for policy in of_kind(docs, "NetworkPolicy"):
        selector = policy["spec"]["podSelector"].get("matchLabels", {})
        if policy["metadata"]["namespace"] == namespace and selector.get(
            "app.kubernetes.io/name"
        ) in (app, None):
            for rule in policy["spec"].get("egress", []):
                peers += [(peer, rule.get("ports")) for peer in rule.get("to", [])]
    return peers


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kernels_reach_only_dns_eg_and_allowed_cidrs(overlay: str) -> None:
    peers = _egress_peers(rendered(overlay), KERNEL_NS, "kernelfleet-kernel")
    allowed = set()
    for peer, ports in peers:
        if "ipBlock" in peer:
            assert ports, "an allowed CIDR rule must name its ports"
            allowed.add("cidr")
            continue
        app = peer["podSelector"]["matchLabels"].get("app.kubernetes.io/name") or peer[
            "podSelector"]["matchLabels"].get("k8s-app")  # fmt: skip
        allowed.add(app)
        if app == "enterprise-gateway":
            assert ports == [{"protocol": "TCP", "port": 8877}]
        else:
            assert app == "kube-dns" and {p["port"] for p in ports} == {53}
    assert allowed == {"kube-dns", "enterprise-gateway", "cidr"}


def test_notebook_pods_reach_eg_and_only_the_scheduler_reaches_redis() -> None:
    docs = rendered("gpu")
    gateway = named(docs, "NetworkPolicy", "enterprise-gateway")["spec"]["ingress"]
    froms = [peer for rule in gateway for peer in rule["from"]]
    assert {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "jhub"}},
        "podSelector": {"matchLabels": {"component": "singleuser-server"}},
    } in froms
    (redis_rule,) = named(docs, "NetworkPolicy", "redis")["spec"]["ingress"]
    assert redis_rule["from"] == [
        {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "kernelfleet-scheduler"}}}
    ]


# --- RBAC ----------------------------------------------------------------------------------


def _bound_rules(docs: tuple[dict[str, Any], ...], account: str) -> list[tuple[str, dict]]:
    """(namespace or '*', rule) of every rule bound to service account ``account``."""
    found = []
    for binding in of_kind(docs, "RoleBinding") + of_kind(docs, "ClusterRoleBinding"):
        if not any(s["name"] == account for s in binding["subjects"]):
            continue
        ref = binding["roleRef"]
        role = named(docs, ref["kind"], ref["name"])
        scope = binding["metadata"].get("namespace", "*")
        found += [(scope, rule) for rule in role["rules"]]
    return found


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rbac_is_least_privilege(overlay: str) -> None:
    docs = rendered(overlay)
    for role in of_kind(docs, "Role") + of_kind(docs, "ClusterRole"):
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"]
    gateway = _bound_rules(docs, "enterprise-gateway")
    assert {scope for scope, _ in gateway} == {KERNEL_NS}  # the kernel namespace only
    assert {r for _, rule in gateway for r in rule["resources"]} == {"pods", "secrets", "services"}
    scheduler = _bound_rules(docs, "kernelfleet-scheduler")
    cluster_wide = [rule for scope, rule in scheduler if scope == "*"]
    assert cluster_wide == [{"apiGroups": [""], "resources": ["nodes"],
                             "verbs": ["get", "list", "watch"]}]  # fmt: skip
    local = {tuple(rule["resources"]): rule for scope, rule in scheduler if scope == KERNEL_NS}
    assert set(local[("pods",)]["verbs"]) == {"get", "list", "watch", "delete", "patch"}
    placeholders = {d["metadata"]["name"] for d in of_kind(docs, "Deployment")
                    if d["metadata"]["namespace"] == KERNEL_NS}  # fmt: skip
    assert set(local[("deployments/scale",)]["resourceNames"]) == placeholders


# --- generated parts in step with kernelspecs/ -------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pool_manifests_match_the_kernelspecs(overlay: str, tmp_path: Path) -> None:
    config, selected = platform_config(overlay, tmp_path)
    specs = {name: load_kernelspec(REPO / "kernelspecs" / name, config) for name in selected}
    expected = {(m["kind"], m["metadata"]["name"]): m for m in pool_manifests(config, specs)}
    docs = rendered(overlay)
    actual = {
        (d["kind"], d["metadata"]["name"]): d
        for d in docs
        if d["metadata"].get("namespace") == KERNEL_NS and d["kind"] in WORKLOADS
    }
    assert actual.keys() == expected.keys(), (
        "regenerate with `python -m kernelfleet.kernelspecs.render_kubernetes_pools` "
        "(docs/kubernetes.md)"
    )
    for key, manifest in expected.items():
        assert actual[key]["spec"] == manifest["spec"], key
    assert {placeholder_name(p) for p in {s.pool for s in specs.values()}} == {
        name for kind, name in expected if kind == "Deployment"
    }


@pytest.mark.parametrize(("overlay", "pools"), [("cpu-only", {"cpu"}), ("gpu", {"cpu", "gpu"})])
def test_overlay_config_and_kernelspec_selection_agree(
    overlay: str, pools: set[str], tmp_path: Path
) -> None:
    config, selected = platform_config(overlay, tmp_path)
    assert config.backend == "kubernetes" and set(config.pools) == pools
    assert {load_kernelspec(REPO / "kernelspecs" / name, config).pool for name in selected} == pools


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_config_maps_and_services_are_wired(overlay: str) -> None:
    docs = rendered(overlay)
    config_maps = {c["metadata"]["name"] for c in of_kind(docs, "ConfigMap")}
    for name, pod in pod_specs(docs):
        for volume in pod.get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps, name
        for container in containers(pod):
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("configMapKeyRef")
                assert ref is None or ref["name"] in config_maps, name
    workloads = [d for d in docs if d["kind"] in WORKLOADS]
    for service in of_kind(docs, "Service"):
        selector = service["spec"]["selector"].items()
        assert any(selector <= w["spec"]["template"]["metadata"]["labels"].items()
                   for w in workloads), service["metadata"]["name"]  # fmt: skip


def test_scheduler_arguments_are_ones_it_accepts() -> None:
    from scheduler.__main__ import parse_args

    container = named(rendered("gpu"), "Deployment", "scheduler")["spec"]["template"]["spec"][
        "containers"][0]  # fmt: skip
    assert container["command"] == ["python", "-m", "scheduler"]
    args = parse_args(container["args"])
    assert args.config == "/etc/kernelfleet/kernelfleet.yaml"
    assert args.redis_url.startswith("redis://redis-0.redis.kernelfleet.svc")


def test_redis_runs_with_the_settings_kernelfleet_up_uses() -> None:
    from kernelfleet.redis_settings import TUNING

    redis = named(rendered("gpu"), "StatefulSet", "redis")["spec"]["template"]["spec"]
    command = redis["containers"][0]["command"]
    pairs = dict(zip(command[1::2], command[2::2], strict=False))  # --name value ...
    wanted = dict(zip(TUNING[::2], TUNING[1::2], strict=True))
    assert {name: pairs.get(name) for name in wanted} == wanted


def test_gateway_config_sets_only_known_traits(tmp_path: Path) -> None:
    python = REPO / ".venv-gateway" / "bin" / "python"
    if not python.exists():
        pytest.skip("no .venv-gateway")
    (config_map,) = of_kind(rendered("gpu"), "ConfigMap")
    path = tmp_path / "gateway_config.py"
    path.write_text(config_map["data"]["gateway_config.py"])
    check = (
        "import sys\n"
        "from traitlets.config import PyFileConfigLoader\n"
        "from gateway.server.app import KernelfleetGatewayApp as App\n"
        "config = PyFileConfigLoader(sys.argv[1]).load_config()\n"
        "known = set(App.class_trait_names(config=True))\n"
        "unknown = set(config['KernelfleetGatewayApp']) - known\n"
        "assert set(config) == {'KernelfleetGatewayApp'}, set(config)\n"
        "assert not unknown, unknown\n"
    )
    result = subprocess.run([str(python), "-c", check, str(path)], capture_output=True,
                            text=True, cwd=REPO, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("committed", "config", "only"),
    [
        ("base/pools-cpu.yaml", "base/kernelfleet.yaml", ["python-cpu", "python-cpu-large"]),
        ("overlays/gpu/pools-gpu.yaml", "overlays/gpu/kernelfleet.yaml", ["python-gpu"]),
    ],
)
def test_committed_pool_manifests_are_what_the_documented_command_prints(
    committed: str, config: str, only: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    from kernelfleet.kernelspecs.render_kubernetes_pools import main

    deploy = REPO / "deploy"
    args = ["--config", str(deploy / config), "--kernelspecs", str(REPO / "kernelspecs")]
    assert main([*args, *(f"--only={name}" for name in only)]) == 0
    assert capsys.readouterr().out == (deploy / committed).read_text()


# --- the Zero to JupyterHub values ---------------------------------------------------------


def _values() -> dict[str, Any]:
    return yaml.safe_load((REPO / "deploy" / "jupyterhub" / "values.yaml").read_text())


def _service_url(docs: tuple[dict[str, Any], ...], name: str) -> str:
    service = named(docs, "Service", name)
    meta, port = service["metadata"], service["spec"]["ports"][0]["port"]
    return f"http://{meta['name']}.{meta['namespace']}.svc.cluster.local:{port}"


def test_hub_values_point_notebooks_at_the_gateway(tmp_path: Path) -> None:
    docs, values = rendered("gpu"), _values()
    single = values["singleuser"]
    assert f"{single['image']['name']}:{single['image']['tag']}" == "kernelfleet/notebook:0.1.0"
    assert values["hub"]["image"]["name"] == "kernelfleet/hub"
    env = single["extraEnv"]
    assert env["JUPYTER_GATEWAY_URL"] == _service_url(docs, "enterprise-gateway")
    assert env["JUPYTER_GATEWAY_AUTH_SCHEME"] == "token"
    config, _ = platform_config("gpu", tmp_path)
    assert int(env["KERNEL_LAUNCH_TIMEOUT"]) == config.kernel_launch_timeout
    pad = int(env["JUPYTER_GATEWAY_LAUNCH_TIMEOUT_PAD"])
    assert int(env["JUPYTER_GATEWAY_REQUEST_TIMEOUT"]) == config.kernel_launch_timeout + pad


def test_hub_values_open_a_connection_per_request_as_the_embedded_hub_does() -> None:
    from hub.config import HUB_CONNECTOR_OPTIONS

    client = _values()["hub"]["config"]["JupyterHubHTTPClient"]
    assert client["connector_options"] == HUB_CONNECTOR_OPTIONS


def test_hub_values_let_notebooks_reach_only_the_gateway() -> None:
    docs, values = rendered("gpu"), _values()
    policy = values["singleuser"]["networkPolicy"]
    assert policy["enabled"] is True
    rules = policy["egressAllowRules"]
    assert rules["cloudMetadataServer"] is False and rules["privateIPs"] is False
    (rule,) = policy["egress"]
    (peer,) = rule["to"]
    gateway = named(docs, "Deployment", "enterprise-gateway")
    labels = gateway["spec"]["template"]["metadata"]["labels"]
    assert peer["podSelector"]["matchLabels"].items() <= labels.items()
    namespace = peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
    assert namespace == gateway["metadata"]["namespace"]
    ports = gateway["spec"]["template"]["spec"]["containers"][0]["ports"]
    assert rule["ports"] == [{"protocol": "TCP", "port": ports[0]["containerPort"]}]


def test_hub_values_register_scheduler_and_gateway_services() -> None:
    from hub.config import GATEWAY_SERVICE, GATEWAY_SERVICE_SCOPES, SERVER_TOKEN_SCOPES

    docs, hub = rendered("gpu"), _values()["hub"]
    assert hub["services"]["kernelfleet-scheduler"]["url"] == _service_url(docs, "scheduler")
    assert GATEWAY_SERVICE in hub["services"]
    assert "apiToken" not in hub["services"][GATEWAY_SERVICE]  # given with --set-file, never here
    role = hub["loadRoles"][GATEWAY_SERVICE]
    assert (role["scopes"], role["services"]) == (GATEWAY_SERVICE_SCOPES, [GATEWAY_SERVICE])
    assert hub["config"]["KubeSpawner"]["server_token_scopes"] == SERVER_TOKEN_SCOPES
    (ingress,) = hub["networkPolicy"]["ingress"]
    allowed = ingress["from"][0]["podSelector"]["matchExpressions"][0]["values"]
    assert set(allowed) == {"enterprise-gateway", "kernelfleet-scheduler"}
