"""The shipped cluster files: KubeRay manifests, the launcher YAML, the Grafana dashboard, no public dashboard.

Nothing here deploys (no Kubernetes, no cloud in CI). The KubeRay manifests are checked by hand for
the fields KubeRay needs and, where the KubeRay CRDs are at hand, against the CRDs' OpenAPI schemas
with unknown fields refused, as `kubectl apply --validate=strict` would: set PIXELRAY_KUBERAY_CRDS to
a directory holding ray.io_rayclusters.yaml and ray.io_rayjobs.yaml (a kuberay checkout's
helm-chart/kuberay-operator/crds). The Grafana queries are checked here against the driver's metrics;
the workers' (Ray's metrics export) in tests/test_cluster_local.py, on a real head.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import urllib.request
from pathlib import Path

import jsonschema
import pytest
import yaml
from helpers import exported_names, grafana_panels, grafana_queries, promql_metric_names

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
GRAFANA = CLUSTER / "grafana-dashboard.json"
TOKEN_KEY = "auth_token"  # the data key KubeRay reads from the token Secret


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _one(path: Path, kind: str) -> dict:
    docs = [d for d in _docs(path) if d.get("kind") == kind]
    assert len(docs) == 1, f"{path.name}: {len(docs)} documents of kind {kind}"
    return docs[0]


def _pinned_ray() -> str:
    pins = dict(line.split("==") for line in (REPO / "constraints.txt").read_text().split() if "==" in line)
    return pins["ray"]


# --- KubeRay ------------------------------------------------------------------------------------------


def _containers(group: dict) -> list[dict]:
    containers = group["template"]["spec"]["containers"]
    assert isinstance(containers, list) and containers
    return containers


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _assert_token_from_secret(container: dict, secret: str, where: str) -> None:
    env = _env(container)
    assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{where}: RAY_AUTH_MODE is not token"
    ref = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef")
    assert ref == {"name": secret, "key": TOKEN_KEY}, f"{where}: RAY_AUTH_TOKEN not from Secret {secret}: {ref}"
    assert "value" not in env["RAY_AUTH_TOKEN"], f"{where}: a token written into the manifest"


def _assert_cluster_spec(spec: dict, where: str) -> None:
    """The fields KubeRay needs and the ones this project promises (GPU workers, autoscaling, token, storage)."""
    assert spec["rayVersion"] == _pinned_ray()
    assert spec["enableInTreeAutoscaling"] is True
    auth = spec["authOptions"]
    assert auth["mode"] == "token"
    secret = auth["secretName"]

    head = spec["headGroupSpec"]
    groups = [("head", head)] + [(f"worker group {g.get('groupName')}", g) for g in spec["workerGroupSpecs"]]
    for name, group in groups:
        params = group["rayStartParams"]  # map[string]string in the CRD
        assert isinstance(params, dict) and all(isinstance(v, str) for v in params.values()), (name, params)
        for c in _containers(group):
            assert isinstance(c["name"], str) and c["name"]
            assert re.fullmatch(r"[a-z0-9.-]+(:[0-9]+)?(/[a-z0-9._-]+)+:[A-Za-z0-9._-]+", c["image"]), c["image"]
            assert c["resources"]["limits"] and c["resources"]["requests"], (name, c["resources"])
        _assert_token_from_secret(_containers(group)[0], secret, f"{where} {name}")
    # the dashboard and job API stay inside Kubernetes
    assert head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress")
    assert "dashboard-host" not in head["rayStartParams"]

    assert spec["workerGroupSpecs"]
    gpu_groups = []
    for g in spec["workerGroupSpecs"]:
        assert isinstance(g["groupName"], str) and g["groupName"]
        counts = [g["minReplicas"], g["replicas"], g["maxReplicas"]]
        assert all(isinstance(n, int) for n in counts) and 0 <= counts[0] <= counts[1] <= counts[2], counts
        resources = _containers(g)[0]["resources"]
        gpus = resources["limits"].get("nvidia.com/gpu")
        if gpus is not None:
            assert int(gpus) >= 1
            # Kubernetes: an extended resource's request, when given, equals its limit
            assert resources["requests"].get("nvidia.com/gpu", gpus) == gpus
            gpu_groups.append(g)
    assert gpu_groups, f"{where}: no worker group with an nvidia.com/gpu limit"
    assert any(g["maxReplicas"] > g["minReplicas"] for g in gpu_groups), "no room to autoscale the GPU workers"

    # storage: the shared claim of pvc.yaml, mounted where TORCH_HOME points, in every Ray container
    claim = _one(KUBERAY / "pvc.yaml", "PersistentVolumeClaim")
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    for name, group in groups:
        volumes = {v["name"]: v for v in group["template"]["spec"].get("volumes", [])}
        container = _containers(group)[0]
        mounts = [m for m in container.get("volumeMounts", [])
                  if volumes.get(m["name"], {}).get("persistentVolumeClaim", {}).get("claimName")
                  == claim["metadata"]["name"]]
        assert len(mounts) == 1, f"{where} {name}: the claim {claim['metadata']['name']} is not mounted"
        torch_home = _env(container)["TORCH_HOME"]["value"]
        assert torch_home.startswith(mounts[0]["mountPath"] + "/"), (name, torch_home)


def _head_mount(spec: dict) -> str:
    return _containers(spec["headGroupSpec"])[0]["volumeMounts"][0]["mountPath"]


def test_raycluster_has_what_kuberay_needs():
    doc = _one(KUBERAY / "raycluster.yaml", "RayCluster")
    assert doc["apiVersion"] == "ray.io/v1"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
    _assert_cluster_spec(doc["spec"], "raycluster.yaml")


def test_rayjob_runs_the_paper_sweep_on_the_same_cluster():
    doc = _one(KUBERAY / "rayjob.yaml", "RayJob")
    assert doc["apiVersion"] == "ray.io/v1"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
    spec = doc["spec"]
    # the same cluster as raycluster.yaml, not a copy that drifts
    assert spec["rayClusterSpec"] == _one(KUBERAY / "raycluster.yaml", "RayCluster")["spec"]
    _assert_cluster_spec(spec["rayClusterSpec"], "rayjob.yaml")
    submitter = spec["submitterPodTemplate"]["spec"]["containers"][0]
    _assert_token_from_secret(submitter, spec["rayClusterSpec"]["authOptions"]["secretName"], "rayjob.yaml submitter")

    argv = shlex.split(spec["entrypoint"])
    assert argv[:4] == ["python", "jobs/sweep.py", "--config", "jobs/paper.toml"]
    from pixelray.config.sweep import load_config

    load_config(REPO / "jobs" / "paper.toml")  # the config it names is there and valid
    sweep_options = _sweep_entrypoint_options()
    options = [a for a in argv[2:] if a.startswith("--")]
    assert set(options) <= sweep_options, f"options jobs/sweep.py does not take: {set(options) - sweep_options}"
    out = argv[argv.index("--out") + 1]
    assert out.startswith(_head_mount(spec["rayClusterSpec"]) + "/"), f"results {out} are not on the shared volume"


def _sweep_entrypoint_options() -> set[str]:
    import importlib.util

    import typer

    module_spec = importlib.util.spec_from_file_location("pixelray_job_sweep", REPO / "jobs" / "sweep.py")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    command = typer.main.get_command(module.app)
    return {opt for param in command.params for opt in param.opts}


def _strict(schema):
    """The CRD schema with unknown fields refused where it lists the known ones (the API server prunes them)."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def crd_validators():
    # KubeRay's own CRD files: PIXELRAY_KUBERAY_CRDS, else the copy in shared/ beside the checkout (.ci/run)
    beside = Path(__file__).resolve().parents[2] / "shared" / "kuberay-crds"
    root = os.environ.get("PIXELRAY_KUBERAY_CRDS") or str(beside)
    files = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
    if not all((Path(root) / f).is_file() for f in files.values()):
        if os.environ.get("CI"):  # CI has shared/ beside its checkout: these tests must run there, not skip
            pytest.fail(f"KubeRay CRDs not found under {root}: .ci/run sets PIXELRAY_KUBERAY_CRDS")
        pytest.skip("KubeRay CRDs not found: set PIXELRAY_KUBERAY_CRDS to a kuberay checkout's "
                    "helm-chart/kuberay-operator/crds to validate the manifests against their schemas "
                    "(the required fields are checked by hand without them)")
    validators = {}
    for kind, name in files.items():
        crd = yaml.load((Path(root) / name).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        assert crd["spec"]["names"]["kind"] == kind
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        validators[kind] = jsonschema.Draft4Validator(_strict(version["schema"]["openAPIV3Schema"]))
    return validators


@pytest.mark.parametrize("path", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_manifests_match_the_crd_schemas(crd_validators, path):
    for doc in _docs(KUBERAY / path):
        if doc["apiVersion"] == "ray.io/v1":
            errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
                      for e in crd_validators[doc["kind"]].iter_errors(doc)]
            assert not errors, f"{path}:\n" + "\n".join(errors)


def test_the_crd_check_refuses_a_misspelt_field_and_a_bad_quantity(crd_validators):
    """The schema check has teeth: without the strict mode, a typo would be pruned silently by the API server."""
    doc = _one(KUBERAY / "raycluster.yaml", "RayCluster")
    typo = copy.deepcopy(doc)
    typo["spec"]["enableInTreeAutoscalling"] = typo["spec"].pop("enableInTreeAutoscaling")
    assert not crd_validators["RayCluster"].is_valid(typo)
    bad = copy.deepcopy(doc)
    bad["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"][
        "nvidia.com/gpu"] = "one"
    assert not crd_validators["RayCluster"].is_valid(bad)


def test_image_and_ray_versions_agree():
    """The Dockerfile's Ray is the pinned one, and every pod runs the image it builds."""
    base = re.search(r"^FROM\s+rayproject/ray:(\S+)", (CLUSTER / "Dockerfile").read_text(), re.M).group(1)
    assert base.split("-")[0] == _pinned_ray()
    import ray

    assert ray.__version__ == _pinned_ray()
    images = {image for path in ("raycluster.yaml", "rayjob.yaml") for doc in _docs(KUBERAY / path)
              for image in _values(doc, "image")}
    assert len(images) == 1, images


def _values(node, key: str):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from _values(v, key)
    elif isinstance(node, list):
        for v in node:
            yield from _values(v, key)


# --- the cluster launcher -----------------------------------------------------------------------------


def test_launcher_yaml_validates_against_rays_schema():
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` runs, defaults filled in
    with pytest.raises(jsonschema.ValidationError, match="head_start_ray_command"):  # the schema has teeth
        jsonschema.validate({**config, "head_start_ray_command": []}, schema)


def test_launcher_nodes_start_with_token_auth_and_a_private_dashboard():
    config = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    starts = [c for key in ("head_start_ray_commands", "worker_start_ray_commands")
              for c in config[key] if "ray start" in c]
    assert len(starts) == 2
    for command in starts:
        assert re.search(r"(^|\s)RAY_AUTH_MODE=token\s", command), command
        assert "--dashboard-host" not in command, command  # Ray's default: the head's 127.0.0.1
    # every node gets the token that `ray get-auth-token --generate` wrote on the submitting machine
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


SHIPPED = sorted(
    [REPO / "Makefile"]
    + [p for d in ("cluster", "jobs") for p in (REPO / d).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
)


def test_no_shipped_config_listens_on_all_interfaces():
    assert any(p.name == "ray-cluster.yaml" for p in SHIPPED) and any(p.suffix == ".toml" for p in SHIPPED)
    public = re.compile(r"0\.0\.0\.0|dashboard[-_]host[\s=:\"']+(?!127\.0\.0\.1|localhost|\{HOST\}|\$)")
    found = [f"{p.relative_to(REPO)}:{n}: {line.strip()}" for p in SHIPPED
             for n, line in enumerate(p.read_text().splitlines(), 1) if public.search(line)]
    assert not found, "\n".join(found)


# --- Prometheus and Grafana ---------------------------------------------------------------------------


def test_grafana_panels_query_metrics_the_driver_exports():
    from pixelray.telemetry import SweepTelemetry

    panels = grafana_panels(GRAFANA)
    assert len({p["id"] for p in panels}) == len(panels)
    assert all(p["targets"] and all(t["expr"].strip() for t in p["targets"]) for p in panels)
    # what a driver really serves once every kind of event happened
    tel = SweepTelemetry(port=0, progress=False)
    try:
        tel.start_phase("cells", total=2, already_done=0)
        tel.unit_done("tiny", images=10)
        tel.unit_failed()
        tel.worker_replaced()
        with urllib.request.urlopen(f"http://127.0.0.1:{tel.port}/metrics", timeout=5) as response:
            driver = exported_names(response.read().decode())
    finally:
        tel.close()
    checked = 0
    for title, expr in grafana_queries(GRAFANA):
        names = promql_metric_names(expr)
        assert names, f"panel {title!r}: no metric in {expr!r}"
        for name in names - {n for n in names if n.startswith("ray_")}:  # Ray's export: test_cluster_local.py
            assert name in driver, f"panel {title!r}: {name} is not exported by the driver ({sorted(driver)})"
            checked += 1
    assert checked >= 5


def test_promql_metric_names_finds_metrics_only():
    """The parser the dashboard checks rely on."""
    assert promql_metric_names("sum by (phase) (a_total) / sum by (phase) (b)") == {"a_total", "b"}
    assert promql_metric_names('sum by (model) (rate(c_total{model=~"x|y"}[1m])) * 60') == {"c_total"}
    assert promql_metric_names("histogram_quantile(0.9, sum by (le) (rate(d_bucket[5m]))) > bool 1e3") == {"d_bucket"}


def test_prometheus_scrapes_rays_discovery_file_and_the_driver_on_loopback():
    config = yaml.safe_load((CLUSTER / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    sd = jobs["ray"]["file_sd_configs"][0]["files"][0]
    assert sd.endswith("/prom_metrics_service_discovery.json")
    targets = [t for c in jobs["pixelray-driver"]["static_configs"] for t in c["targets"]]
    assert targets and all(t.startswith("127.0.0.1:") for t in targets)
