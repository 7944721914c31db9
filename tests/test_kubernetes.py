"""deploy/kubernetes: every overlay renders with kubectl's Kustomize, validates offline against the
Kubernetes schemas (kubernetes-validate --strict), and agrees with the code it deploys.

Variants: the `cpu` and `gpu` overlays as shipped, and each with the optional components switched on
the way docs/kubernetes.md says (the commented `components:` lines uncommented in a copy). The rendered
objects are then read and checked against the code: probe paths and port, the environment variables
config.py and gunicorn.conf.py read, the grace period against Gunicorn's drain, the autoscaling metric
against what /metrics serves.
"""

from __future__ import annotations

import os
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from embedapi.config import Settings, load_model_specs

from .conftest import EMBED

ROOT = Path(__file__).resolve().parent.parent
KUBE = ROOT / "deploy" / "kubernetes"
OVERLAYS = ("cpu", "gpu")
VARIANTS = [f"{o}{suffix}" for o in OVERLAYS for suffix in ("", "+components")]
VALIDATE_VERSIONS = ("1.30.0", "1.37.0")  # the oldest with the native preStop sleep on by default; the newest
CRDS = {("keda.sh/v1alpha1", "ScaledObject"), ("monitoring.coreos.com/v1", "ServiceMonitor")}


def tool(name: str, hint: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed ({hint})")
        pytest.skip(f"{name} is not installed ({hint})")
    return found


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[dict[str, Any]]]]:
    """variant -> (the rendered YAML file, its objects)."""
    kubectl = tool("kubectl", ".ci/run installs it")
    copy = tmp_path_factory.mktemp("kube") / "kubernetes"
    shutil.copytree(KUBE, copy)
    for overlay in OVERLAYS:  # switch the optional components on, as docs/kubernetes.md says
        path = copy / "overlays" / overlay / "kustomization.yaml"
        text, n = re.subn(r"(?m)^# (components:|  - \.\./\.\./components/)", r"\1", path.read_text())
        assert n == 3, f"overlays/{overlay}: expected the commented components block (3 lines)"
        path.write_text(text)
    out: dict[str, tuple[Path, list[dict[str, Any]]]] = {}
    for variant in VARIANTS:
        overlay, _, extra = variant.partition("+")
        where = (copy if extra else KUBE) / "overlays" / overlay
        proc = subprocess.run([kubectl, "kustomize", str(where)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        file = copy.parent / f"{variant}.yaml"
        file.write_text(proc.stdout)
        out[variant] = (file, [d for d in yaml.safe_load_all(proc.stdout) if d])
    return out


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def container(objects: list[dict[str, Any]], name: str = "embedapi") -> dict[str, Any]:
    spec = one(objects, "Deployment")["spec"]["template"]["spec"]
    return next(c for c in spec["containers"] + spec.get("initContainers", []) if c["name"] == name)


def env_of(c: dict[str, Any]) -> dict[str, str]:
    """Literal values; a downward-API value stands in as the number it resolves to."""
    out = {}
    for e in c.get("env", []):
        if "value" in e:
            out[e["name"]] = e["value"]
        elif e.get("valueFrom", {}).get("resourceFieldRef", {}).get("resource") == "limits.cpu":
            out[e["name"]] = str(int(float(str(c["resources"]["limits"]["cpu"]).rstrip("m")) or 1))
    return out


def test_every_variant_renders_and_validates_strictly(rendered) -> None:
    validate = tool("kubernetes-validate", "pip install -r requirements-test.txt")
    files = [str(f) for f, _ in rendered.values()]
    for version in VALIDATE_VERSIONS:
        proc = subprocess.run([validate, "--strict", "-k", version, *files], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        # Only the two CRDs have no schema offline; the test below checks them field by field.
        missing = set(re.findall(r"Couldn't find schema for kind (\w+) with api version (\S+)",
                                 proc.stdout + proc.stderr))
        assert {(api, kind) for kind, api in missing} <= CRDS, missing
    kinds = {v: sorted(o["kind"] for o in objs) for v, (_, objs) in rendered.items()}
    for overlay in OVERLAYS:
        assert kinds[overlay] == sorted(["Namespace", "ConfigMap", "Service", "Deployment", "PodDisruptionBudget",
                                         "HorizontalPodAutoscaler"])
        # KEDA owns the HPA when its component is on: the base's HPA is gone, nothing else changes.
        assert kinds[overlay + "+components"] == sorted(
            set(kinds[overlay]) - {"HorizontalPodAutoscaler"} | {"ScaledObject", "ServiceMonitor"})


def test_probes_and_port_match_the_server(rendered, client) -> None:
    for variant, (_, objects) in rendered.items():
        c = container(objects)
        env = env_of(c)
        (port,) = c["ports"]
        assert port["name"] == "http"
        assert port["containerPort"] == Settings.from_env({"APP_PORT": env["APP_PORT"]}).port == 8000
        assert c["startupProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
        assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
        assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
        # Sized for loading (and, without the init container, downloading) a 310m model: 10 minutes.
        startup = c["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
        service = one(objects, "Service")
        assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]
    # The routes exist and answer as the probes expect (models loaded: both 200).
    assert client.get("/ready").status_code == 200
    assert client.get("/health").status_code == 200


def names_the_code_reads() -> set[str]:
    """Every EMBEDAPI_* / APP_PORT / PROMETHEUS_MULTIPROC_DIR name in the settings and Gunicorn sources."""
    names: set[str] = set()
    for path in (ROOT / "embedapi" / "config.py", ROOT / "gunicorn.conf.py"):
        names |= set(re.findall(r"[\"'](EMBEDAPI_[A-Z0-9_]+|APP_PORT|PROMETHEUS_MULTIPROC_DIR)[\"']", path.read_text()))
    return names


def test_environment_is_what_the_code_reads(rendered, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    known = names_the_code_reads()
    assert {"EMBEDAPI_MODELS_FILE", "EMBEDAPI_API_KEYS_FILE", "EMBEDAPI_WORKERS", "EMBEDAPI_GRACEFUL_TIMEOUT"} <= known
    for variant, (_, objects) in rendered.items():
        deployment = one(objects, "Deployment")
        pod = deployment["spec"]["template"]["spec"]
        for c in pod["containers"] + pod["initContainers"]:
            ours = {e["name"] for e in c.get("env", [])
                    if e["name"].startswith(("EMBEDAPI_", "APP_", "PROMETHEUS_"))}
            assert ours <= known, f"{variant} {c['name']}: {sorted(ours - known)} are read by nothing"
        c = container(objects)
        env = env_of(c)
        # The files the variables point at are the mounted ConfigMap and Secret.
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        models_dir, models_name = env["EMBEDAPI_MODELS_FILE"].rsplit("/", 1)
        keys_dir, keys_name = env["EMBEDAPI_API_KEYS_FILE"].rsplit("/", 1)
        configmap = one(objects, "ConfigMap")
        assert volumes[mounts[models_dir]]["configMap"]["name"] == configmap["metadata"]["name"]
        assert models_name in configmap["data"]
        assert volumes[mounts[keys_dir]]["secret"]["secretName"] == "embedapi-api-keys"
        assert container(objects, "fetch-models")["env"][0] == {"name": "EMBEDAPI_MODELS_FILE",
                                                                "value": env["EMBEDAPI_MODELS_FILE"]}
        # Settings.from_env reads them as the pod would (the files written where they would be mounted).
        (tmp_path / models_name).write_text(configmap["data"][models_name], encoding="utf-8")
        (tmp_path / keys_name).write_text("sk-test-1\n", encoding="utf-8")
        local = {**env, "EMBEDAPI_MODELS_FILE": str(tmp_path / models_name),
                 "EMBEDAPI_API_KEYS_FILE": str(tmp_path / keys_name)}
        settings = Settings.from_env(local)
        assert settings.api_keys == ("sk-test-1",)
        assert [m.id for m in settings.models] == [m.id for m in load_model_specs(tmp_path / models_name)]
        assert all(m.id.startswith("cl-nagoya/ruri-v3-") for m in settings.models)
        # gunicorn.conf.py reads the rest: one worker per pod, the drain, the bind port.
        conf = gunicorn_conf(monkeypatch, tmp_path, env)
        assert conf["workers"] == 1
        assert conf["bind"].endswith(f":{c['ports'][0]['containerPort']}")
        assert conf["graceful_timeout"] == int(env["EMBEDAPI_GRACEFUL_TIMEOUT"])


def gunicorn_conf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, env: dict[str, str]) -> dict[str, Any]:
    """gunicorn.conf.py executed with the pod's environment (GPUs hidden; nothing is started)."""
    with monkeypatch.context() as m:
        for name in ("EMBEDAPI_DEVICE", "EMBEDAPI_WORKERS", "EMBEDAPI_GRACEFUL_TIMEOUT", "EMBEDAPI_OWNS_METRICS_DIR"):
            m.delenv(name, raising=False)
        m.setenv("CUDA_VISIBLE_DEVICES", "-1")
        m.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "metrics"))
        for name, value in env.items():
            if name != "EMBEDAPI_DEVICE":  # "cuda" on the GPU overlay; the count comes from the device plugin
                m.setenv(name, value)
        return runpy.run_path(str(ROOT / "gunicorn.conf.py"))


def test_grace_period_covers_the_prestop_pause_and_the_drain(rendered, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    for variant, (_, objects) in rendered.items():
        pod = one(objects, "Deployment")["spec"]["template"]["spec"]
        c = container(objects)
        pause = c["lifecycle"]["preStop"]["sleep"]["seconds"]
        drain = gunicorn_conf(monkeypatch, tmp_path, env_of(c))["graceful_timeout"]
        assert pause >= 5, "endpoints need a few seconds to drop the pod everywhere"
        assert pod["terminationGracePeriodSeconds"] >= pause + drain + 10, variant
        # A rollout never drops below the replicas it has; the budget lets one pod go at a time.
        strategy = one(objects, "Deployment")["spec"]["strategy"]["rollingUpdate"]
        assert strategy["maxUnavailable"] == 0


def test_selectors_security_and_resources(rendered) -> None:
    for variant, (_, objects) in rendered.items():
        deployment = one(objects, "Deployment")
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        pod = deployment["spec"]["template"]["spec"]

        def selects(selector: dict[str, str]) -> bool:
            return selector.items() <= labels.items()
        assert selects(deployment["spec"]["selector"]["matchLabels"])
        assert selects(one(objects, "Service")["spec"]["selector"])
        assert selects(one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"])
        assert {t["topologyKey"] for t in pod["topologySpreadConstraints"]} == {"topology.kubernetes.io/zone",
                                                                                "kubernetes.io/hostname"}
        assert all(selects(t["labelSelector"]["matchLabels"]) for t in pod["topologySpreadConstraints"])
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        for c in pod["containers"] + pod["initContainers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
            assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
            assert c["image"] == f"embedapi:{variant.split('+')[0]}"
            mounts = {m["mountPath"] for m in c["volumeMounts"]}
            assert "/cache" in mounts, "the Hugging Face cache (HF_HOME=/cache/huggingface) is on the volume"
        limits = container(objects)["resources"]["limits"]
        if variant.startswith("gpu"):
            assert limits["nvidia.com/gpu"] == "1" and env_of(container(objects))["EMBEDAPI_WORKERS"] == "1"
        else:
            assert "nvidia.com/gpu" not in limits
        assert container(objects, "fetch-models")["command"] == ["python", "-m", "embedapi", "download"]


def served_metrics(client) -> dict[str, Any]:
    assert client.post("/v1/embeddings", json={"model": EMBED, "input": ["名古屋の天気"]}).status_code == 200
    resp = client.get("/metrics")
    assert resp.status_code == 200
    return {fam.name: fam for fam in text_string_to_metric_families(resp.get_data(as_text=True))}


def test_autoscaling_metric_is_what_metrics_serves(rendered, client) -> None:
    families = served_metrics(client)
    adapter = yaml.safe_load((KUBE / "prometheus-adapter" / "values.yaml").read_text())
    (rule,) = adapter["rules"]["custom"]
    series = re.match(r"(\w+)\{", rule["seriesQuery"]).group(1)
    assert series in families and families[series].type == "gauge", sorted(families)
    assert {"model"} == {k for s in families[series].samples for k in s.labels}
    assert rule["name"]["matches"] == f"^{series}$"
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    for overlay in OVERLAYS:
        target = yaml.safe_load((KUBE / "overlays" / overlay / "autoscaling.yaml").read_text())["data"]
        hpa = one(rendered[overlay][1], "HorizontalPodAutoscaler")
        (metric,) = hpa["spec"]["metrics"]
        assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == rule["name"]["as"]
        assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": target["queueTokensPerPod"]}
        assert hpa["spec"]["scaleTargetRef"]["name"] == one(rendered[overlay][1], "Deployment")["metadata"]["name"]
        assert hpa["spec"]["minReplicas"] >= 2  # with the PDB's maxUnavailable 1, one replica always serves

        objects = rendered[overlay + "+components"][1]
        scaled = one(objects, "ScaledObject")["spec"]
        (trigger,) = scaled["triggers"]
        assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
        assert re.search(rf"\b{series}\{{", trigger["metadata"]["query"])
        assert trigger["metadata"]["threshold"] == target["queueTokensPerPod"]
        assert scaled["scaleTargetRef"]["name"] == "embedapi"
        assert scaled["minReplicaCount"] == hpa["spec"]["minReplicas"]
        monitor = one(objects, "ServiceMonitor")["spec"]
        service = one(objects, "Service")
        assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
        assert [(e["port"], e["path"]) for e in monitor["endpoints"]] == [(service["spec"]["ports"][0]["name"],
                                                                           "/metrics")]
