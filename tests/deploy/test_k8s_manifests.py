"""deploy/k8s validates offline: YAML, kustomize references, selectors, probes, commands."""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
import yaml

from adloop.cli import COMMANDS, register_optional

ROOT = Path(__file__).resolve().parent.parent.parent
K8S = ROOT / "deploy" / "k8s"
BASE = K8S / "base"
OVERLAY = K8S / "overlays" / "10k"
WORKLOADS = ("Deployment", "StatefulSet", "Job")


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _kustomization(directory: Path) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((directory / "kustomization.yaml").read_text())
    return data


def _build(directory: Path) -> list[dict[str, Any]]:
    """The resources a kustomization includes (files and bases, recursively)."""
    out: list[dict[str, Any]] = []
    for ref in _kustomization(directory).get("resources", []):
        target = (directory / ref).resolve()
        assert target.exists(), f"{directory}: resource {ref} does not exist"
        out.extend(_build(target) if target.is_dir() else _docs(target))
    return out


def _index(resources: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["kind"], r["metadata"]["name"]): r for r in resources}


def _containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    containers: list[dict[str, Any]] = workload["spec"]["template"]["spec"]["containers"]
    return containers


def _is_adloop(container: dict[str, Any]) -> bool:
    return str(container["image"]).split(":")[0] == "adloop"


@functools.cache
def _help(command: str) -> str:
    res = subprocess.run([sys.executable, "-m", "adloop.cli", command, "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_every_yaml_file_parses_and_names_its_kind() -> None:
    files = sorted(K8S.rglob("*.yaml"))
    assert len(files) >= 10
    for path in files:
        docs = _docs(path)
        assert docs, path
        for doc in docs:
            if isinstance(doc, list):          # a JSON 6902 patch
                assert all({"op", "path"} <= set(op) for op in doc), path
            elif path.parent.name == "prometheus-adapter":   # Helm values
                assert doc["rules"]["custom"], path
            else:
                assert "kind" in doc and "apiVersion" in doc, path


@pytest.mark.parametrize("directory", [BASE, OVERLAY], ids=["base", "overlay"])
def test_kustomization_references_resolve(directory: Path) -> None:
    kust = _kustomization(directory)
    built = _index(_build(directory))
    for patch in kust.get("patches", []):
        assert (directory / patch["path"]).exists(), patch
        target = patch["target"]
        assert (target["kind"], target["name"]) in built, target
    for rep in kust.get("replicas", []):
        assert any(name == rep["name"] and kind in ("Deployment", "StatefulSet")
                   for kind, name in built), rep
    for image in kust.get("images", []):
        assert any(str(c["image"]).split(":")[0] == image["name"]
                   for r in built.values() if r["kind"] in WORKLOADS
                   for c in _containers(r)), image


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not on the PATH")
@pytest.mark.parametrize("directory", [BASE, OVERLAY], ids=["base", "overlay"])
def test_kubectl_kustomize_builds(directory: Path) -> None:
    exe = shutil.which("kubectl")
    assert exe is not None
    res = subprocess.run([exe, "kustomize", str(directory)], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    built = _index([d for d in yaml.safe_load_all(res.stdout) if d])
    assert ("StatefulSet", "adloop-learn") in built
    if directory == OVERLAY:
        assert built[("Deployment", "adloop-serve")]["spec"]["replicas"] == 120
        assert built[("HorizontalPodAutoscaler", "adloop-serve")]["spec"]["minReplicas"] == 120
        assert all(r["metadata"].get("namespace") == "adloop" for k, r in built.items()
                   if k[0] != "Namespace")


_META = {"type": "object", "required": ["name"],
         "properties": {"name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                        "labels": {"type": "object",
                                   "additionalProperties": {"type": "string"}}}}
_PROBE = {"type": "object", "required": ["httpGet"],
          "properties": {"httpGet": {"type": "object", "required": ["path", "port"],
                                     "properties": {"path": {"type": "string"},
                                                    "port": {"type": "integer"}}}}}
_CONTAINER = {"type": "object", "required": ["name", "image"],
              "properties": {"name": {"type": "string"}, "image": {"type": "string"},
                             "args": {"type": "array", "items": {"type": "string"}},
                             "readinessProbe": _PROBE, "livenessProbe": _PROBE,
                             "ports": {"type": "array", "items": {
                                 "type": "object", "required": ["containerPort"],
                                 "properties": {"containerPort": {"type": "integer"}}}}}}
_TEMPLATE = {"type": "object", "required": ["metadata", "spec"], "properties": {
    "metadata": {"type": "object", "required": ["labels"]},
    "spec": {"type": "object", "required": ["containers"], "properties": {
        "containers": {"type": "array", "minItems": 1, "items": _CONTAINER}}}}}
_SELECTOR = {"type": "object", "required": ["matchLabels"],
             "properties": {"matchLabels": {"type": "object", "minProperties": 1}}}
SCHEMAS: dict[str, dict[str, Any]] = {
    "Deployment": {"required": ["spec"], "properties": {"spec": {
        "type": "object", "required": ["selector", "template"],
        "properties": {"replicas": {"type": "integer", "minimum": 0},
                       "selector": _SELECTOR, "template": _TEMPLATE}}}},
    "StatefulSet": {"required": ["spec"], "properties": {"spec": {
        "type": "object", "required": ["selector", "template", "serviceName"],
        "properties": {"replicas": {"type": "integer", "minimum": 0},
                       "selector": _SELECTOR, "template": _TEMPLATE,
                       "volumeClaimTemplates": {"type": "array"}}}}},
    "Job": {"required": ["spec"], "properties": {"spec": {
        "type": "object", "required": ["template"], "properties": {"template": _TEMPLATE}}}},
    "Service": {"required": ["spec"], "properties": {"spec": {
        "type": "object", "required": ["selector", "ports"],
        "properties": {"ports": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["port"],
            "properties": {"port": {"type": "integer"}}}}}}}},
    "HorizontalPodAutoscaler": {"required": ["spec"], "properties": {"spec": {
        "type": "object", "required": ["scaleTargetRef", "minReplicas", "maxReplicas", "metrics"],
        "properties": {"minReplicas": {"type": "integer", "minimum": 1},
                       "maxReplicas": {"type": "integer", "minimum": 1},
                       "metrics": {"type": "array", "minItems": 1}}}}},
    "ConfigMap": {"required": ["data"], "properties": {"data": {
        "type": "object", "additionalProperties": {"type": "string"}}}},
    "Namespace": {},
}


def test_core_fields_match_minimal_schemas() -> None:
    for res in _build(OVERLAY):
        kind = res["kind"]
        assert kind in SCHEMAS, f"no schema for {kind}"
        schema = {"type": "object", "required": ["apiVersion", "kind", "metadata"],
                  "properties": {"metadata": _META}, **SCHEMAS[kind]}
        schema["properties"] = {**schema["properties"], "metadata": _META}
        validator = jsonschema_rs.validator_for(schema)
        errors = [f"{e.instance_path}: {e.message}" for e in validator.iter_errors(res)]
        assert not errors, f"{kind}/{res['metadata']['name']}: {errors}"
    hpa = _index(_build(OVERLAY))[("HorizontalPodAutoscaler", "adloop-serve")]
    assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_selectors_services_and_references_match() -> None:
    built = _index(_build(OVERLAY))
    templates = {name: r["spec"]["template"]["metadata"]["labels"]
                 for (kind, name), r in built.items() if kind in WORKLOADS}
    for (kind, name), r in built.items():
        if kind in ("Deployment", "StatefulSet"):
            sel = r["spec"]["selector"]["matchLabels"]
            assert sel.items() <= templates[name].items(), f"{name}: selector misses its pods"
        if kind == "Service":
            assert any(r["spec"]["selector"].items() <= labels.items()
                       for labels in templates.values()), f"Service {name} selects nothing"
        if kind == "StatefulSet":
            assert ("Service", r["spec"]["serviceName"]) in built
        if kind == "HorizontalPodAutoscaler":
            ref = r["spec"]["scaleTargetRef"]
            assert (ref["kind"], ref["name"]) in built
        if kind in WORKLOADS:
            spec = r["spec"]["template"]["spec"]
            refs = [e["configMapRef"]["name"] for c in spec["containers"]
                    for e in c.get("envFrom", []) if "configMapRef" in e]
            refs += [v["configMap"]["name"] for v in spec.get("volumes", []) if "configMap" in v]
            for cm in refs:
                assert ("ConfigMap", cm) in built, f"{name}: ConfigMap {cm} missing"
            claims = {t["metadata"]["name"] for t in r["spec"].get("volumeClaimTemplates", [])}
            volumes = {v["name"] for v in spec.get("volumes", [])} | claims
            for c in spec["containers"]:
                for m in c.get("volumeMounts", []):
                    assert m["name"] in volumes, f"{name}/{c['name']}: volume {m['name']}"


def _flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def test_probes_point_at_paths_the_processes_serve_on_their_ports() -> None:
    served = (ROOT / "streams" / "metrics.py").read_text() + (ROOT / "server" / "api.py") \
        .read_text() + (ROOT / "server" / "app.py").read_text()
    nginx = _index(_build(BASE))[("ConfigMap", "snapshot-store-nginx")]["data"]["default.conf"]
    probed = 0
    for r in _build(OVERLAY):
        if r["kind"] not in ("Deployment", "StatefulSet"):
            continue
        for c in _containers(r):
            assert "readinessProbe" in c and "livenessProbe" in c, c["name"]
            ports = {p["containerPort"] for p in c.get("ports", [])}
            for kind in ("readinessProbe", "livenessProbe"):
                get = c[kind]["httpGet"]
                assert get["port"] in ports, f"{c['name']} {kind} port {get['port']}"
                if _is_adloop(c):
                    assert get["path"] in ("/healthz", "/readyz")
                    assert f'"{get["path"]}"' in served
                    listen = _flag(c["args"], "--port") or _flag(c["args"], "--metrics-port")
                    assert listen is not None and int(listen) == get["port"], c["name"]
                else:
                    assert re.search(rf"location\s+=?\s*{re.escape(get['path'])}\s", nginx)
                    assert f"listen {get['port']};" in nginx
                probed += 1
    assert probed >= 10


def test_containers_run_real_adloop_subcommands_with_flags_they_accept() -> None:
    register_optional()
    commands: dict[str, set[str]] = {}
    for r in _build(OVERLAY):
        if r["kind"] not in WORKLOADS:
            continue
        for c in _containers(r):
            if not _is_adloop(c):
                continue
            args = c["args"]
            assert args[0] in COMMANDS, f"{c['name']}: adloop {args[0]} does not exist"
            flags = {a for a in args[1:] if a.startswith("--")}
            if args[0] != "topics":
                assert "--metrics-host" in flags or "--host" in flags, c["name"]
            commands.setdefault(args[0], set()).update(flags)
    assert {"topics", "join", "stats", "learn", "serve"} <= set(commands)
    for command, flags in commands.items():
        text = _help(command)
        for flag in flags:
            assert re.search(rf"{re.escape(flag)}\b", text), f"adloop {command} has no {flag}"


def test_the_learner_announces_the_snapshot_store_service_the_servers_can_reach() -> None:
    built = _index(_build(BASE))
    learn = built[("StatefulSet", "adloop-learn")]
    learner, store = _containers(learn)
    base_url = _flag(learner["args"], "--snapshot-base-url")
    written = _flag(learner["args"], "--snapshot-store")
    assert base_url is not None and written is not None
    m = re.fullmatch(r"http://([a-z0-9-]+):(\d+)/", base_url)
    assert m is not None, base_url
    svc = built[("Service", m.group(1))]
    assert int(m.group(2)) in {p["port"] for p in svc["spec"]["ports"]}
    assert svc["spec"]["selector"].items() <= learn["spec"]["template"]["metadata"][
        "labels"].items()
    mounts = {m["name"]: m for m in learner["volumeMounts"]}
    served = {m["name"]: m for m in store["volumeMounts"]}
    vol = next(n for n, mt in mounts.items() if mt["mountPath"] == written)
    assert served[vol].get("readOnly") is True
    nginx = built[("ConfigMap", "snapshot-store-nginx")]["data"]["default.conf"]
    assert f"root {served[vol]['mountPath']};" in nginx
    # the time cadence governs (docs/scale.md): the update trigger is out of the way
    assert int(_flag(learner["args"], "--snapshot-every-updates") or 0) >= 10_000


def test_strimzi_topics_cover_the_event_topics_and_the_joiner_changelog_alike() -> None:
    from streams.topics import TOPICS

    topics = {d["metadata"]["name"]: d for d in _docs(K8S / "strimzi" / "topics.yaml")}
    events = {name for name, spec in TOPICS.items() if spec.key == "user id"}
    assert events | {"adloop-joiner-requests-changelog"} == set(topics)
    assert len({d["spec"]["partitions"] for d in topics.values()}) == 1
    kafka = {d["kind"]: d for d in _docs(K8S / "strimzi" / "kafka.yaml")}
    config = _index(_docs(BASE / "config.yaml"))[("ConfigMap", "adloop-config")]
    bootstrap = config["data"]["ADLOOP_BOOTSTRAP_SERVERS"]
    assert bootstrap == f"{kafka['Kafka']['metadata']['name']}-kafka-bootstrap:9092"
    assert json.dumps(kafka["Kafka"]["spec"]["kafka"]["listeners"]).count("9092") == 1
