"""deploy/kubernetes/ holds together: every manifest validates offline against Kubernetes'
own schemas (kubernetes-validate, strict: no unknown fields), and the pieces agree with each
other and with the service (probes, grace periods, settings, labels, the migration Job)."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from flask import Flask
from ruamel.yaml import YAML

from taskapp.config import Settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.37.0"
# gunicorn.conf.py: graceful_timeout = DRAIN_SECONDS + SHUTDOWN_GRACE_SECONDS + this.
HAND_BACK_SECONDS = 10


def documents() -> dict[str, dict[str, Any]]:
    """Every manifest in deploy/kubernetes/, by kind."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(DEPLOY.glob("*.yaml")):
        for document in YAML(typ="safe").load_all(path.read_text()):
            assert document["kind"] not in found, f"two {document['kind']}s"
            found[document["kind"]] = document
    return found


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict[str, Any]]:
    return documents()


def pod_spec(manifests: dict[str, Any], kind: str) -> dict[str, Any]:
    return manifests[kind]["spec"]["template"]["spec"]


def container(manifests: dict[str, Any], kind: str) -> dict[str, Any]:
    (only,) = pod_spec(manifests, kind)["containers"]
    return only


def environment(manifests: dict[str, Any]) -> dict[str, str]:
    """What a pod's environment holds: the ConfigMap's and the Secret's keys."""
    return {**manifests["ConfigMap"]["data"], **manifests["Secret"]["stringData"]}


@pytest.mark.parametrize(
    "kind", ["ConfigMap", "Secret", "Service", "Deployment", "PodDisruptionBudget", "Job"]
)
def test_each_manifest_validates_offline_and_strictly(manifests, kind: str) -> None:
    kubernetes_validate.validate(manifests[kind], KUBERNETES_VERSION, strict=True)


def test_the_validation_catches_a_misspelt_field(manifests) -> None:
    broken = copy.deepcopy(manifests["Deployment"])
    probe = broken["spec"]["template"]["spec"]["containers"][0].pop("livenessProbe")
    broken["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = probe
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_the_kustomization_lists_every_manifest_but_the_job() -> None:
    # One level up, so that it may generate nginx's ConfigMap from deploy/nginx.conf.
    kustomization = YAML(typ="safe").load((DEPLOY.parent / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    on_disk = {f"kubernetes/{p.name}" for p in DEPLOY.glob("*.yaml")}
    assert not (DEPLOY / "kustomization.yaml").exists(), "two kustomizations"
    # The Job runs before the rollout, on its own (migrate-job.yaml says how).
    assert listed == on_disk - {"kubernetes/migrate-job.yaml"}


def test_the_probes_are_the_services_own(manifests, app: Flask) -> None:
    taskapp = container(manifests, "Deployment")
    (port,) = taskapp["ports"]
    assert taskapp["livenessProbe"]["httpGet"] == {"path": "/livez", "port": port["name"]}
    assert taskapp["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port["name"]}
    assert taskapp["startupProbe"]["httpGet"]["path"] == "/livez"
    assert port["containerPort"] == 8000  # the image's PORT
    client = app.test_client()
    assert client.get("/livez").status_code == 200
    assert client.get("/readyz").status_code == 200


def test_the_termination_grace_outlasts_the_instances_stop(manifests) -> None:
    settings = Settings.from_env(environment(manifests))
    assert settings.drain_seconds > 0, "without a drain the Service keeps sending requests"
    stop = settings.drain_seconds + settings.shutdown_grace_seconds + HAND_BACK_SECONDS
    grace = pod_spec(manifests, "Deployment")["terminationGracePeriodSeconds"]
    assert grace > stop
    gunicorn_conf = (ROOT / "gunicorn.conf.py").read_text()
    assert f"shutdown_grace_seconds) + {HAND_BACK_SECONDS}" in gunicorn_conf


def test_config_comes_from_the_configmap_and_the_secret(manifests) -> None:
    env = environment(manifests)
    settings = Settings.from_env(env)  # every value parses
    assert settings.auto_migrate is False
    assert env["WEB_CONCURRENCY"] == "1"  # a probe answers for the one instance of its pod
    # Credentials only in the Secret; every variable is one the README documents.
    assert {"DATABASE_URL", "LISTEN_DATABASE_URL", "API_KEYS"} <= set(
        manifests["Secret"]["stringData"]
    )
    assert not {"DATABASE_URL", "LISTEN_DATABASE_URL", "API_KEYS"} & set(
        manifests["ConfigMap"]["data"]
    )
    documented = set(re.findall(r"^\| `([A-Z_]+)`", (ROOT / "README.md").read_text(), re.M))
    assert set(env) <= documented, set(env) - documented
    for kind in ("Deployment", "Job"):
        sources = container(manifests, kind)["envFrom"]
        assert {"configMapRef": {"name": manifests["ConfigMap"]["metadata"]["name"]}} in sources
        assert {"secretRef": {"name": manifests["Secret"]["metadata"]["name"]}} in sources


def test_the_migration_job_runs_the_upgrade_with_the_pods_image(manifests) -> None:
    job = container(manifests, "Job")
    assert job["command"] == ["flask", "--app", "wsgi", "db", "upgrade"]
    assert job["image"] == container(manifests, "Deployment")["image"]
    assert pod_spec(manifests, "Job")["restartPolicy"] in {"OnFailure", "Never"}


def test_the_selectors_find_the_pods(manifests) -> None:
    labels = manifests["Deployment"]["spec"]["template"]["metadata"]["labels"]
    selectors = {
        "Deployment": manifests["Deployment"]["spec"]["selector"]["matchLabels"],
        "PodDisruptionBudget": manifests["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
        "Service": manifests["Service"]["spec"]["selector"],
    }
    for kind, selector in selectors.items():
        assert selector.items() <= labels.items(), kind
    budget = manifests["PodDisruptionBudget"]["spec"]
    assert budget.get("maxUnavailable", 0) < manifests["Deployment"]["spec"]["replicas"]
    rollout = manifests["Deployment"]["spec"]["strategy"]["rollingUpdate"]
    assert rollout["maxUnavailable"] == 0  # a new pod is ready before an old one goes
