"""compose.yaml validates and wires the stack the way the docs say (no engine needed)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def _compose_config(profiles: str) -> dict:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail("docker-compose is installed by scripts/bootstrap; it is missing")
    env = dict(os.environ, COMPOSE_PROFILES=profiles)
    res = subprocess.run([exe, "-f", str(ROOT / "compose.yaml"), "config"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return yaml.safe_load(res.stdout)


def test_compose_file_validates_for_single_and_cluster_profiles() -> None:
    for profiles in ("single", "cluster", "single,traffic"):
        cfg = _compose_config(profiles)
        assert {"topics", "join", "learn", "serve-1", "serve-2", "prometheus", "grafana"} <= set(
            cfg["services"])


def test_compose_puts_the_official_haproxy_image_in_front_of_the_serving_replicas() -> None:
    cfg = _compose_config("single,traffic")["services"]
    lb = cfg["lb"]
    assert lb["image"].split(":")[0] == "haproxy"
    assert {"serve-1", "serve-2"} <= set(lb["depends_on"])
    # short ("src:target:ro") or long ({source, target}) syntax, as the compose version writes
    mounts = [v.split(":")[:2] if isinstance(v, str) else [v["source"], v["target"]]
              for v in lb["volumes"]]
    source = next(src for src, target in mounts if target.endswith("/haproxy.cfg"))
    haproxy_cfg = (ROOT / source).read_text()
    for name in ("serve-1", "serve-2"):
        assert f"server {name} {name}:8000" in haproxy_cfg
    assert "uri /readyz" in haproxy_cfg
    assert "lb:8080" in " ".join(cfg["replay"]["command"])


def test_compose_runs_the_same_kafka_release_as_the_embedded_broker() -> None:
    pom = (ROOT / "deploy" / "kafka" / "pom.xml").read_text()
    version = re.search(r"<kafka.version>([^<]+)</kafka.version>", pom).group(1)  # type: ignore[union-attr]
    cfg = yaml.safe_load((ROOT / "compose.yaml").read_text())
    kafka_images = {s["image"] for name, s in cfg["services"].items() if name.startswith("kafka")}
    assert kafka_images == {f"apache/kafka:{version}"}
    voters = cfg["services"]["kafka-3"]["environment"]["KAFKA_CONTROLLER_QUORUM_VOTERS"]
    assert voters.count("@") == 3
    assert cfg["services"]["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"


def test_compose_mounts_exist_and_secrets_are_not_committed() -> None:
    cfg = yaml.safe_load((ROOT / "compose.yaml").read_text())
    for svc in cfg["services"].values():
        for vol in svc.get("volumes", []):
            src = vol.split(":", 1)[0]
            if src.startswith("./"):
                assert (ROOT / src).exists(), src
        build = svc.get("build")
        if build:
            assert (ROOT / build["dockerfile"]).exists()
        for key, value in (svc.get("environment") or {}).items():
            if any(word in key for word in ("TOKEN", "PASSWORD", "SECRET")):
                assert str(value).startswith("${"), f"{key} must come from the environment"


def test_the_sasl_override_wires_every_client_and_takes_the_password_from_the_env() -> None:
    exe = shutil.which("docker-compose")
    assert exe is not None
    files = ["-f", str(ROOT / "compose.yaml"), "-f", str(ROOT / "deploy" / "compose.sasl.yaml")]
    env = dict(os.environ, COMPOSE_PROFILES="single,traffic")
    secrets = {"ADLOOP_SASL_PASSWORD": "from-the-env",
               "ADLOOP_LEARNER_SASL_PASSWORD": "learner-from-the-env",
               "ADLOOP_KAFKA_ADMIN_PASSWORD": "admin-from-the-env"}
    for name in secrets:
        env.pop(name, None)
    for missing in secrets:   # no default secret: each one must come from the environment
        res = subprocess.run([exe, *files, "config"], cwd=ROOT, capture_output=True,
                             text=True, timeout=60,
                             env={**env, **{k: v for k, v in secrets.items() if k != missing}})
        assert res.returncode != 0 and missing in res.stderr, missing
    res = subprocess.run([exe, *files, "config"], cwd=ROOT, capture_output=True, text=True,
                         env={**env, **secrets}, timeout=60)
    assert res.returncode == 0, res.stderr
    cfg = yaml.safe_load(res.stdout)
    for name in ("topics", "join", "learn", "serve-1", "serve-2", "replay"):
        e = cfg["services"][name]["environment"]
        assert e["ADLOOP_SECURITY_PROTOCOL"] == "SASL_PLAINTEXT", name
        assert e["ADLOOP_BOOTSTRAP_SERVERS"] == "kafka:9094", name
        assert e["ADLOOP_SASL_PASSWORD"] == ("learner-from-the-env" if name == "learn"
                                             else "from-the-env"), name
    assert cfg["services"]["serve-1"]["environment"]["ADLOOP_SERVER_ID"] == "serve-1"
    kafka = cfg["services"]["kafka"]["environment"]
    jaas = kafka["KAFKA_LISTENER_NAME_SASL__PLAINTEXT_PLAIN_SASL_JAAS_CONFIG"]
    assert 'user_adloop="from-the-env"' in jaas
    assert 'user_adloop-learner="learner-from-the-env"' in jaas
    assert 'user_admin="admin-from-the-env"' in jaas
    for text in secrets.values():
        assert text not in (ROOT / "deploy" / "compose.sasl.yaml").read_text()


def test_the_sasl_override_lets_only_the_learner_write_model_updates() -> None:
    exe = shutil.which("docker-compose")
    assert exe is not None
    files = ["-f", str(ROOT / "compose.yaml"), "-f", str(ROOT / "deploy" / "compose.sasl.yaml")]
    env = dict(os.environ, COMPOSE_PROFILES="single", ADLOOP_SASL_PASSWORD="a",
               ADLOOP_LEARNER_SASL_PASSWORD="b", ADLOOP_KAFKA_ADMIN_PASSWORD="c")
    res = subprocess.run([exe, *files, "config"], cwd=ROOT, capture_output=True, text=True,
                         env=env, timeout=60)
    assert res.returncode == 0, res.stderr
    services = yaml.safe_load(res.stdout)["services"]
    kafka = services["kafka"]["environment"]
    assert kafka["KAFKA_AUTHORIZER_CLASS_NAME"].endswith("StandardAuthorizer")
    # no client can reach a listener that skips SASL (ANONYMOUS is a super user there)
    assert "User:ANONYMOUS" in kafka["KAFKA_SUPER_USERS"]
    plain = [x for x in kafka["KAFKA_LISTENERS"].split(",") if not x.startswith("SASL")]
    assert plain and all("//127.0.0.1:" in x for x in plain), plain
    script = "\n".join(services["acls"]["command"])
    assert ("--allow-principal User:adloop-learner --operation Write --operation Describe "
            "--topic model-updates") in script
    assert "--operation Read --operation Describe --topic model-updates" in script
    assert "--operation Write" not in script.replace(
        "User:adloop-learner --operation Write", "")
    assert services["learn"]["environment"]["ADLOOP_SASL_USERNAME"] == "adloop-learner"
    for name in ("learn", "serve-1", "serve-2"):
        assert "acls" in services[name]["depends_on"], name


def test_compose_generates_one_signing_keyring_mounted_by_the_learner_and_servers_only() -> None:
    services = _compose_config("single,traffic")["services"]
    assert services["update-keys"]["command"] == ["update-keys", "init"]

    def keyring_mount(svc: dict) -> list[str]:
        return [v if isinstance(v, str) else f"{v['source']}:{v['target']}"
                for v in svc.get("volumes", []) if "update-keys" in str(v)]

    path = services["learn"]["environment"]["ADLOOP_UPDATE_KEYS_FILE"]
    for name in ("learn", "serve-1", "serve-2"):
        (mount,) = keyring_mount(services[name])
        assert path.startswith(mount.split(":")[1]), (name, mount)
        assert "update-keys" in services[name]["depends_on"], name
    for name in ("topics", "join", "stats", "replay"):
        assert not keyring_mount(services[name]), name
