"""The deployment files are checked, not just written: docker/compose.yaml against
the Compose specification (the schema check-jsonschema ships), the Kubernetes
manifests against the Kubernetes schemas (kubernetes-validate, strict) and KEDA's
resources against the fields KEDA documents; then what the issue asks of them."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from importlib.resources import files
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from helpers.env import REPO

from router.core.portfolio import load_portfolio
from worker.models.backends import validate_portfolio

K8S = REPO / "ops" / "k8s"
K8S_VERSION = "1.30.0"
HEALTHCHECK = "/opt/cascade/healthcheck.py"


def compose() -> dict:
    return yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())


def k8s_docs() -> list[dict]:
    return [d for f in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]


def example_tiers() -> list[str]:
    return [t.name for t in load_portfolio(REPO / "ops" / "portfolio.example.toml").tiers]


def test_compose_file_follows_the_compose_specification():
    schema = json.loads((files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json").read_text())
    jsonschema.validate(compose(), schema)


def test_compose_has_every_role_with_the_settings_that_matter():
    services = compose()["services"]
    redis = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis and "--maxmemory-policy noeviction" in redis and "--requirepass" in redis
    assert services["postgres"]["image"].startswith("postgres:")
    assert services["migrate"]["command"] == ["db", "upgrade"]
    assert services["api"]["command"][0] == "serve"
    assert services["flower"]["command"][0] == "flower"
    assert "CASCADE_FLOWER_BASIC_AUTH" in services["flower"]["environment"]
    assert "prometheus" in services
    grace = services["tier-small"]["stop_grace_period"]
    for tier in example_tiers():
        s = services[f"tier-{tier}"]
        assert s["command"] == ["worker", "--tier", tier]
        assert s["restart"] in ("always", "unless-stopped", "on-failure")
        # the image's check, which for a worker is GET /healthz on its metrics port (the canary;
        # tests/container/ runs it against live workers)
        assert s["stop_grace_period"] == grace and s["healthcheck"]["test"] == ["CMD", "python", HEALTHCHECK]
        assert s["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
        assert ":@redis:6379" not in s["environment"]["CASCADE_BROKER_URL"]  # the password is in the URL
    assert services["migrate"]["healthcheck"] == {"disable": True}  # a one-shot job
    assert all(s["environment"]["CASCADE_REMOTE_CONTROL"] == "flower" for s in services.values()
               if s.get("image", "").startswith("cascade-router:"))  # Flower lists the workers
    prom = yaml.safe_load((REPO / "ops" / "prometheus.yml").read_text())
    assert set(prom["scrape_configs"][0]["dns_sd_configs"][0]["names"]) == {f"tier-{t}" for t in example_tiers()}
    assert "/healthz" in (REPO / "docker" / "healthcheck.py").read_text()


def test_the_image_name_and_tag_are_decided_in_one_place_and_used_everywhere():
    """`make image` (docker/build.sh) tags cascade-router:<the project's version>; every
    Kubernetes container and every compose service of the project runs exactly that."""
    image = subprocess.run(["bash", str(REPO / "docker" / "build.sh"), "--print-image"], capture_output=True,
                           text=True, check=True).stdout.strip()
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert image == f"cascade-router:{version}"
    used = [c["image"] for d in k8s_docs() if d["kind"] in ("Deployment", "Job")
            for c in d["spec"]["template"]["spec"]["containers"]]
    assert len(used) >= 6 and set(used) == {image}
    ours = [s for s in compose()["services"].values() if "build" in s]
    assert len(ours) >= 6 and {s["image"] for s in ours} == {image}


def test_the_podman_layer_of_the_compose_file_follows_the_specification_too():
    """docker/compose.podman.yaml (this machine's podman: host network, local images) merged
    over docker/compose.yaml the way compose merges files still follows the specification,
    and moves every port off the machine's own Redis (6379) and PostgreSQL (5432)."""
    class Loader(yaml.SafeLoader):
        pass
    Loader.add_constructor("!reset", lambda loader, node: None)
    over = yaml.load((REPO / "docker" / "compose.podman.yaml").read_text(), Loader=Loader)
    merged = compose()
    for name, svc in over["services"].items():
        base = merged["services"][name]
        for key, value in svc.items():
            if value is None:
                base.pop(key, None)
            elif isinstance(value, dict) and isinstance(base.get(key), dict):
                base[key] = {**base[key], **value}
            else:
                base[key] = value
    schema = json.loads((files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json").read_text())
    jsonschema.validate(merged, schema)
    text = yaml.safe_dump(merged["services"])
    assert ":6379" not in text and ":5432" not in text and "@redis:" not in text and "@postgres:" not in text
    assert all(s["network_mode"] == "host" for s in merged["services"].values())


def test_kubernetes_manifests_follow_the_kubernetes_schemas():
    checked = 0
    for doc in k8s_docs():
        if doc["apiVersion"].startswith("keda.sh/"):
            continue
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        checked += 1
    assert checked >= 8


# The fields of KEDA's ScaledObject and TriggerAuthentication these manifests use, as
# KEDA documents them (keda.sh/docs/2.x/reference/scaledobject-spec); unknown ones refused.
_META = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"},
         "labels": {"type": "object"}, "annotations": {"type": "object"}}, "additionalProperties": False}
KEDA = {
    "ScaledObject": {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "keda.sh/v1alpha1"}, "kind": {"const": "ScaledObject"}, "metadata": _META,
            "spec": {"type": "object", "required": ["scaleTargetRef", "triggers"], "additionalProperties": False,
                     "properties": {
                         "scaleTargetRef": {"type": "object", "required": ["name"], "additionalProperties": False,
                                            "properties": {"name": {"type": "string"}, "kind": {"type": "string"},
                                                           "apiVersion": {"type": "string"}}},
                         "pollingInterval": {"type": "integer", "minimum": 1},
                         "cooldownPeriod": {"type": "integer", "minimum": 0},
                         "minReplicaCount": {"type": "integer", "minimum": 0},
                         "maxReplicaCount": {"type": "integer", "minimum": 1},
                         "triggers": {"type": "array", "minItems": 1, "items": {
                             "type": "object", "required": ["type", "metadata"], "additionalProperties": False,
                             "properties": {
                                 "type": {"type": "string"}, "name": {"type": "string"},
                                 "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                                 "authenticationRef": {"type": "object", "required": ["name"],
                                                       "properties": {"name": {"type": "string"}}}}}}}}}},
    "TriggerAuthentication": {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "keda.sh/v1alpha1"}, "kind": {"const": "TriggerAuthentication"}, "metadata": _META,
            "spec": {"type": "object", "properties": {"secretTargetRef": {"type": "array", "items": {
                "type": "object", "required": ["parameter", "name", "key"], "additionalProperties": False,
                "properties": {"parameter": {"type": "string"}, "name": {"type": "string"},
                               "key": {"type": "string"}}}}}}}},
}


def test_keda_resources_follow_keda_fields():
    docs = [d for d in k8s_docs() if d["apiVersion"].startswith("keda.sh/")]
    assert {d["kind"] for d in docs} == set(KEDA)
    for doc in docs:
        jsonschema.validate(doc, KEDA[doc["kind"]])


def test_one_scaled_deployment_per_tier_with_grace_above_the_longest_stage(tmp_path):
    docs = k8s_docs()
    by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    settings = by[("ConfigMap", "cascade-settings")]["data"]
    portfolio_file = tmp_path / "portfolio.toml"
    portfolio_file.write_text(by[("ConfigMap", "cascade-portfolio")]["data"]["portfolio.toml"])
    portfolio = load_portfolio(portfolio_file)
    validate_portfolio(portfolio)  # the backends' options are right
    secrets = by[("Secret", "cascade-secrets")]["stringData"]
    auths = {d["metadata"]["name"]: d for d in docs if d["kind"] == "TriggerAuthentication"}
    tier_deployments = [d for d in docs if d["kind"] == "Deployment" and "cascade-router/tier" in d["metadata"]["labels"]]
    assert sorted(d["metadata"]["labels"]["cascade-router/tier"] for d in tier_deployments) == \
        sorted(t.name for t in portfolio.tiers)
    for tier in portfolio.tiers:
        dep = by[("Deployment", f"cascade-tier-{tier.name}")]
        pod = dep["spec"]["template"]["spec"]
        (worker,) = pod["containers"]
        assert worker["args"] == ["worker", "--tier", tier.name]
        longest = int(dep["metadata"]["annotations"]["cascade-router/longest-stage-seconds"])
        assert pod["terminationGracePeriodSeconds"] > longest
        assert int(settings["CASCADE_VISIBILITY_TIMEOUT"]) > longest
        assert float(settings["CASCADE_CANARY_MAX_AGE"]) > longest
        assert worker["livenessProbe"]["httpGet"]["path"] == "/healthz"
        port = {p["name"]: p["containerPort"] for p in worker["ports"]}[worker["livenessProbe"]["httpGet"]["port"]]
        assert port == int(settings["CASCADE_METRICS_PORT"])
        so = by[("ScaledObject", f"cascade-tier-{tier.name}")]["spec"]
        assert so["scaleTargetRef"]["name"] == dep["metadata"]["name"]
        (trigger,) = so["triggers"]
        assert trigger["type"] == "redis" and trigger["metadata"]["listName"] == tier.queue_name
        assert int(trigger["metadata"]["listLength"]) >= 1 and so["minReplicaCount"] >= 1
        for ref in auths[trigger["authenticationRef"]["name"]]["spec"]["secretTargetRef"]:
            assert ref["key"] in secrets


@pytest.mark.parametrize("broken", ["terminationGracePeriodSeconds: 360", "listName: cascade.medium"])
def test_the_checks_catch_a_broken_manifest(tmp_path, monkeypatch, broken):
    """A grace period below the longest stage, or a ScaledObject watching another tier's
    list, fails the checks above (they are not vacuous)."""
    copy = tmp_path / "k8s"
    copy.mkdir()
    for f in K8S.glob("*.yaml"):
        text = f.read_text()
        if f.name == "tiers.yaml":
            fixed = {"terminationGracePeriodSeconds: 360": "terminationGracePeriodSeconds: 60",
                     "listName: cascade.medium": "listName: cascade.large"}[broken]
            text = text.replace(broken, fixed, 1)
        (copy / f.name).write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "K8S", copy)
    with pytest.raises(AssertionError):
        test_one_scaled_deployment_per_tier_with_grace_above_the_longest_stage(tmp_path)


def test_every_deployment_file_the_docs_name_exists():
    for md in [REPO / "README.md", *Path(REPO / "docs").glob("*.md")]:
        for path in re.findall(r"`((?:ops|docker)/[\w./-]+\.(?:ya?ml|json|toml|sh|md))`", md.read_text()):
            assert (REPO / path).exists(), f"{md.name} names {path}, which does not exist"
