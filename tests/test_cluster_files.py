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
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

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


