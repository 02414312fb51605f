"""The Docker files and run.sh hold together: valid, consistent with each other and the repo."""

from __future__ import annotations

import fnmatch
import http.server
import json
import os
import re
import shlex
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from taskapp.config import Settings
from tools.run_local import DEFAULT_PORTS, GUNICORN

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
SERVICE_COMMAND = ["gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"]


NGINX_CONF = ROOT / "deploy" / "nginx.conf"
UPSTREAM_INCLUDE = "taskapp-upstream.conf"  # what nginx.conf includes in its upstream


def _proxy_service() -> tuple[str, dict[str, Any]]:
    """The one compose service that runs nginx (from the official image, at a pinned tag)."""
    proxies = [
        (name, spec)
        for name, spec in _compose()["services"].items()
        if str(spec.get("image", "")).startswith("nginx")
    ]
    assert len(proxies) == 1, "no nginx in front of the instances"
    name, spec = proxies[0]
    assert re.fullmatch(r"nginx:\d+\.\d+\.\d+", spec["image"]), "pin the nginx version"
    return name, spec


def _nginx_text() -> str:
    """deploy/nginx.conf without its comments."""
    return re.sub(r"#[^\n]*", "", NGINX_CONF.read_text())


def _nginx_listen_port() -> int:
    (port,) = re.findall(r"^\s*listen\s+(\d+);", _nginx_text(), re.M)
    return int(port)


def _upstream_servers(path: Path) -> set[str]:
    text = re.sub(r"#[^\n]*", "", path.read_text())
    return set(re.findall(r"^\s*server\s+(\S+?)\s*;", text, re.M))


def _nginx_config_argument(command: list[str]) -> str:
    """The file an `nginx -c FILE -g 'daemon off; ...'` command runs."""
    assert command[0] == "nginx", command
    assert "daemon off;" in command[command.index("-g") + 1], "nginx must stay in the foreground"
    return command[command.index("-c") + 1]


def _kubernetes(name: str) -> dict[str, Any]:
    return YAML(typ="safe").load((ROOT / "deploy" / "kubernetes" / name).read_text())


def _compose() -> dict[str, Any]:
    return YAML(typ="safe").load(COMPOSE_FILE.read_text())


def _app_services() -> dict[str, dict[str, Any]]:
    """The services built from our Dockerfile."""
    services = _compose()["services"]
    return {name: spec for name, spec in services.items() if "build" in spec}


def _instructions() -> list[tuple[str, str]]:
    """The Dockerfile as (INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    logical, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.strip().startswith("#") and not current:
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        if current.strip():
            logical.append(current.strip())
        current = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1]) for text in logical]


def _arguments(name: str) -> list[str]:
    return [args for instruction, args in _instructions() if instruction == name]


def _exec_form(args: str) -> list[str]:
    """Parse a JSON-array (exec form) argument list; fail on shell form."""
    value = json.loads(args)
    assert isinstance(value, list), f"not exec form: {args}"
    return value


def _duration_seconds(text: str) -> float:
    """Parse a compose duration such as 30s, 1m30s or 1.5m."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"bad duration {text!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


def _dockerignored(relative: str) -> bool:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    parts = Path(relative).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(
        fnmatch.fnmatch(prefix, pattern.removeprefix("**/"))
        or fnmatch.fnmatch(Path(prefix).name, pattern.removeprefix("**/"))
        for pattern in patterns
        for prefix in prefixes
    )


def test_compose_file_matches_the_compose_spec() -> None:
    check = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec"]
    result = subprocess.run(
        [*check, str(COMPOSE_FILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "version" not in _compose(), "the top-level version key is obsolete"


def test_only_the_proxy_publishes_12000_and_12001_and_the_instances_nothing() -> None:
    for name, spec in _app_services().items():
        # Reachable from outside only through nginx, which holds slow clients for them.
        assert not spec.get("ports"), f"{name} publishes {spec['ports']} around the proxy"
        assert spec.get("network_mode") != "host", name
    name, proxy = _proxy_service()
    published = {}
    for mapping in proxy["ports"]:
        host, container = str(mapping).rsplit(":", 1)
        published[int(host.rsplit(":", 1)[-1])] = int(container)
    # The README's ports (run.sh serves the same two without Docker).
    assert sorted(published) == [12000, 12001] == sorted(DEFAULT_PORTS)
    assert set(published.values()) == {_nginx_listen_port()}, "not the port nginx listens on"
    others = {
        service
        for service, spec in _compose()["services"].items()
        if spec.get("ports") and service not in {name, "db"}
    }
    assert not others, others


def test_the_proxy_runs_deploy_nginx_conf_with_the_compose_services_as_its_upstream() -> None:
    _, proxy = _proxy_service()
    config_path = _nginx_config_argument(proxy["command"])
    mounts = {}
    for volume in proxy["volumes"]:
        source, target, *mode = str(volume).split(":")
        assert mode == ["ro"], volume
        mounts[target] = (ROOT / source).resolve()
    assert mounts[config_path] == NGINX_CONF
    # The upstream file nginx.conf includes, mounted next to it.
    upstream_file = mounts[str(Path(config_path).parent / UPSTREAM_INCLUDE)]
    assert upstream_file == ROOT / "deploy" / "nginx-upstream-compose.conf"
    app_services = _app_services()
    (port,) = _arguments("EXPOSE")
    assert _upstream_servers(upstream_file) == {f"{name}:{port}" for name in app_services}
    for name in app_services:
        assert name in proxy["depends_on"], f"nginx starts before {name} exists"
        assert proxy["depends_on"][name].get("restart") is True, name


def test_nginx_conf_takes_its_instances_from_the_included_upstream_file() -> None:
    text = _nginx_text()
    (upstream,) = re.findall(r"upstream taskapp \{(.*?)\}", text, re.S)
    assert f"include {UPSTREAM_INCLUDE};" in upstream
    assert not re.search(r"^\s*server\s", upstream, re.M), "instances are the include's"
    assert text.count("proxy_pass http://taskapp;") >= 3


def test_the_pods_run_nginx_as_a_sidecar_with_the_config_kustomize_generates() -> None:
    compose_image = _proxy_service()[1]["image"]
    deployment = _kubernetes("deployment.yaml")
    pod = deployment["spec"]["template"]["spec"]
    (proxy,) = [c for c in pod.get("initContainers", []) if c["image"].startswith("nginx:")]
    assert proxy["restartPolicy"] == "Always", "a native sidecar: up while the instance drains"
    assert proxy["image"] == compose_image, "compose and the pods run different nginx"
    assert not [c for c in pod["containers"] if c["image"].startswith("nginx:")]
    # Its configuration: a ConfigMap generated from deploy/nginx.conf and the pod's upstream.
    config_path = _nginx_config_argument(proxy["command"])
    kustomization = YAML(typ="safe").load((ROOT / "deploy" / "kustomization.yaml").read_text())
    (generator,) = kustomization["configMapGenerator"]
    files = dict(
        entry.split("=", 1) if "=" in entry else (Path(entry).name, entry)
        for entry in generator["files"]
    )
    sources = {key: (ROOT / "deploy" / value).resolve() for key, value in files.items()}
    assert sources == {
        Path(config_path).name: NGINX_CONF,
        UPSTREAM_INCLUDE: ROOT / "deploy" / "nginx-upstream-pod.conf",
    }
    volumes = {
        volume["name"]: volume["configMap"]["name"]
        for volume in pod["volumes"]
        if "configMap" in volume
    }
    mounts = {mount["mountPath"]: mount["name"] for mount in proxy["volumeMounts"]}
    assert volumes[mounts[str(Path(config_path).parent)]] == generator["name"]
    # nginx writes its buffers and pid file to volumes: the root filesystem is read-only.
    assert proxy["securityContext"]["readOnlyRootFilesystem"] is True
    assert {"/var/cache/nginx", "/tmp"} <= set(mounts)
    assert "pid /tmp/" in proxy["command"][-1]


def test_the_service_reaches_the_sidecar_and_the_probes_the_instance() -> None:
    pod = _kubernetes("deployment.yaml")["spec"]["template"]["spec"]
    (proxy,) = pod["initContainers"]
    (app,) = pod["containers"]
    (proxy_port,) = proxy["ports"]
    (app_port,) = app["ports"]
    assert proxy_port["containerPort"] == _nginx_listen_port()
    (service_port,) = _kubernetes("service.yaml")["spec"]["ports"]
    assert service_port["targetPort"] == proxy_port["name"], "the Service bypasses the proxy"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert app[probe]["httpGet"]["port"] == app_port["name"], probe
    # The sidecar's upstream is the instance in its own pod, at its port.
    upstream = _upstream_servers(ROOT / "deploy" / "nginx-upstream-pod.conf")
    assert upstream == {f"127.0.0.1:{app_port['containerPort']}"}


def test_app_services_wait_for_a_healthy_database_they_can_reach() -> None:
    compose = _compose()
    db = compose["services"]["db"]
    assert db["image"].startswith("postgres:")
    assert "pg_isready" in " ".join(db["healthcheck"]["test"])
    assert any(str(port).endswith(":5432") for port in db["ports"])
    assert any(str(volume).startswith("pgdata:") for volume in db["volumes"])
    assert "pgdata" in compose["volumes"]
    env = db["environment"]
    expected_url = (
        f"postgresql+psycopg://{env['POSTGRES_USER']}:{env['POSTGRES_PASSWORD']}"
        f"@db:5432/{env['POSTGRES_DB']}"
    )
    for name, spec in _app_services().items():
        assert spec["depends_on"]["db"]["condition"] == "service_healthy", name
        assert spec["environment"]["DATABASE_URL"] == expected_url, name
        assert spec.get("restart") in {"always", "unless-stopped", "on-failure"}, name


def test_app_services_get_longer_than_the_shutdown_grace_to_stop() -> None:
    grace = Settings().shutdown_grace_seconds
    for name, spec in _app_services().items():
        # docker's default is 10 s, which would SIGKILL a task still in its grace period
        assert _duration_seconds(spec["stop_grace_period"]) >= grace + 10, name


def test_dockerfile_runs_the_documented_gunicorn_command() -> None:
    (cmd,) = _arguments("CMD")
    assert _exec_form(cmd) == SERVICE_COMMAND
    assert GUNICORN[-len(SERVICE_COMMAND) :] == SERVICE_COMMAND, "run_local runs another command"
    assert (ROOT / "gunicorn.conf.py").is_file() and (ROOT / "wsgi.py").is_file()
    readme = ROOT / "README.md"
    if readme.exists():
        assert shlex.join(SERVICE_COMMAND) in readme.read_text()


def test_dockerfile_uses_python_311_slim_and_a_non_root_user() -> None:
    (base,) = _arguments("FROM")
    assert base == "python:3.11-slim"
    users = _arguments("USER")
    assert users, "the container would run as root"
    assert users[-1].split(":")[0] not in {"root", "0"}
    kinds = [instruction for instruction, _ in _instructions()]
    assert kinds.index("USER") < kinds.index("CMD")


def test_dockerfile_installs_only_the_runtime_requirements() -> None:
    installs = [args for args in _arguments("RUN") if "pip install" in args]
    assert installs
    for args in installs:
        words = shlex.split(args)
        after = words[words.index("install") + 1 :]
        assert after == ["-r", "requirements.txt"], args
    copied = " ".join(_arguments("COPY"))
    assert "requirements-dev" not in copied and "embedded" not in copied


def test_every_copied_file_exists_and_is_in_the_build_context() -> None:
    sources = []
    for args in _arguments("COPY"):
        words = _exec_form(args) if args.startswith("[") else shlex.split(args)
        sources += [word for word in words if not word.startswith("--")][:-1]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: no such file"
        assert not _dockerignored(source.rstrip("/")), f"COPY {source}: excluded by .dockerignore"
    # What the service needs at run time: its entry points, its package and its migrations.
    needed = {"wsgi.py", "gunicorn.conf.py", "taskapp", "migrations"}
    assert needed <= {source.rstrip("/") for source in sources}


def test_dockerignore_keeps_local_state_and_tests_out_of_the_image() -> None:
    for path in [".git", ".venv", ".pgdata", ".pgdata-test", "tests", "taskapp/__pycache__"]:
        assert _dockerignored(path), path
    assert not _dockerignored("taskapp/models.py")


def test_dockerfile_healthcheck_passes_on_200_from_health_and_fails_otherwise() -> None:
    (healthcheck,) = _arguments("HEALTHCHECK")
    command = _exec_form(healthcheck.split("CMD", 1)[1].strip())
    assert command[0] == "python", "the slim image has no curl or wget"
    answers = {"/health": 200}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(answers.get(self.path, 404))
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        env = {**os.environ, "PORT": str(server.server_address[1])}
        run = [sys.executable, *command[1:]]
        assert subprocess.run(run, env=env, timeout=30).returncode == 0
        answers["/health"] = 503  # the database is away
        assert subprocess.run(run, env=env, timeout=30, capture_output=True).returncode != 0
        server.shutdown()


@pytest.mark.skipif(sys.platform == "win32", reason="bash script")
def test_run_sh_is_an_executable_bash_script_that_ends_in_run_local() -> None:
    script = ROOT / "run.sh"
    assert os.access(script, os.X_OK), "run.sh is not executable"
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    text = script.read_text()
    assert "set -euo pipefail" in text
    assert text.rstrip().endswith('exec .venv/bin/python -m tools.run_local "$@"')
