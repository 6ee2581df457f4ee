"""Static checks of everything under cluster/ (there is no Kubernetes, cloud account or Docker engine here):
every YAML parses; KubeRay manifests use only fields of the ray.io/v1 CRDs and agree with each other, with
the repository (entrypoints, configs, the Serve application) and with the pinned Ray version; the cluster
launcher configs pass Ray's own schema validation; the Dockerfile builds on the official Ray image of the
pinned version. Plus the job CLI's behaviour that needs no cluster (addresses, tokens, arguments)."""

from __future__ import annotations

import copy
import re
import shlex
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import typer.main
import yaml

from cluster import jobs
from conftest import cli_in_process
from metarestore_cli.app import app as cli_app

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
LAUNCHER = CLUSTER / "launcher"
CLI = typer.main.get_command(cli_app)  # the application's click group: what `metarestore submit` asks
DOCKERFILE = CLUSTER / "docker" / "Dockerfile"
IMAGE_ROOT = "/home/ray/metarestore"  # WORKDIR of the image: the repository root inside it
PY_TAG = f"py{sys.version_info.major}{sys.version_info.minor}"


def pinned_ray_version() -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (ray_dep,) = [d for d in deps if re.match(r"ray(\[|=)", d)]
    match = re.search(r"==\s*([0-9][^,;\s]*)", ray_dep)
    assert match, f"Ray must be pinned exactly in pyproject.toml: {ray_dep}"
    return match.group(1)


RAY_VERSION = pinned_ray_version()


def load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def kuberay_docs() -> list[tuple[Path, dict]]:
    return [(path, doc) for path in sorted(KUBERAY.glob("*.yaml")) for doc in load_all(path)]


def by_kind(kind: str) -> list[dict]:
    return [doc for _, doc in kuberay_docs() if doc["kind"] == kind]


def cluster_specs() -> list[tuple[str, dict]]:
    """Every RayClusterSpec: the RayCluster's, each RayJob's and the RayService's."""
    specs = [(f"RayCluster/{d['metadata']['name']}", d["spec"]) for d in by_kind("RayCluster")]
    specs += [(f"RayJob/{d['metadata']['name']}", d["spec"]["rayClusterSpec"]) for d in by_kind("RayJob")]
    specs += [(f"RayService/{d['metadata']['name']}", d["spec"]["rayClusterConfig"]) for d in by_kind("RayService")]
    return specs


def groups(spec: dict) -> list[tuple[str, dict]]:
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]


def containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def is_gpu(container: dict) -> bool:
    return "nvidia.com/gpu" in container.get("resources", {}).get("limits", {})


def cpus(quantity) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def worker_cpus(spec: dict) -> float:
    """CPUs Ray gets from the worker groups at their minimum size (the head has num-cpus 0)."""
    return sum(g.get("minReplicas", g.get("replicas", 0)) * cpus(containers(g)[0]["resources"]["limits"]["cpu"])
               for g in spec.get("workerGroupSpecs", []))


def secrets() -> dict[str, dict]:
    return {d["metadata"]["name"]: d.get("stringData") or d.get("data") or {} for d in by_kind("Secret")}


def mlflow_url() -> str:
    (service,) = [s for s in by_kind("Service") if s["metadata"]["name"] == "mlflow"]
    return f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"


# --- every YAML under cluster/ ---------------------------------------------------------------------------

ALL_YAML = sorted(CLUSTER.rglob("*.yaml"))


def test_the_expected_files_exist():
    names = {p.relative_to(CLUSTER).as_posix() for p in ALL_YAML}
    assert {"runtime_env.yaml", "launcher/aws.yaml", "launcher/gcp.yaml", "kuberay/raycluster.yaml",
            "kuberay/rayjob-train.yaml", "kuberay/rayjob-tune.yaml", "kuberay/rayservice.yaml",
            "kuberay/secrets.yaml", "kuberay/storage.yaml", "kuberay/mlflow.yaml"} <= names
    assert DOCKERFILE.is_file() and (CLUSTER / "README.md").is_file()


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: p.relative_to(CLUSTER).as_posix())
def test_every_yaml_parses(path):
    docs = load_all(path)
    assert docs and all(isinstance(doc, dict) and doc for doc in docs)


# --- KubeRay ---------------------------------------------------------------------------------------------

# Fields of the ray.io/v1 CRDs (KubeRay v1.6.2 API reference): a typo would be dropped silently by the
# API server (or rejected by strict field validation); here it fails.
FIELDS = {
    "RayClusterSpec": {"upgradeStrategy", "authOptions", "suspend", "managedBy", "autoscalerOptions",
                       "headServiceAnnotations", "enableInTreeAutoscaling", "gcsFaultToleranceOptions",
                       "headGroupSpec", "rayVersion", "workerGroupSpecs"},
    "HeadGroupSpec": {"template", "headService", "enableIngress", "resources", "labels", "rayStartParams",
                      "serviceType"},
    "WorkerGroupSpec": {"suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds",
                        "resources", "labels", "rayStartParams", "template", "scaleStrategy", "numOfHosts"},
    "AuthOptions": {"enableK8sTokenAuth", "secretName", "mode"},
    "AutoscalerOptions": {"resources", "image", "imagePullPolicy", "securityContext", "idleTimeoutSeconds",
                          "upscalingMode", "version", "env", "envFrom", "volumeMounts"},
    "RayJobSpec": {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
                   "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint",
                   "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus",
                   "entrypointNumGpus", "ttlSecondsAfterFinished", "preRunningDeadlineSeconds",
                   "shutdownAfterJobFinishes", "suspend"},
    "RayServiceSpec": {"rayClusterDeletionDelaySeconds", "serviceUnhealthySecondThreshold",
                       "deploymentUnhealthySecondThreshold", "serveService", "upgradeStrategy", "managedBy",
                       "serveConfigV2", "rayClusterConfig", "excludeHeadPodFromServeSvc"},
}


def check_cluster_spec_fields(where: str, spec: dict) -> None:
    assert set(spec) <= FIELDS["RayClusterSpec"], (where, set(spec) - FIELDS["RayClusterSpec"])
    assert set(spec["headGroupSpec"]) <= FIELDS["HeadGroupSpec"], where
    for group in spec.get("workerGroupSpecs", []):
        assert set(group) <= FIELDS["WorkerGroupSpec"], (where, set(group) - FIELDS["WorkerGroupSpec"])
    assert set(spec.get("authOptions", {})) <= FIELDS["AuthOptions"], where
    assert set(spec.get("autoscalerOptions", {})) <= FIELDS["AutoscalerOptions"], where


def test_kuberay_kinds_api_versions_and_fields():
    kinds = [doc["kind"] for _, doc in kuberay_docs()]
    assert kinds.count("RayCluster") == 1 and kinds.count("RayJob") == 2 and kinds.count("RayService") == 1
    for _, doc in kuberay_docs():
        if doc["kind"].startswith("Ray"):
            assert doc["apiVersion"] == "ray.io/v1", doc["metadata"]["name"]
    for job in by_kind("RayJob"):
        assert set(job["spec"]) <= FIELDS["RayJobSpec"], set(job["spec"]) - FIELDS["RayJobSpec"]
    for service in by_kind("RayService"):
        assert set(service["spec"]) <= FIELDS["RayServiceSpec"]
    for where, spec in cluster_specs():
        check_cluster_spec_fields(where, spec)


def test_token_authentication_uses_the_secret():
    token_secrets = {name for name, data in secrets().items() if "auth_token" in data}
    assert token_secrets, "a Secret with the key auth_token (the Ray token)"
    for where, spec in cluster_specs():
        auth = spec.get("authOptions")
        assert auth and auth["mode"] == "token", f"{where}: token authentication must stay on"
        assert auth["secretName"] in token_secrets, where
    for name, data in secrets().items():  # a template: no real secret is committed
        assert all("REPLACE" in str(value) for value in data.values()), name


@pytest.mark.parametrize("where,spec", cluster_specs(), ids=[w for w, _ in cluster_specs()])
def test_cluster_spec(where, spec):
    assert spec["rayVersion"] == RAY_VERSION
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # the head coordinates, workers compute
    ports = {p["name"]: p["containerPort"] for c in containers(head) for p in c.get("ports", [])}
    assert ports.get("dashboard") == 8265 and ports.get("gcs-server") == 6379
    claims = {p["metadata"]["name"] for p in by_kind("PersistentVolumeClaim")}
    for name, group in groups(spec):
        pod = group["template"]["spec"]
        for container in containers(group):
            repo, _, tag = container["image"].rpartition(":")
            assert repo.endswith("/metarestore"), container["image"]
            assert tag == f"{RAY_VERSION}-{PY_TAG}-{'gpu' if is_gpu(container) else 'cpu'}", (where, name, tag)
            resources = container["resources"]
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources[kind]), (where, name, kind)
            assert resources["requests"] == resources["limits"], (where, name)  # KubeRay's recommendation
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secrets()[ref["name"]], (where, env["name"])
        for volume in pod.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, (where, name)
        if name != "head":
            assert group.get("minReplicas", 0) <= group["replicas"] <= group["maxReplicas"], (where, name)


def test_raycluster_has_cpu_and_gpu_worker_groups():
    (cluster,) = by_kind("RayCluster")
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    kinds = {name: is_gpu(containers(group)[0]) for name, group in groups(spec) if name != "head"}
    assert sorted(kinds.values()) == [False, True], kinds
    for name, group in groups(spec):
        if name != "head" and kinds[name]:
            tolerations = group["template"]["spec"].get("tolerations", [])
            assert any(t["key"] == "nvidia.com/gpu" for t in tolerations), "GPU nodes are usually tainted"
            assert group["minReplicas"] == 0 and group["maxReplicas"] >= 1  # GPUs only while needed


def entrypoint_args(job: dict) -> tuple[str, list[str]]:
    words = shlex.split(job["spec"]["entrypoint"])
    assert words[:3] == ["python", "-m", "metarestore_cli"], words
    return words[3], words[4:]


def option(args: list[str], name: str) -> str | None:
    return jobs._option_value(args, name)


def overrides(args: list[str]) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--set"]


def repo_path(image_path: str) -> Path:
    assert image_path.startswith(IMAGE_ROOT + "/"), f"{image_path}: a path inside the image's checkout"
    return REPO / image_path[len(IMAGE_ROOT) + 1:]


def shared_mounts(spec: dict) -> set[str]:
    """Paths mounted from a PersistentVolumeClaim in the head and in every worker group."""
    mounted = []
    for _, group in groups(spec):
        pod = group["template"]["spec"]
        claims = {v["name"] for v in pod.get("volumes", []) if "persistentVolumeClaim" in v}
        mounted.append({m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", [])
                        if m["name"] in claims})
    return set.intersection(*mounted)


@pytest.mark.parametrize("job", by_kind("RayJob"), ids=lambda j: j["metadata"]["name"])
def test_rayjob_entrypoint(job):
    command, args = entrypoint_args(job)
    assert command in jobs.COMMANDS
    known = jobs.command_options(CLI, command)  # the real options of `metarestore COMMAND` in this checkout
    unknown = {a.split("=")[0] for a in args if a.startswith("--")} - known
    assert not unknown, f"{command} has no option(s) {unknown}"
    config = repo_path(option(args, "--config"))
    assert config.is_file(), config
    assert option(args, "--address") == "auto"  # joins the job's cluster instead of starting a Ray of its own
    assert option(args, "--tracking-uri") == mlflow_url()
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["entrypointNumCpus"] == 0
    assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)

    cluster = spec["rayClusterSpec"]
    shared = shared_mounts(cluster)
    assert shared, "outputs and Ray Train checkpoints need a volume every node mounts"
    sets = dict(o.split("=", 1) for o in overrides(args))
    outputs = [option(args, "--out")] if command == "tune" else [sets["train.output_dir"],
                                                                 sets["distributed.storage_path"]]
    for path in outputs:
        assert any(path.startswith(m + "/") for m in shared), f"{path} is not on shared storage {shared}"

    # the job fits its cluster: Ray Train workers (x concurrent trials) x CPUs per worker
    if command == "train":
        from metarestore.config import load_config

        cfg = load_config(config, overrides(args))
        needed = int(option(args, "--workers") or cfg.distributed.workers) * cfg.distributed.cpus_per_worker
    else:
        from training.tune import load_search_config

        base, search = load_search_config(config, overrides(args))
        assert search.space, "a search config"
        concurrent = int(option(args, "--max-concurrent") or search.max_concurrent)
        distributed = base.get("distributed", {})
        workers = int(option(args, "--workers") or distributed.get("workers", 1))
        needed = concurrent * (workers * distributed.get("cpus_per_worker", 1) + 0.01)  # + each trial's driver
    assert needed <= worker_cpus(cluster), (needed, worker_cpus(cluster))


def test_the_image_holds_the_configs_jobs_use():
    ignored = [line.strip() for line in (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for job in by_kind("RayJob"):
        _, args = entrypoint_args(job)
        rel = repo_path(option(args, "--config")).relative_to(REPO).as_posix()
        assert not any(rel == p or rel.startswith(p.rstrip("/") + "/") for p in ignored), rel


def test_rayservice_matches_serving_config():
    (service,) = by_kind("RayService")
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    serving_yaml = REPO / "serving" / "config.yaml"
    if not serving_yaml.is_file():
        pytest.skip("serving/config.yaml is not there yet")
    reference = yaml.safe_load(serving_yaml.read_text())
    apps, ref_apps = serve_config["applications"], reference["applications"]
    assert [a["name"] for a in apps] == [a["name"] for a in ref_apps]
    for app, ref in zip(apps, ref_apps, strict=True):
        assert app["import_path"] == ref["import_path"] and app["route_prefix"] == ref["route_prefix"]
        module_name, _, attr = app["import_path"].partition(":")
        import importlib

        module = importlib.import_module(module_name)
        assert callable(getattr(module, attr))
        if hasattr(module, "AppArgs"):
            module.AppArgs(**app["args"])  # every key is an application argument, every value valid
        assert app["args"]["tracking_uri"] == mlflow_url()
        deployments = {d["name"]: d for d in app["deployments"]}
        ref_deployments = {d["name"]: d for d in ref["deployments"]}
        assert set(deployments) == set(ref_deployments)
        for name, ref_deployment in ref_deployments.items():
            if "num_replicas" in ref_deployment:  # fixed sizes (the shared adapter store) stay fixed
                assert deployments[name].get("num_replicas") == ref_deployment["num_replicas"], name
        token_env = app["args"].get("token_env")
        if token_env:  # every pod that can host a replica has the variable, from a Secret
            for _, group in groups(service["spec"]["rayClusterConfig"]):
                names = {e["name"] for c in containers(group) for e in c.get("env", []) if "valueFrom" in e}
                assert token_env in names
    assert serve_config["http_options"]["host"] == "0.0.0.0"  # the Kubernetes Service must reach the proxies
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]
    ports = {p["name"]: p["containerPort"] for c in containers(head) for p in c.get("ports", [])}
    assert ports["serve"] == serve_config["http_options"]["port"]


def test_mlflow_server_has_a_database_and_a_shared_artifact_store():
    (deployment,) = [d for d in by_kind("Deployment") if d["metadata"]["name"] == "mlflow"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["mlflow", "server"]
    args = dict(a.lstrip("-").split("=", 1) if "=" in a else (a.lstrip("-"), True) for a in container["args"])
    env = {e["name"]: e for e in container["env"]}
    store_var = re.fullmatch(r"\$\((\w+)\)", args["backend-store-uri"]).group(1)
    ref = env[store_var]["valueFrom"]["secretKeyRef"]
    assert secrets()[ref["name"]][ref["key"]].startswith("postgresql://")
    assert args["artifacts-destination"].startswith(("s3://", "gs://", "wasbs://"))
    assert args["serve-artifacts"] is True and args["host"] == "0.0.0.0"
    assert "mlflow" in args["allowed-hosts"].split(",")
    assert container["ports"][0]["containerPort"] == int(args["port"])
    assert container["image"].endswith(f":{RAY_VERSION}-{PY_TAG}-cpu")
    assert mlflow_url() == f"http://mlflow:{args['port']}"


# --- cluster launcher --------------------------------------------------------------------------------------

LAUNCHER_CONFIGS = sorted(LAUNCHER.glob("*.yaml"))


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_config_passes_rays_validation(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(path.read_text())
    validate_config(prepare_config(copy.deepcopy(config)))
    broken = copy.deepcopy(config)  # the validator has teeth: an unknown node-type field is refused
    next(iter(broken["available_node_types"].values()))["max_worker"] = 1
    with pytest.raises(Exception, match="max_worker"):
        validate_config(prepare_config(broken))


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_config(path):
    config = yaml.safe_load(path.read_text())
    assert {"aws.yaml": "aws", "gcp.yaml": "gcp"}[path.name] == config["provider"]["type"]
    assert config["docker"]["image"] == f"rayproject/ray:{RAY_VERSION}-{PY_TAG}-cpu"
    types = config["available_node_types"]
    head = config["head_node_type"]
    assert types[head]["resources"].get("CPU") == 0
    workers = {name: t for name, t in types.items() if name != head}
    gpu_types = {name for name, t in workers.items() if t.get("docker", {}).get("worker_image")}
    assert gpu_types and gpu_types != set(workers), "CPU and GPU worker types"
    for name, node_type in workers.items():
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"] <= config["max_workers"], name
        if name in gpu_types:
            assert node_type["docker"]["worker_image"] == f"rayproject/ray:{RAY_VERSION}-{PY_TAG}-gpu"
            node = node_type["node_config"]
            assert node.get("guestAccelerators") or re.match(r"(g|p)\d", node.get("InstanceType", "")), name
    assert sum(t["min_workers"] for t in workers.values()) <= config["max_workers"]

    # the project is synced to every node and installed there, CPU torch or (GPU nodes) CUDA torch
    mounts = config["file_mounts"]
    (project,) = [remote for remote, local in mounts.items() if local == "."]
    install = [c for c in config["setup_commands"] if "pip install" in c and f"-e {project}" in c]
    assert install, config["setup_commands"]
    for name in gpu_types:
        assert any(f"-e {project}" in c for c in workers[name]["worker_setup_commands"]), name
    assert ".venv" in config["rsync_exclude"]
    check_no_source_excluded(config["rsync_exclude"])  # rsync matches a plain name at any depth too

    # token authentication: the token goes to every node and every `ray start` runs with RAY_AUTH_MODE=token
    assert mounts["~/.ray/auth_token"] == "~/.ray/auth_token"
    starts = [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token" in c for c in starts)
    assert "--dashboard-host=127.0.0.1" in starts[0]  # reached through `ray dashboard` (SSH), not the network


# --- Dockerfile (static: no Docker engine on this machine) -------------------------------------------------

def dockerfile_lines() -> list[str]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_dockerfile_builds_on_the_official_ray_image_of_the_pinned_version():
    lines = dockerfile_lines()
    (from_index,) = [i for i, line in enumerate(lines) if line.upper().startswith("FROM ")]
    args = {}
    for line in lines[:from_index]:
        assert line.upper().startswith("ARG "), line
        name, _, default = line[4:].partition("=")
        args[name.strip()] = default.strip().strip('"')
    image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], lines[from_index].split()[1])
    assert image == f"rayproject/ray:{RAY_VERSION}-{PY_TAG}-cpu"
    assert "--build-arg RAY_VARIANT=gpu" in DOCKERFILE.read_text()  # the GPU variant is documented

    # build args used after FROM must be declared after FROM (Docker scoping), or they expand to nothing
    declared = {line[4:].partition("=")[0].strip() for line in lines[from_index + 1:] if line.upper().startswith("ARG ")}
    env_names = {m for line in lines if line.upper().startswith("ENV ") for m in re.findall(r"(\w+)=", line)}
    for line in lines[from_index + 1:]:
        for name in re.findall(r"\$\{?(\w+)\}?", line):
            if name in args or name.isupper() and name not in env_names and not name.startswith("RAY_"):
                assert name in declared, f"{name} used after FROM but not declared there: {line}"
    runs = " ".join(line for line in lines if line.startswith("RUN "))
    assert "pip install" in runs and "pyproject.toml" in runs and "pip install --no-deps ." in runs
    assert any(line.startswith("COPY") and line.split()[-2:] == [".", "."] for line in lines)
    assert any(line.startswith("WORKDIR") and line.split()[1] == IMAGE_ROOT for line in lines)


SOURCES = ("metarestore", "metarestore_cli", "training", "serving", "evaluation", "cluster", "configs")


def check_no_source_excluded(patterns: list[str]) -> None:
    """Unanchored names (no /, no wildcard) match at any depth: none may name a folder or file of the code
    (e.g. `data` would drop the metarestore.data package; it must be `/data`)."""
    names = {p.name for top in SOURCES for p in (REPO / top).rglob("*") if "__pycache__" not in p.parts}
    plain = {p.strip("/") for p in patterns if not p.startswith("/") and not set(p) & set("*?[")}
    assert not plain & names, plain & names


def test_dockerignore_and_runtime_env_leave_out_the_same_things():
    ignored = {line.strip().removeprefix("**/").strip("/") for line in
               (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    excludes = {e.strip("/") for e in yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())["excludes"]}
    assert excludes <= ignored, excludes - ignored
    check_no_source_excluded(yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())["excludes"])


# --- the job's runtime environment -------------------------------------------------------------------------

def test_runtime_env_uploads_the_code_and_nothing_big(tmp_path):
    from ray._private.runtime_env.packaging import create_package

    env = jobs.runtime_env()
    assert env["working_dir"] == str(REPO)
    for needed in (".venv", ".git", "mlruns", "mlflow.db", "runs", "/data", "__pycache__", ".pytest_cache"):
        assert needed in env["excludes"]
    from ray._private.ray_constants import RAY_RUNTIME_ENV_DEFAULT_EXCLUDES

    for default in RAY_RUNTIME_ENV_DEFAULT_EXCLUDES.split(","):  # submit turns Ray's defaults off: ours cover them
        assert default in env["excludes"], default
    package = tmp_path / "pkg.zip"
    # our excludes alone (not Ray's default ones, nor .gitignore) keep the upload small
    create_package(env["working_dir"], package, include_gitignore=False, excludes=env["excludes"])
    names = zipfile.ZipFile(package).namelist()
    for wanted in ("metarestore_cli/__main__.py", "metarestore/mlflow_model.py", "metarestore/data/__init__.py",
                   "configs/smoke.yaml", "cluster/jobs.py"):
        assert wanted in names  # what a job runs: the entrypoint module and the packages it imports
    tops = {n.split("/")[0] for n in names}
    assert not tops & {".venv", ".git", "mlruns", "runs", "data", ".pytest_cache", ".ruff_cache"}, tops
    assert not [n for n in names if "__pycache__" in n or n.endswith((".pyc", ".safetensors"))]
    assert package.stat().st_size < 50 * 2**20


# --- the job CLI without a cluster -------------------------------------------------------------------------

def test_addresses():
    assert jobs.normalize_address(None) == "http://127.0.0.1:8265"
    assert jobs.normalize_address("10.0.0.5:8265/") == "http://10.0.0.5:8265"
    assert jobs.normalize_address("https://ray.example.com") == "https://ray.example.com"
    for bad, why in (("auto", "dashboard"), ("ray://head:10001", "dashboard"), ("head:6379", "GCS port"),
                     ("http://head:10001", "Ray client port"), ("ftp://head", "dashboard URL")):
        with pytest.raises(jobs.JobsError, match=why):
            jobs.normalize_address(bad)


def test_token_discovery_follows_rays_order(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    assert jobs.find_token()[0] is None and jobs.auth_headers() == {}
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("home-token\n")
    assert jobs.find_token() == ("home-token", str(tmp_path / ".ray" / "auth_token"))
    (tmp_path / "file").write_text("path-token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "file"))
    assert jobs.find_token()[0] == "path-token"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "env-token")
    assert jobs.auth_headers() == {"Authorization": "Bearer env-token"}
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(jobs.JobsError, match="cannot read the token"):
        jobs.find_token()


def test_job_arguments():
    def job_args(command, args):
        return jobs.job_args(command, args, jobs.command_options(CLI, command))

    args = job_args("train", ["--config", "configs/smoke.yaml"])
    assert args == ["--config", "configs/smoke.yaml", "--address", "auto"]
    assert job_args("train", ["--address=auto"]) == ["--address=auto"]
    assert job_args("tune", ["--config", "x.yaml"])[-2:] == ["--address", "auto"]
    assert job_args("evaluate", ["--model", "models:/m@latest"])[-2:] == ["--address", "auto"]
    assert jobs.job_args("degrade", ["--seed", "1"], jobs.command_options(CLI, "degrade")) == ["--seed", "1"]
    assert "--no-register" in jobs.command_options(CLI, "train")
    assert jobs.entrypoint("train", ["--set", "train.name=a b"]) == \
        "python -m metarestore_cli train --set 'train.name=a b'"
    with pytest.raises(jobs.JobsError, match="relative sqlite path"):
        job_args("train", ["--tracking-uri", "sqlite:///mlflow.db"])
    jobs.check_tracking_uri("sqlite:////shared/mlflow.db")
    jobs.check_tracking_uri("http://mlflow:5000")
    assert jobs.output_warning("train", ["--set", "train.output_dir=/mnt/shared/x"]) is None
    assert "train.output_dir" in jobs.output_warning("train", [])
    assert jobs.output_warning("tune", ["--out", "s3://bucket/x"]) is None
    with pytest.raises(jobs.JobsError, match="no 'nope' command"):
        jobs.command_options(CLI, "nope")


@pytest.fixture
def run_cli(monkeypatch, capsys):
    """``metarestore ARGS`` in process, with none of this machine's RAY_* variables but those in ``env``."""
    import os

    def run(*args: str, env: dict | None = None):
        for name in [k for k in os.environ if k.startswith("RAY_")]:
            monkeypatch.delenv(name)
        for name, value in (env or {}).items():
            monkeypatch.setenv(name, value)
        return cli_in_process(capsys, *args)

    return run


def test_cli_help(run_cli):
    submit = run_cli("submit", "--help")
    assert submit.returncode == 0
    for word in ("train", "tune", "evaluate", "--address", "--follow", "--tracking-uri", "RAY_AUTH_TOKEN"):
        assert word in submit.stdout, word
    jobs_help = run_cli("jobs", "--help")
    assert jobs_help.returncode == 0
    for word in ("list", "status", "logs", "stop"):
        assert word in jobs_help.stdout


def test_cli_errors_are_one_line(run_cli):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = run_cli("jobs", "list", "--address", f"http://127.0.0.1:{port}")
    assert down.returncode == 2
    assert down.stderr.strip().splitlines() == [
        f"error: cannot reach the Ray dashboard at http://127.0.0.1:{port} (ConnectionError); is the cluster "
        "up, and is this its dashboard address (http://HEAD:8265)?"]
    gcs = run_cli("submit", "train", "--address", "127.0.0.1:6379")
    assert gcs.returncode == 2 and gcs.stderr.startswith("error: --address http://127.0.0.1:6379: port 6379")
    from_env = run_cli("jobs", "list", env={"RAY_ADDRESS": "auto"})  # $RAY_ADDRESS is the default address
    assert from_env.returncode == 2 and "not 'auto'" in from_env.stderr
