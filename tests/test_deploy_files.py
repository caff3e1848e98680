"""Static checks of the deployment files: Dockerfiles, deploy/compose.yaml, deploy/k8s/.

No Docker engine, cluster or network: the files are parsed and cross-checked against the repository (paths
that exist, settings that exist, endpoints the API serves). docs/DEPLOYMENT.md lists the external linters.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from fnmatch import fnmatch
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from core.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE_FILE = DEPLOY / "compose.yaml"
K8S = DEPLOY / "k8s"
DOCKERFILES = {"cpu": ROOT / "Dockerfile", "gpu": ROOT / "Dockerfile.gpu"}
STATE_DIR = "/var/lib/equipoise"
KNOWN_SETTINGS = {f"{ENV_PREFIX}{name}".upper() for name in Settings.model_fields} | {f"{ENV_PREFIX}CONFIG"}

# --------------------------------------------------------------------------------------------- helpers


@cache
def _parsed(path: Path) -> tuple[Any, ...]:
    return tuple(yaml.safe_load_all(path.read_text(encoding="utf-8")))


def load_all(path: Path) -> list[Any]:
    """The documents of a YAML file (parsed once per session; callers must not modify them)."""
    return [doc for doc in _parsed(path) if doc is not None]


def compose() -> dict[str, Any]:
    return load_all(COMPOSE_FILE)[0]


def kustomization() -> dict[str, Any]:
    return load_all(K8S / "kustomization.yaml")[0]


def manifest_files() -> list[Path]:
    """Every Kubernetes manifest: all YAML under deploy/k8s except the kustomization and files/ (raw configs)."""
    return sorted(
        path
        for path in K8S.rglob("*.y*ml")
        if path.name != "kustomization.yaml" and (K8S / "files") not in path.parents
    )


def manifests() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in manifest_files() for doc in load_all(path)]


def by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for _, doc in manifests() if doc["kind"] == kind}


def pod_templates() -> Iterator[tuple[str, dict[str, Any]]]:
    for _, doc in manifests():
        if doc["kind"] in {"Deployment", "StatefulSet", "Job", "DaemonSet"}:
            yield f"{doc['kind']}/{doc['metadata']['name']}", doc["spec"]["template"]["spec"]


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return pod.get("initContainers", []) + pod["containers"]


def is_equipoise_image(image: str) -> bool:
    return image.split(":")[0].rsplit("/", 1)[-1] == "equipoise"


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    logical, current = [], ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    result = []
    for line in logical:
        instruction, _, arguments = line.partition(" ")
        result.append((instruction.upper(), arguments.strip()))
    return result


def image_is_pinned(image: str) -> bool:
    """A tag other than `latest` (or a digest); `${...}` interpolation is not a pin."""
    if "${" in image:
        return False
    if "@sha256:" in image:
        return True
    name_and_tag = image.rsplit("/", 1)[-1]
    return ":" in name_and_tag and name_and_tag.split(":", 1)[1] not in {"", "latest"}


def compose_file_path(source: str) -> Path:
    return (COMPOSE_FILE.parent / source).resolve()


def bind_mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of each bind mount written in short syntax ("./src:/dst[:ro]")."""
    mounts = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
            if source.startswith((".", "/", "$")):
                mounts.append((source, target))
        elif volume.get("type") == "bind":
            mounts.append((volume["source"], volume["target"]))
    return mounts


def in_repo_bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """target -> source inside the repository (interpolated sources, e.g. the corpora, are outside it)."""
    return {target: compose_file_path(source) for source, target in bind_mounts(service) if "${" not in source}


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def all_yaml_files() -> list[Path]:
    return sorted(DEPLOY.rglob("*.y*ml"))


# --------------------------------------------------------------------------------------------- YAML


@pytest.mark.parametrize("path", all_yaml_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_deploy_yaml_file_parses(path: Path) -> None:
    assert load_all(path), f"{path} is empty"


# --------------------------------------------------------------------------------------------- Dockerfiles


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_dockerfile_runs_the_service_as_a_non_root_user_with_a_health_check(flavour: str) -> None:
    instructions = dockerfile_instructions(DOCKERFILES[flavour])
    final_stage = instructions[max(i for i, (name, _) in enumerate(instructions) if name == "FROM") :]
    users = [arguments for name, arguments in final_stage if name == "USER"]
    assert users, "the final stage sets no USER"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}, users[-1]

    healthchecks = [arguments for name, arguments in final_stage if name == "HEALTHCHECK"]
    assert len(healthchecks) == 1 and "/healthz" in healthchecks[0] and "/readyz" not in healthchecks[0]

    cmds = [arguments for name, arguments in final_stage if name == "CMD"]
    assert cmds and json.loads(cmds[-1]) == ["equipoise", "serve"]

    env = " ".join(arguments for name, arguments in final_stage if name == "ENV")
    assert f"EQUIPOISE_STATE_DIR={STATE_DIR}" in env
    assert "EQUIPOISE_HOST=0.0.0.0" in env
    volumes = [json.loads(arguments) for name, arguments in final_stage if name == "VOLUME"]
    assert [STATE_DIR] in volumes


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_dockerfile_base_images_are_pinned(flavour: str) -> None:
    instructions = dockerfile_instructions(DOCKERFILES[flavour])
    bases = [arguments.split()[0] for name, arguments in instructions if name == "FROM"]
    assert bases
    for base in bases:
        assert image_is_pinned(base), base


def _torch_then_project(flavour: str) -> tuple[str, str, dict[str, str]]:
    """The RUN that installs torch, the RUN that installs the dependencies with the extras, and the ARGs."""
    instructions = dockerfile_instructions(DOCKERFILES[flavour])
    args = {}
    for name, arguments in instructions:
        if name == "ARG" and "=" in arguments:
            key, value = arguments.split("=", 1)
            args[key] = value
    runs = [arguments for name, arguments in instructions if name == "RUN" and "pip install" in arguments]
    torch_step = next(i for i, run in enumerate(runs) if "torch==" in run)
    dependencies_step = next(i for i, run in enumerate(runs) if "optional-dependencies" in run)
    project_step = next(i for i, run in enumerate(runs) if "pip install --no-deps ." in run)
    assert torch_step < dependencies_step < project_step, "torch, then the dependencies, then the project"
    return runs[torch_step], runs[dependencies_step], args


def test_cpu_image_installs_cpu_torch_first_and_the_cpu_extra() -> None:
    torch_run, project_run, args = _torch_then_project("cpu")
    assert "--index-url" in torch_run and args["TORCH_INDEX_URL"].endswith("/whl/cpu")
    assert args["TORCH_VERSION"] == _pinned_torch()
    assert args["EXTRAS"].split(",")[0] == "cpu" and "gpu" not in args["EXTRAS"].split(",")
    assert "EXTRAS" in project_run


def test_gpu_image_uses_a_cuda_runtime_base_cuda_torch_and_the_gpu_extra() -> None:
    bases = [a.split()[0] for n, a in dockerfile_instructions(DOCKERFILES["gpu"]) if n == "FROM"]
    assert all(re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+", base) for base in bases), bases
    torch_run, project_run, args = _torch_then_project("gpu")
    assert "--index-url" in torch_run and re.search(r"/whl/cu\d+$", args["TORCH_INDEX_URL"])
    assert args["TORCH_VERSION"] == _pinned_torch()
    assert args["EXTRAS"].split(",")[0] == "gpu" and "cpu" not in args["EXTRAS"].split(",")
    assert "EXTRAS" in project_run
    # The CUDA major of the base image and of the torch wheel index agree.
    cuda_major = re.search(r"nvidia/cuda:(\d+)\.", bases[0]).group(1)
    assert re.search(r"/whl/cu(\d+)$", args["TORCH_INDEX_URL"]).group(1).startswith(cuda_major)


def _pinned_torch() -> str:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(dep.split("==")[1] for dep in dependencies if dep.startswith("torch=="))


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_dockerfile_installs_the_whole_project_and_ships_only_the_environment(flavour: str) -> None:
    """The build stage copies the tree, so every package pyproject.toml names is installed (no list to keep in
    step); the runtime stage receives only the virtual environment."""
    instructions = dockerfile_instructions(DOCKERFILES[flavour])
    stages = [i for i, (name, _) in enumerate(instructions) if name == "FROM"]
    assert len(stages) == 2, "expected a build stage and a runtime stage"
    build, runtime = instructions[stages[0] : stages[1]], instructions[stages[1] :]
    build_copies = [shlex.split(arguments) for name, arguments in build if name == "COPY"]
    assert ["pyproject.toml", "./"] in build_copies and [".", "./"] in build_copies
    assert build_copies.index(["pyproject.toml", "./"]) < build_copies.index([".", "./"])
    assert any(name == "RUN" and "pip install --no-deps ." in arguments for name, arguments in build)
    runtime_copies = [shlex.split(arguments) for name, arguments in runtime if name == "COPY"]
    assert runtime_copies == [["--from=build", "/opt/venv", "/opt/venv"]]
    ignored = {line.strip().strip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".venv", ".git", "state"} <= ignored


# --------------------------------------------------------------------------------------------- compose


def test_compose_has_the_services_with_their_commands() -> None:
    services = compose()["services"]
    assert {"api", "worker", "postgres", "prometheus", "grafana"} <= set(services)
    assert services["api"]["command"] == ["equipoise", "serve"]
    assert services["worker"]["command"] == ["equipoise", "worker"]
    assert services["worker"]["healthcheck"] == {"disable": True}
    for name in ("api", "worker"):
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_compose_builds_from_dockerfiles_in_the_repository() -> None:
    for name, service in compose()["services"].items():
        if "build" in service:
            context = compose_file_path(service["build"]["context"])
            assert context == ROOT, name
            assert (context / service["build"].get("dockerfile", "Dockerfile")).is_file(), name


def test_compose_images_are_pinned_by_tag() -> None:
    for name, service in compose()["services"].items():
        assert image_is_pinned(service["image"]), f"{name}: {service['image']}"


def test_compose_bind_mounts_point_at_files_in_the_repository() -> None:
    for name, service in compose()["services"].items():
        for target, source in in_repo_bind_mounts(service).items():
            assert source.exists(), f"{name}: {source} (mounted at {target}) does not exist"
            assert ROOT in source.parents, f"{name}: {source} is outside the repository"


def test_compose_postgres_is_15_with_a_health_check_and_a_volume() -> None:
    postgres = compose()["services"]["postgres"]
    assert re.fullmatch(r"postgres:15(\.\d+)?(-[a-z0-9.]+)?", postgres["image"])
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    assert any(v.endswith(":/var/lib/postgresql/data") for v in postgres["volumes"])
    assert postgres["volumes"][0].split(":")[0] in compose()["volumes"]


def test_compose_equipoise_environment_is_known_settings_and_uses_postgres() -> None:
    services = compose()["services"]
    for name in ("api", "worker", "worker-gpu"):
        env = environment(services[name])
        unknown = {key for key in env if key.startswith(ENV_PREFIX)} - KNOWN_SETTINGS
        assert not unknown, f"{name}: unknown settings {unknown} would stop the program"
        assert env["EQUIPOISE_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert "@postgres:5432/" in env["EQUIPOISE_DATABASE_URL"]
        assert env["EQUIPOISE_STATE_DIR"] == STATE_DIR
        assert any(target == STATE_DIR for _, target in _named_volumes(services[name]))


def _named_volumes(service: dict[str, Any]) -> list[tuple[str, str]]:
    return [tuple(v.split(":")[:2]) for v in service.get("volumes", []) if isinstance(v, str) and v[0].isalnum()]


def test_compose_api_binds_beyond_loopback_so_keys_are_required() -> None:
    env = environment(compose()["services"]["api"])
    assert env["EQUIPOISE_HOST"] == "0.0.0.0"
    assert env.get("EQUIPOISE_AUTH_ENABLED", "true") == "true"


def test_compose_prometheus_mounts_its_config_and_rules_and_can_reach_the_api() -> None:
    services = compose()["services"]
    mounts = in_repo_bind_mounts(services["prometheus"])
    config_dir = mounts["/etc/prometheus"]
    assert (config_dir / "prometheus.yml").is_file() and (config_dir / "rules.yml").is_file()
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    config = yaml.safe_load((config_dir / "prometheus.yml").read_text())
    assert config["rule_files"] == ["rules.yml"]
    api_names = {"api", *services["api"]["networks"]["default"]["aliases"]}
    for job in config["scrape_configs"]:
        for static in job["static_configs"]:
            for target in static["targets"]:
                host, port = target.rsplit(":", 1)
                assert host in api_names and port == "8000", target


def test_compose_grafana_provisioning_mounts_exist_and_fit_together() -> None:
    services = compose()["services"]
    mounts = in_repo_bind_mounts(services["grafana"])
    datasources = [source for target, source in mounts.items() if "/provisioning/datasources/" in target]
    providers = [source for target, source in mounts.items() if "/provisioning/dashboards/" in target]
    assert len(datasources) == 1 and len(providers) == 1
    for source in datasources + providers:
        assert source.is_file()
    # The data source URL names the Prometheus service.
    for datasource in yaml.safe_load(datasources[0].read_text())["datasources"]:
        assert re.fullmatch(r"http://prometheus:9090/?", datasource["url"])
    assert "prometheus" in services
    # The dashboard provider reads the folder the dashboards are mounted at.
    for provider in yaml.safe_load(providers[0].read_text())["providers"]:
        dashboards = mounts[provider["options"]["path"]]
        assert dashboards.is_dir() and list(dashboards.glob("*.json"))
        for dashboard in dashboards.glob("*.json"):
            json.loads(dashboard.read_text())


# --------------------------------------------------------------------------------------------- Kubernetes


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_every_k8s_manifest_has_api_version_kind_and_name(path: Path) -> None:
    documents = load_all(path)
    assert documents
    for doc in documents:
        assert isinstance(doc.get("apiVersion"), str) and doc["apiVersion"], path
        assert isinstance(doc.get("kind"), str) and doc["kind"], path
        assert isinstance(doc.get("metadata", {}).get("name"), str) and doc["metadata"]["name"], path


def test_kustomization_lists_every_manifest_and_its_generated_files_exist() -> None:
    config = kustomization()
    listed = {(K8S / resource).resolve() for resource in config["resources"]}
    for path in listed:
        assert path.is_file(), path
    # Everything but the one-off jobs is applied.
    expected = {path.resolve() for path in manifest_files() if (K8S / "jobs") not in path.parents}
    assert listed == expected
    for generator in config["configMapGenerator"]:
        for entry in generator["files"]:
            source = (K8S / entry.split("=", 1)[-1]).resolve()
            assert source.is_file(), f"{generator['name']}: {source}"
    assert config["namespace"] == "equipoise"
    assert by_kind("Namespace")["equipoise"]


def test_k8s_images_are_pinned_by_tag() -> None:
    for name, pod in pod_templates():
        for container in containers(pod):
            assert image_is_pinned(container["image"]), f"{name}: {container['image']}"
    for image in kustomization().get("images", []):
        assert image.get("newTag") not in (None, "", "latest"), image


def test_k8s_pods_run_as_non_root_under_the_restricted_profile() -> None:
    for name, pod in pod_templates():
        security = pod.get("securityContext", {})
        assert security.get("runAsNonRoot") is True, f"{name}: runAsNonRoot"
        assert security.get("runAsUser", 0) != 0, f"{name}: runAsUser"
        assert security.get("seccompProfile", {}).get("type") == "RuntimeDefault", name
        for container in containers(pod):
            context = container.get("securityContext", {})
            assert context.get("allowPrivilegeEscalation") is False, f"{name}/{container['name']}"
            assert context.get("capabilities", {}).get("drop") == ["ALL"], f"{name}/{container['name']}"
            assert context.get("runAsUser", 1) != 0 and context.get("privileged") is not True


def test_k8s_containers_declare_resources() -> None:
    for name, pod in pod_templates():
        for container in containers(pod):
            resources = container.get("resources", {})
            assert {"cpu", "memory"} <= set(resources.get("requests", {})), f"{name}/{container['name']}"
            assert "memory" in resources.get("limits", {}), f"{name}/{container['name']}"


def test_k8s_api_probes_health_and_readiness() -> None:
    api = by_kind("Deployment")["equipoise-api"]["spec"]["template"]["spec"]["containers"][0]
    assert api["command"] == ["equipoise", "serve"]
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert api.get("startupProbe", {}).get("httpGet", {}).get("path", "/healthz") == "/healthz"
    ports = {port["name"]: port["containerPort"] for port in api["ports"]}
    for probe in ("readinessProbe", "livenessProbe"):
        port = api[probe]["httpGet"]["port"]
        assert ports.get(port, port) == 8000


def test_k8s_worker_runs_the_worker_command() -> None:
    worker = by_kind("Deployment")["equipoise-worker"]["spec"]["template"]["spec"]["containers"][0]
    assert worker["command"] == ["equipoise", "worker"]
    assert is_equipoise_image(worker["image"])


def test_k8s_equipoise_pods_get_only_known_settings() -> None:
    """Service links would inject EQUIPOISE_SERVICE_HOST & co. (for the Service `equipoise`), which the
    settings reject; every EQUIPOISE_* variable given must be a known setting."""
    config_maps = by_kind("ConfigMap")
    secrets = by_kind("Secret")
    for name, pod in pod_templates():
        for container in containers(pod):
            if not is_equipoise_image(container["image"]):
                continue
            assert pod.get("enableServiceLinks") is False, f"{name}: enableServiceLinks must be false"
            keys = {env["name"] for env in container.get("env", [])}
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    keys |= set(config_maps[source["configMapRef"]["name"]]["data"])
                if "secretRef" in source:
                    keys |= set(secrets[source["secretRef"]["name"]]["stringData"])
            unknown = {key for key in keys if key.startswith(ENV_PREFIX)} - KNOWN_SETTINGS
            assert not unknown, f"{name}: unknown settings {unknown}"
            assert "EQUIPOISE_DATABASE_URL" in keys, name


def test_k8s_secret_references_resolve() -> None:
    secrets = by_kind("Secret")
    for name, pod in pod_templates():
        for container in containers(pod):
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secrets[ref["name"]]["stringData"], f"{name}: {ref}"


def test_k8s_registry_and_state_volumes_are_claimed() -> None:
    claims = by_kind("PersistentVolumeClaim")
    for name, pod in pod_templates():
        for volume in pod.get("volumes", []):
            claim = volume.get("persistentVolumeClaim")
            if claim:
                assert claim["claimName"] in claims, f"{name}: {claim['claimName']}"
    api, worker = (
        by_kind("Deployment")[name]["spec"]["template"]["spec"] for name in ("equipoise-api", "equipoise-worker")
    )
    settings = by_kind("ConfigMap")["equipoise-config"]["data"]
    for pod in (api, worker):
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        registry = volumes[mounts[settings["EQUIPOISE_REGISTRY_DIR"]]]
        assert registry["persistentVolumeClaim"]["claimName"] == "equipoise-registry"
        assert settings["EQUIPOISE_STATE_DIR"] in mounts
    assert "ReadWriteMany" in claims["equipoise-registry"]["spec"]["accessModes"]


def test_k8s_postgres_is_a_statefulset_of_postgres_15() -> None:
    postgres = by_kind("StatefulSet")["postgres"]
    container = postgres["spec"]["template"]["spec"]["containers"][0]
    assert container["image"].startswith("postgres:15")
    assert postgres["spec"]["volumeClaimTemplates"]
    assert "postgres" in by_kind("Service")
    url = by_kind("Secret")["equipoise-database"]["stringData"]["EQUIPOISE_DATABASE_URL"]
    assert url.startswith("postgresql+psycopg://") and "@postgres:5432/" in url


def test_k8s_prometheus_scrapes_every_api_pod_and_loads_the_shared_rules() -> None:
    generators = {g["name"]: g for g in kustomization()["configMapGenerator"]}
    files = dict(entry.split("=", 1) for entry in generators["prometheus-config"]["files"])
    assert (K8S / files["rules.yml"]).resolve() == ROOT / "monitoring" / "prometheus" / "rules.yml"
    config = yaml.safe_load((K8S / files["prometheus.yml"]).read_text())
    assert config["rule_files"] == ["rules.yml"]
    services = by_kind("Service")
    for job in config["scrape_configs"]:
        for sd in job["dns_sd_configs"]:
            for name in sd["names"]:
                service = services[name.split(".")[0]]
                assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"]
            assert sd["port"] == 8000
    prometheus = by_kind("Deployment")["prometheus"]["spec"]["template"]["spec"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["containers"][0]["args"]
    assert {v["configMap"]["name"] for v in prometheus["volumes"] if "configMap" in v} == {"prometheus-config"}
    # Grafana's data source (http://prometheus:9090) resolves to this Service.
    assert services["prometheus"]["spec"]["ports"][0]["port"] == 9090


def test_k8s_grafana_mounts_the_provisioning_from_monitoring() -> None:
    generators = {g["name"]: g for g in kustomization()["configMapGenerator"]}
    grafana = by_kind("Deployment")["grafana"]["spec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in grafana["containers"][0]["volumeMounts"]}
    config_maps = {v["name"]: v["configMap"]["name"] for v in grafana["volumes"] if "configMap" in v}
    assert set(config_maps.values()) <= set(generators)
    provider_file = ROOT / "monitoring" / "grafana" / "provisioning" / "dashboards.yml"
    provider_path = yaml.safe_load(provider_file.read_text())["providers"][0]["options"]["path"]
    by_mount = {mounts[volume]: generators[config_map] for volume, config_map in config_maps.items()}
    assert by_mount[provider_path]["files"][0].endswith("monitoring/grafana/dashboards/equipoise.json")
    assert by_mount["/etc/grafana/provisioning/datasources"]["files"][0].endswith("provisioning/datasources.yml")
    assert by_mount["/etc/grafana/provisioning/dashboards"]["files"][0].endswith("provisioning/dashboards.yml")


def test_the_installed_package_carries_every_file_it_reads_at_run_time(tmp_path: Path) -> None:
    """The images install the project as a wheel and keep only the environment, so every non-Python file inside
    the packages (the shipped default's tensors, recipes, the Alembic template, Grafana and Prometheus files)
    must be package data."""
    # From a copy: setuptools would reuse a stale build/ of the working tree.
    ignored = shutil.ignore_patterns(".*", "build", "*.egg-info", "state", "runs", "__pycache__")
    source = shutil.copytree(ROOT, tmp_path / "source", ignore=ignored)
    command = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation"]
    subprocess.run([*command, "--wheel-dir", str(tmp_path), str(source)], check=True, capture_output=True, timeout=300)
    packaged = set(zipfile.ZipFile(next(tmp_path.glob("*.whl"))).namelist())
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    included = setuptools["packages"]["find"]["include"]  # globs
    packages = [
        path
        for path in ROOT.iterdir()
        if (path / "__init__.py").is_file() and any(fnmatch(path.name, g) for g in included)
    ]
    needed = {
        path.relative_to(ROOT).as_posix()
        for package in packages
        for path in package.rglob("*")
        if path.is_file() and path.suffix not in (".py", ".pyc") and "__pycache__" not in path.parts
    }
    assert "model/default/delta.safetensors" in needed
    assert needed <= packaged, f"not in the wheel: {sorted(needed - packaged)}"


def test_gpu_image_installs_faster_whisper_without_the_cpu_onnxruntime_it_declares() -> None:
    _, dependencies, _ = _torch_then_project("gpu")
    assert "grep -v '^faster-whisper==' /tmp/requirements.txt > /tmp/with-deps.txt" in dependencies
    assert "pip install --no-deps --requirement /tmp/no-deps.txt" in dependencies
    assert "pip install --requirement /tmp/requirements.txt" not in dependencies
