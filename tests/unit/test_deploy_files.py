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


def _compose_mounts(service: dict[str, Any]) -> dict[str, str]:
    """Mount path -> source (a volume's name or a host path) of a compose service."""
    return {m.split(":")[1]: m.split(":")[0] for m in service.get("volumes", [])}


def _mounted_at(path: str, mounts: dict[str, str]) -> str | None:
    """The source of the mount (mount path -> source) that holds ``path``, if any."""
    found = [t for t in mounts if path == t or path.startswith(t.rstrip("/") + "/")]
    return mounts[max(found, key=len)] if found else None


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


PRIVATE, PUBLIC = "update.key", "update.pub"  # what `stream-rnn models keygen` writes
SIGNING = {"retrain", "publish", "promote", "rollback"}  # commands that announce model updates


def _role(argv: list[str]) -> str | None:
    """ "worker" (verifies model updates), "publisher" (signs them) or None."""
    name = _command(argv)[0].name
    return "worker" if name == "worker" else "publisher" if name in SIGNING else None


def _assert_key_mode(where: str, name: str, mode: str | None) -> None:
    """load_update_key's rule: a private key is 0600-ish, a public key not writable by others."""
    assert mode, f"{where}: install it with an explicit -m"
    forbidden = 0o077 if name == PRIVATE else 0o022
    assert not int(mode, 8) & forbidden, f"{where}: mode {mode} (load_update_key refuses it)"


def _script(argv: list[str]) -> str:
    """The shell script of ``sh -c SCRIPT``, else the command line itself."""
    if argv[:1] in (["sh"], ["bash"]) and "-c" in argv:
        return argv[argv.index("-c") + 1]
    return shlex.join(argv)


def _install_steps(script: str) -> list[dict[str, str | None]]:
    """The ``install [-m MODE] [-o OWNER] [-g GROUP] SOURCE TARGET`` steps of a script."""
    steps = []
    for segment in re.split(r"&&|;|\n", script):
        words = shlex.split(segment)
        if words[:1] != ["install"]:
            continue
        flags, paths, i = {}, [], 1
        while i < len(words):
            if words[i] in ("-m", "-o", "-g"):
                flags[words[i]], i = words[i + 1], i + 2
            else:
                paths, i = [*paths, words[i]], i + 1
        assert len(paths) == 2, f"`{segment.strip()}`: install SOURCE TARGET"
        steps.append({"mode": flags.get("-m"), "owner": flags.get("-o"),
                      "group": flags.get("-g"), "source": paths[0], "target": paths[1]})  # fmt: skip
    return steps


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


def test_compose_workers_share_group_and_registry() -> None:
    by_service = {w.split(":")[1]: _options(a, strict=False) for w, a in _compose_invocations()}
    workers = [by_service[n] for n in ("worker-1", "worker-2")]
    assert workers[0]["--group"] == workers[1]["--group"]
    assert workers[0]["--partitions"] == workers[1]["--partitions"]
    for name, options in by_service.items():
        mounts = _compose_mounts(_services()[name])
        if "--registry" in options:
            assert mounts.get(options["--registry"][0]) == "registry", f"compose {name}"


def test_compose_workers_get_only_the_public_key_and_publishers_the_private_key() -> None:
    """The Ed25519 split: a compromised worker can verify model updates but never sign them."""
    compose, services = _compose(), _services()
    installer = services["update-key"]
    mounts = _compose_mounts(installer)
    holds: dict[str, set[str]] = {}  # volume -> the key files installed into it
    steps = _install_steps(
        _script(_argv(installer.get("entrypoint")) + _argv(installer["command"]))
    )
    for step in steps:
        name, secret = Path(step["target"]).name, Path(step["source"]).name
        volume = _mounted_at(step["target"], mounts)
        assert volume in (compose.get("volumes") or {}), f"update-key: {step['target']}: volume?"
        assert step["source"] == f"/run/secrets/{secret}", step
        assert secret in installer.get("secrets", []), f"update-key: secret {secret}?"
        assert Path(compose["secrets"][secret]["file"]).name == name, f"secret {secret}: {name}?"
        _assert_key_mode(f"compose update-key: {name}", name, step["mode"])
        if name == PRIVATE:  # load_update_key: a private key is owned by its reader
            assert (step["owner"], step["group"]) == (str(_uid()), str(_uid())), step
        holds.setdefault(volume, set()).add(name)
    private = {v for v, names in holds.items() if PRIVATE in names}
    public = {v for v, names in holds.items() if PUBLIC in names}
    assert private and public and not private & public, f"update-key installs {holds}"
    roles: dict[str, set[str]] = {"worker": set(), "publisher": set()}
    for where, argv in _compose_invocations():
        name, role = where.split(":")[1], _role(argv)
        if role is None:
            continue
        env = services[name].get("environment") or {}
        if isinstance(env, list):
            env = dict(item.partition("=")[::2] for item in env)
        key = (_options(argv, strict=False).get("--update-key-file") or [""])[0]
        key = key or str(env.get("STREAM_RNN_UPDATE_KEY_FILE", ""))
        volume = _mounted_at(key, _compose_mounts(services[name]))
        wanted, volumes = (PUBLIC, public) if role == "worker" else (PRIVATE, private)
        assert Path(key).name == wanted, f"compose {name}: a {role} reads {key!r}, not {wanted}"
        assert volume in volumes, f"compose {name}: {key} is not on a volume holding {wanted}"
        roles[role].add(name)
    assert {"worker-1", "worker-2"} <= roles["worker"], roles
    assert {"seed", "retrain"} <= roles["publisher"], roles
    secrets_dir = (DEPLOY / "secrets").resolve()
    for name in roles["worker"]:
        service = services[name]
        sources = set(_compose_mounts(service).values())
        assert not sources & private, f"compose {name}: a worker mounts the private key"
        taken = {compose["secrets"][s]["file"] for s in service.get("secrets", [])}
        assert not {f for f in taken if Path(f).name == PRIVATE}, f"compose {name}: {taken}"
        for source in (s for s in sources if s.startswith((".", "/"))):
            where = (DEPLOY / source).resolve()
            assert not where.is_relative_to(secrets_dir), f"compose {name} mounts {source}"
    signers = {n for n, s in services.items() if set(_compose_mounts(s).values()) & private}
    assert signers <= {"update-key"} | roles["publisher"], f"the private key reaches {signers}"


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


@pytest.mark.parametrize("folder", ["secrets", "k8s/secrets"])
def test_the_key_folders_stay_git_ignored(folder: str) -> None:
    """`stream-rnn models keygen --out deploy/secrets` (or deploy/k8s/secrets) writes there."""
    ignore = (DEPLOY / folder / ".gitignore").read_text().split()
    assert "*" in ignore, f"deploy/{folder}/.gitignore must ignore everything (keys live there)"


def test_keys_come_only_from_the_git_ignored_folders() -> None:
    folders = {(DEPLOY / "secrets").resolve(), (K8S / "secrets").resolve()}
    files = [(DEPLOY / s["file"]).resolve() for s in _compose()["secrets"].values()]
    files += [
        (K8S / (entry.partition("=")[2] if "=" in entry else entry)).resolve()
        for generator in _yaml(K8S / "kustomization.yaml").get("secretGenerator", [])
        for entry in generator.get("files", [])
    ]
    assert {PRIVATE, PUBLIC} <= {f.name for f in files}, files
    for path in files:
        assert path.parent in folders, f"{path}: keep keys in deploy/secrets or deploy/k8s/secrets"


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


def test_k8s_registry_paths_are_mounted_and_retrain_runs_once() -> None:
    configmap = next(o for o in _k8s_objects() if o["kind"] == "ConfigMap")["data"]
    registry = configmap["STREAM_RNN_REGISTRY"]
    for where, spec in _pods():
        claims = {v["name"] for v in spec["volumes"] if "persistentVolumeClaim" in v}
        for container in spec["containers"]:
            mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
            # a model-update announcement names the version's directory: same path in every pod
            assert {mounts[c] for c in claims} == {registry}, where
    for where, argv in _k8s_invocations():
        options = _options(argv, strict=False)
        assert options.get("--registry", [registry]) == [registry], where
        if _command(argv)[0].name == "retrain":
            assert "--every" not in options, f"{where}: the CronJob is the schedule"


def _k8s_secret_files() -> dict[str, set[str]]:
    """Secret name -> its file names, from the kustomization's secretGenerators."""
    kustomization = _yaml(K8S / "kustomization.yaml")
    return {
        g["name"]: {e.partition("=")[0] if "=" in e else Path(e).name for e in g.get("files", [])}
        for g in kustomization.get("secretGenerator", [])
    }


def _pod_keys(spec: dict[str, Any]) -> tuple[dict[str, set[str]], dict[str, str]]:
    """(volume -> the key files it holds, key path -> the mode its init container gave it).

    Secret volumes hold their Secret's files; an emptyDir holds what an init container
    ``install``s into it from a mounted Secret (tracked by the source file, whatever the copy
    is called).
    """
    secrets = _k8s_secret_files()
    holds: dict[str, set[str]] = {}
    for volume in spec["volumes"]:
        named = [volume["secret"]["secretName"]] if "secret" in volume else []
        for source in volume.get("projected", {}).get("sources", []):
            named += [source["secret"]["name"]] if "secret" in source else []
        for secret in named:
            holds.setdefault(volume["name"], set()).update(secrets.get(secret, set()))
    modes: dict[str, str] = {}
    for container in spec.get("initContainers", []):
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        argv = [*_argv(container.get("command")), *_argv(container.get("args"))]
        for step in _install_steps(_script(argv)):
            source = _mounted_at(step["source"], mounts)
            content = holds.get(source or "", set()) & {Path(step["source"]).name}
            target = _mounted_at(step["target"], mounts)
            assert target, f"{container['name']}: {step['target']} is on no volume"
            holds.setdefault(target, set()).update(content)
            modes[step["target"]] = step["mode"]
    return holds, modes


def test_k8s_workers_get_only_the_public_key_and_the_publisher_the_private_key() -> None:
    """The Ed25519 split: a compromised worker pod can verify model updates, never sign them."""
    configmap = next(o for o in _k8s_objects() if o["kind"] == "ConfigMap")["data"]
    default = configmap["STREAM_RNN_UPDATE_KEY_FILE"]
    assert Path(default).name == PUBLIC, f"ConfigMap: the workers' key is {PUBLIC}, not {default}"
    secrets = _k8s_secret_files()
    assert {PRIVATE} in secrets.values() and {PUBLIC} in secrets.values(), secrets
    invocations = _k8s_invocations()
    roles: dict[str, set[str]] = {"worker": set(), "publisher": set()}
    for where, spec in _pods():
        holds, modes = _pod_keys(spec)
        pod_roles = set()
        for container in spec["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            for _, argv in (i for i in invocations if i[0] == f"k8s:{where}:{container['name']}"):
                role = _role(argv)
                if role is None:
                    continue
                key = (_options(argv, strict=False).get("--update-key-file") or [default])[0]
                wanted = PUBLIC if role == "worker" else PRIVATE
                assert Path(key).name == wanted, f"{where}: a {role} reads {key}, not {wanted}"
                volume = _mounted_at(key, mounts)
                assert wanted in holds.get(volume or "", set()), f"{where}: {key} is no {wanted}"
                # Secret volumes are symlinks (..data/...), which load_update_key refuses
                assert key in modes, f"{where}: {key} is not copied by an init container"
                _assert_key_mode(f"{where}: {key}", wanted, modes[key])
                pod_roles.add(role)
                roles[role].add(where)
        if "worker" not in pod_roles:
            continue
        leaked = sorted(v for v, files in holds.items() if PRIVATE in files)
        assert not leaked, f"{where}: a worker pod holds {PRIVATE} in {leaked}"
        for container in _containers(spec):
            refs = [
                r["secretRef"]["name"] for r in container.get("envFrom", []) if "secretRef" in r
            ]
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                assert not ref or ref["key"] != PRIVATE, f"{where}: env {env['name']}"
            assert not any(PRIVATE in secrets.get(r, set()) for r in refs), f"{where}: {refs}"
    assert roles["worker"] and roles["publisher"], roles
