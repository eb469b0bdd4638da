"""The deployment files (deploy/docker, deploy/compose.yaml, deploy/k8s) against the code.

Nothing here needs Docker or a cluster: the files are parsed and checked for what breaks a
deployment silently. Every YAML parses; every file they reference exists (and the build
context keeps what the Dockerfile copies); every ``stream-rnn`` command line names a real
command with real flags and valid values (checked on the click command itself); every
``STREAM_RNN_*`` variable is a setting and its value validates; ports agree between the
commands, container ports, healthchecks, probes, Services and Prometheus' targets; Kubernetes
objects are well formed (selectors match their templates, probes name declared ports, mounts
name volumes). ``docker-compose config`` validates the compose file where it is installed
(deploy/bootstrap.sh installs it; under CI its absence fails the test).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from stream_rnn import __version__
from stream_rnn.ops.cli import cli
from stream_rnn.ops.settings import Settings
from stream_rnn.ops.settings_doc import env_names

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
K8S = DEPLOY / "k8s"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
IMAGE = f"stream-rnn:{__version__}"  # the tag follows the package version
PORT_FLAGS = ("--web-port", "--metrics-port")


# ------------------------------------------------------------------------------ loading
def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _compose() -> dict[str, Any]:
    return _yaml(COMPOSE)


def _services() -> dict[str, dict[str, Any]]:
    return _compose()["services"]


def _k8s_objects() -> list[dict[str, Any]]:
    kustomization = _yaml(K8S / "kustomization.yaml")
    docs = []
    for resource in kustomization["resources"]:
        docs += [d for d in yaml.safe_load_all((K8S / resource).read_text()) if d]
    return docs


def _pods() -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, pod spec) of every workload."""
    for obj in _k8s_objects():
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] in ("StatefulSet", "Deployment", "Job"):
            yield where, obj["spec"]["template"]["spec"]
        elif obj["kind"] == "CronJob":
            yield where, obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def _containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if pending.strip():
            keyword, _, rest = pending.strip().partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    return instructions


# ------------------------------------------------------------------ stream-rnn commands
def _argv(value: Any) -> list[str]:
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def _invocations(argv: list[str]) -> list[list[str]]:
    """The ``stream-rnn`` command lines in an entrypoint + command (shell scripts included)."""
    if argv[:1] in (["sh"], ["bash"]) and "-c" in argv:
        script = argv[argv.index("-c") + 1].replace("\\\n", " ")
        found = []
        for line in script.splitlines():
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            segment: list[str] = []
            for token in [*lexer, ";"]:
                if token and set(token) <= set(";&|()"):
                    words = segment[1:] if segment[:1] == ["exec"] else segment
                    if words[:1] == ["stream-rnn"]:
                        found.append(words)
                    segment = []
                else:
                    segment.append(token)
        return found
    return [argv] if argv[:1] == ["stream-rnn"] else []


def _compose_invocations() -> list[tuple[str, list[str]]]:
    found = []
    for name, service in _services().items():
        ours = "build" in service or str(service.get("image", "")).startswith("stream-rnn")
        entrypoint = _argv(service.get("entrypoint")) or (["stream-rnn"] if ours else [])
        for argv in _invocations(entrypoint + _argv(service.get("command"))):
            found.append((f"compose:{name}", argv))
    return found


def _k8s_invocations() -> list[tuple[str, list[str]]]:
    found = []
    for where, spec in _pods():
        for container in _containers(spec):
            ours = container["image"].split(":")[0].endswith("stream-rnn")
            entrypoint = container.get("command") or (["stream-rnn"] if ours else [])
            for argv in _invocations([*entrypoint, *_argv(container.get("args"))]):
                found.append((f"k8s:{where}:{container['name']}", argv))
    return found


def _dockerfile_invocations() -> list[tuple[str, list[str]]]:
    parts = {k: json.loads(v) for k, v in _dockerfile() if k in ("ENTRYPOINT", "CMD")}
    return [("Dockerfile", argv) for argv in _invocations(parts["ENTRYPOINT"] + parts["CMD"])]


def _all_invocations() -> list[tuple[str, list[str]]]:
    found = []
    for source in (_compose_invocations, _k8s_invocations, _dockerfile_invocations):
        try:
            found += source()
        except Exception:  # noqa: S112 - test_every_yaml_parses reports the broken file
            continue
    return found


def _command(argv: list[str]) -> tuple[click.Command, list[str]]:
    """The click command ``argv`` runs and the arguments left for it."""
    command: click.Command = cli
    rest = argv[1:]
    while isinstance(command, click.Group) and rest and not rest[0].startswith("-"):
        assert rest[0] in command.commands, (
            f"`{shlex.join(argv)}`: {rest[0]!r} is not a command of `{command.name}` "
            f"(known: {', '.join(sorted(command.commands))})"
        )
        command, rest = command.commands[rest[0]], rest[1:]
    return command, rest


def _options(argv: list[str], *, strict: bool = True) -> dict[str, list[str]]:
    """Every option of ``argv`` with its values, each converted by the option's click type.

    ``strict=False`` (the port and path checks) reads an unknown option as taking one value
    instead of failing: the flag test reports it, the other checks still run.
    """
    command, rest = _command(argv)
    by_flag = {opt: p for p in command.params for opt in [*p.opts, *p.secondary_opts]}
    used: dict[str, list[str]] = {}
    i = 0
    while i < len(rest):
        flag, _, inline = rest[i].partition("=")
        i += 1
        if not flag.startswith("-") or flag in ("--help", "-h"):
            continue  # an argument
        param = by_flag.get(flag)
        if isinstance(param, click.Option):
            takes = 0 if param.is_flag else max(param.nargs, 1)
        else:
            assert not strict, (
                f"`{shlex.join(argv)}`: {flag} is not an option of `stream-rnn {command.name}` "
                f"(it has {', '.join(sorted(o for o in by_flag if o.startswith('--')))})"
            )
            takes = 0 if i >= len(rest) or rest[i].startswith("--") else 1  # a guess
        values = [inline] if inline else rest[i : i + takes]
        i += 0 if inline else takes
        # paths are not checked: they exist in the container only
        if isinstance(param, click.Option) and not isinstance(param.type, click.Path):
            for value in values:
                try:
                    param.type.convert(value, param, None)
                except click.BadParameter as err:
                    pytest.fail(f"`{shlex.join(argv)}`: {flag} {value!r}: {err.message}")
        used[flag] = values
    return used


def _params() -> list[Any]:
    params = []
    for where, argv in _all_invocations():
        words = [w for w in argv[1:3] if not w.startswith("-")]
        params.append(pytest.param(where, argv, id=f"{where}:{' '.join(words) or 'stream-rnn'}"))
    return params


@pytest.mark.parametrize(("where", "argv"), _params())
def test_every_stream_rnn_flag_exists_with_a_valid_value(where: str, argv: list[str]) -> None:
    _options(argv)  # asserts


def test_the_deployments_run_workers_and_the_retraining_job() -> None:
    commands = {(w.split(":")[0], _command(a)[0].name) for w, a in _all_invocations()}
    for kind in ("compose", "k8s"):
        assert {(kind, "worker"), (kind, "retrain")} <= commands, commands


# ----------------------------------------------------------------------------- settings
def _assert_settings(env: dict[str, Any], where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    ours = {k: str(v) for k, v in env.items() if k.startswith("STREAM_RNN_")}
    unknown = sorted(set(ours) - set(env_names()))
    assert not unknown, f"{where}: {unknown} are no setting (see `stream-rnn settings`)"
    with monkeypatch.context() as patch:
        for name in env_names():
            patch.delenv(name, raising=False)
        for name, value in ours.items():
            patch.setenv(name, value)
        try:
            Settings()
        except ValueError as err:
            pytest.fail(f"{where}: a STREAM_RNN_* value is invalid: {err}")


def test_every_stream_rnn_variable_is_a_valid_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, service in _services().items():
        env = service.get("environment") or {}
        if isinstance(env, list):
            env = dict(item.partition("=")[::2] for item in env)
        _assert_settings(env, f"compose service {name}", monkeypatch)
    for obj in _k8s_objects():
        if obj["kind"] == "ConfigMap":
            _assert_settings(obj["data"], f"ConfigMap/{obj['metadata']['name']}", monkeypatch)
    for where, spec in _pods():
        for container in _containers(spec):
            env = {e["name"]: e.get("value", "") for e in container.get("env", [])}
            _assert_settings(env, f"{where}:{container['name']}", monkeypatch)
    dockerfile_env = " ".join(v for k, v in _dockerfile() if k == "ENV")
    env = dict(re.findall(r"(STREAM_RNN_\w+)=(\S+)", dockerfile_env))
    _assert_settings(env, "Dockerfile ENV", monkeypatch)


# ------------------------------------------------------------------------------- files
def test_every_yaml_parses() -> None:
    files = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])
    assert {COMPOSE, K8S / "kustomization.yaml"} <= set(files)
    for path in files:
        try:
            list(yaml.safe_load_all(path.read_text()))
        except yaml.YAMLError as err:
            pytest.fail(f"{path.relative_to(ROOT)} is not valid YAML: {err}")


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        body = pattern.lstrip("!").strip("/")
        variants = [body, body[3:]] if body.startswith("**/") else [body]
        if any(fnmatch.fnmatchcase(p, v) for p in prefixes for v in variants):
            ignored = not negated
    return ignored


def test_the_dockerfile_builds_one_non_root_image_from_files_the_context_keeps() -> None:
    steps = _dockerfile()
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for keyword, rest in steps:
        if keyword not in ("COPY", "ADD") or "--from=" in rest:
            continue
        *sources, _target = shlex.split(rest)
        for source in (s for s in sources if not s.startswith("--")):
            where = ROOT / source
            assert where.exists(), f"Dockerfile {keyword} {source}: no such file in the repo"
            files = [where] if where.is_file() else list(where.rglob("*"))
            for file in (f for f in files if f.is_file() and "__pycache__" not in f.parts):
                relative = file.relative_to(ROOT).as_posix()
                assert not _dockerignored(relative, patterns), f".dockerignore drops {relative}"
    text = "\n".join(f"{k} {v}" for k, v in steps)
    assert re.search(r"^FROM python:\S*slim", text, re.M), "base image: a python slim one"
    assert "ARG TORCH_VARIANT=cpu" in text
    assert "--index-url https://download.pytorch.org/whl/cpu" in text and "cuda)" in text
    users = [v for k, v in steps if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root"), "the image must not run as root"
    assert json.loads(dict(steps)["ENTRYPOINT"]) == ["stream-rnn"]
    build_args = [s.get("build", {}).get("args", {}) for s in _services().values()]
    assert {a["TORCH_VARIANT"] for a in build_args if "TORCH_VARIANT" in a} <= {"cpu", "cuda"}


def _uid() -> int:
    return int(re.findall(r"--uid (\d+)", "\n".join(v for k, v in _dockerfile() if k == "RUN"))[0])


def test_compose_references_exist() -> None:
    compose, services = _compose(), _services()
    for name, service in services.items():
        if "build" in service:
            context = (DEPLOY / service["build"]["context"]).resolve()
            dockerfile = context / service["build"].get("dockerfile", "Dockerfile")
            assert dockerfile == DOCKERFILE, f"compose {name}: builds {dockerfile}"
            assert service["image"] == IMAGE, f"compose {name}: tag the image {IMAGE}"
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith((".", "/")):
                assert (DEPLOY / source).exists(), f"compose {name}: {source} does not exist"
            else:
                assert source in (compose.get("volumes") or {}), f"compose {name}: volume {source}?"
        for secret in service.get("secrets", []):
            assert secret in compose["secrets"], f"compose {name}: secret {secret} undeclared"
        for other, condition in (service.get("depends_on") or {}).items():
            assert other in services, f"compose {name} depends on {other}: no such service"
            if condition["condition"] == "service_healthy":
                assert "healthcheck" in services[other], f"compose: {other} has no healthcheck"
    for secret in compose["secrets"].values():
        # the key is made by hand and must never be committed
        path = (DEPLOY / secret["file"]).resolve()
        assert "*" in (path.parent / ".gitignore").read_text().split(), path.parent
    assert f"-o {_uid()} -g {_uid()}" in json.dumps(services["update-key"]["command"])


def _metrics_and_web(argv: list[str]) -> dict[str, int]:
    options = _options(argv, strict=False)
    return {flag: int(options[flag][0]) for flag in PORT_FLAGS if flag in options}


def _prometheus_targets() -> set[str]:
    if not PROMETHEUS.exists():
        pytest.skip(f"{PROMETHEUS.relative_to(ROOT)} is not written yet")
    config = _yaml(PROMETHEUS)
    return {
        target
        for job in config.get("scrape_configs", [])
        for static in job.get("static_configs", [])
        for target in static.get("targets", [])
    }


def test_compose_ports_agree_with_commands_healthchecks_and_prometheus() -> None:
    services, targets = _services(), _prometheus_targets()
    listening: dict[str, int] = {}
    for where, argv in _compose_invocations():
        name = where.split(":")[1]
        ports = _metrics_and_web(argv)
        exposed = {int(p) for p in services[name].get("expose", [])}
        assert set(ports.values()) <= exposed, f"compose {name}: expose {sorted(ports.values())}"
        check = json.dumps(services[name].get("healthcheck", {}).get("test", []))
        for port in map(int, re.findall(r"(?:127\.0\.0\.1|localhost):(\d+)", check)):
            assert port in ports.values(), f"compose {name}: healthcheck on {port}, not {ports}"
        if "--metrics-port" in ports:
            listening[name] = ports["--metrics-port"]
            assert f"{name}:{ports['--metrics-port']}" in targets, f"Prometheus misses {name}"
    assert {"worker-1", "worker-2", "retrain"} <= set(listening), listening
    for target in targets:
        host, _, scraped = target.rpartition(":")
        if host in listening:
            assert int(scraped) == listening[host], f"Prometheus scrapes {target}: {listening}"


def test_compose_workers_share_group_registry_and_key() -> None:
    by_service = {w.split(":")[1]: _options(a, strict=False) for w, a in _compose_invocations()}
    workers = [by_service[n] for n in ("worker-1", "worker-2")]
    assert workers[0]["--group"] == workers[1]["--group"]
    assert workers[0]["--partitions"] == workers[1]["--partitions"]
    for name, options in by_service.items():
        mounts = {m.split(":")[1]: m.split(":")[0] for m in _services()[name].get("volumes", [])}
        if "--registry" in options:
            assert mounts.get(options["--registry"][0]) == "registry", f"compose {name}"
        if "--update-key-file" in options:
            assert str(Path(options["--update-key-file"][0]).parent) in mounts, f"compose {name}"


def test_compose_mounts_what_prometheus_and_grafana_read() -> None:
    services = _services()
    prometheus = services["prometheus"]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in prometheus["volumes"]}
    flags = dict(a.partition("=")[::2] for a in prometheus["command"])
    config = flags["--config.file"]
    assert mounts[config] == "./prometheus/prometheus.yml"
    if PROMETHEUS.exists():
        for rules in _yaml(PROMETHEUS).get("rule_files", []):
            inside = str(Path(config).parent / rules)
            assert inside in mounts, f"prometheus.yml reads {rules}: mount it at {inside}"
            assert (DEPLOY / mounts[inside]).exists()
    grafana = {m.split(":")[1]: m.split(":")[0] for m in services["grafana"]["volumes"]}
    provisioning = DEPLOY / grafana["/etc/grafana/provisioning"]
    for path in sorted(provisioning.glob("datasources/*.y*ml")):
        for source in _yaml(path).get("datasources", []):
            url = re.fullmatch(r"https?://([^:/]+):(\d+)/?", source["url"])
            assert url, f"{path.name}: {source['url']}: give the host and the port"
            host, port = url.groups()
            assert host in services, f"{path.name}: {host} is no compose service"
            published = [p.split(":")[-1] for p in services[host].get("ports", [])]
            assert port in published, f"{path.name}: {source['url']} is not {host}'s port"
    for path in sorted(provisioning.glob("dashboards/*.y*ml")):
        for provider in _yaml(path).get("providers", []):
            assert provider["options"]["path"].startswith(tuple(grafana)), provider


@pytest.mark.skipif(os.name != "posix", reason="docker-compose is a POSIX tool here")
def test_docker_compose_accepts_the_compose_file() -> None:
    tool = shutil.which("docker-compose")
    if tool is None:
        if os.environ.get("CI"):
            pytest.fail("docker-compose is missing: deploy/bootstrap.sh installs it")
        pytest.skip("docker-compose is not installed (deploy/bootstrap.sh installs it)")
    done = subprocess.run(
        [tool, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr


# ------------------------------------------------------------------------------ k8s
def test_kustomization_lists_every_manifest() -> None:
    kustomization = _yaml(K8S / "kustomization.yaml")
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == manifests
    for generator in kustomization.get("secretGenerator", []):
        for entry in generator["files"]:
            path = K8S / entry.partition("=")[2]
            assert "*" in (path.parent / ".gitignore").read_text().split(), path.parent


def test_k8s_objects_are_well_formed() -> None:
    objects = _k8s_objects()
    api = {"ConfigMap": "v1", "Service": "v1", "PersistentVolumeClaim": "v1",
           "StatefulSet": "apps/v1", "CronJob": "batch/v1"}  # fmt: skip
    names: dict[str, set[str]] = {}
    for obj in objects:
        assert obj["apiVersion"] == api.get(obj["kind"]), f"{obj['kind']}: {obj['apiVersion']}"
        assert obj["metadata"]["name"] and "namespace" not in obj["metadata"]
        names.setdefault(obj["kind"], set()).add(obj["metadata"]["name"])
    kustomization = _yaml(K8S / "kustomization.yaml")
    names["Secret"] = {g["name"] for g in kustomization.get("secretGenerator", [])}
    for where, spec in _pods():
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec["securityContext"]["runAsUser"] == _uid(), f"{where}: the image's uid"
        volumes = {v["name"]: v for v in spec["volumes"]}
        for volume in volumes.values():
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                assert claim in names["PersistentVolumeClaim"], f"{where}: no PVC {claim}"
            if "secret" in volume:
                assert volume["secret"]["secretName"] in names["Secret"], where
        for container in _containers(spec):
            assert container["image"] == IMAGE, f"{where}: {container['image']}"
            assert "requests" in container["resources"], f"{where}: resource requests"
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{where}: no volume {mount['name']}"
            for ref in container.get("envFrom", []):
                assert ref["configMapRef"]["name"] in names["ConfigMap"], where
            ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if probe in container:
                    port = container[probe]["httpGet"]["port"]
                    assert port in ports or port in ports.values(), f"{where} {probe}: {port}"
    for obj in objects:
        if obj["kind"] == "StatefulSet":
            labels = obj["spec"]["template"]["metadata"]["labels"]
            assert obj["spec"]["selector"]["matchLabels"].items() <= labels.items()
            services = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Service"}
            headless = services[obj["spec"]["serviceName"]]["spec"]
            assert headless["clusterIP"] == "None", "a StatefulSet's service is headless"


def test_k8s_ports_agree_with_commands_probes_services_and_partitions() -> None:
    objects = _k8s_objects()
    workers = [(w, a) for w, a in _k8s_invocations() if _command(a)[0].name == "worker"]
    assert len(workers) == 1, workers
    where, argv = workers[0]
    options = _options(argv, strict=False)
    statefulset = next(o for o in objects if o["kind"] == "StatefulSet")
    template = statefulset["spec"]["template"]
    container = next(c for c in template["spec"]["containers"] if c["name"] == where.split(":")[-1])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    wanted = {"web": int(options["--web-port"][0]), "metrics": int(options["--metrics-port"][0])}
    assert ports == wanted, f"{where}: container ports {ports}, the command listens on {wanted}"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/", "port": "web"}, probe
    for service in (o for o in objects if o["kind"] == "Service"):
        name, labels = service["metadata"]["name"], template["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items(), f"{name} selects no worker"
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, f"{name}: targetPort {port['targetPort']!r}?"
            assert ports[port["targetPort"]] == port["port"], f"{name}: port {port['port']}"
        annotated = service["metadata"].get("annotations", {}).get("prometheus.io/port")
        assert annotated in (None, str(ports["metrics"])), service["metadata"]["name"]
    # replicas beyond the partitions would idle: the manifests size them to the topic
    partitions = int(options["--partitions"][0])
    replicas = statefulset["spec"]["replicas"]
    assert replicas <= partitions, f"{replicas} workers for {partitions} partitions: some idle"
    configmap = next(o for o in objects if o["kind"] == "ConfigMap")["data"]
    assert int(configmap["STREAM_RNN_PARTITIONS"]) == partitions, "ConfigMap vs --partitions"


def test_k8s_registry_and_key_paths_are_mounted_and_retrain_runs_once() -> None:
    configmap = next(o for o in _k8s_objects() if o["kind"] == "ConfigMap")["data"]
    registry, key = configmap["STREAM_RNN_REGISTRY"], configmap["STREAM_RNN_UPDATE_KEY_FILE"]
    for where, spec in _pods():
        claims = {v["name"] for v in spec["volumes"] if "persistentVolumeClaim" in v}
        for container in spec["containers"]:
            mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
            # a model-update announcement names the version's directory: same path in every pod
            assert {mounts[c] for c in claims} == {registry}, where
            assert str(Path(key).parent) in mounts.values(), f"{where}: {key} is not mounted"
    for where, argv in _k8s_invocations():
        options = _options(argv, strict=False)
        assert options.get("--registry", [registry]) == [registry], where
        assert options.get("--update-key-file", [key]) == [key], where
        if _command(argv)[0].name == "retrain":
            assert "--every" not in options, f"{where}: the CronJob is the schedule"
