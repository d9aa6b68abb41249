"""The cluster files, the Dockerfile and the run configs agree with the code they run.

Nothing here starts a cluster: each file is parsed (Ray's own schema for the launcher YAML and the
runtime env) and the fields that must match the code are compared with it: the image name, the
Ray and Python versions, the entry points and the configs they name, the environment variables.
"""

import copy
import importlib.util
import json
import re
import shlex
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.fixtures.paths import REPO
from workflows.config import ConfigError, load_config

pytestmark = pytest.mark.unit

CLUSTER = REPO / "cluster"
CONFIGS = REPO / "workflows" / "configs"
LAUNCHER = CLUSTER / "aws.yaml"
RAYCLUSTER = CLUSTER / "kuberay" / "raycluster.yaml"
RAYJOB = CLUSTER / "kuberay" / "rayjob.yaml"
SETTINGS = CLUSTER / "kuberay" / "settings.yaml"
RUNTIME_ENV = CLUSTER / "runtime_env.yaml"
DOCKERFILE = REPO / "Dockerfile"
SECRET_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL", re.IGNORECASE)
# Variables we set that a library, not our code, reads; each is looked for in that library's source.
LIBRARY_VARIABLES = {
    "AWS_ACCESS_KEY_ID": "botocore",
    "AWS_SECRET_ACCESS_KEY": "botocore",
    "MLFLOW_S3_ENDPOINT_URL": "mlflow",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "mlflow",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "ray",
    "RAY_USAGE_STATS_ENABLED": "ray",
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "ray",
}
PYTHON_VARIABLES = {"PYTHONUNBUFFERED"}


def load(path: Path):
    return yaml.safe_load(path.read_text())


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def dependencies() -> dict[str, str]:
    """Distribution name (lower case, extras dropped) -> its requirement string in pyproject."""
    out = {}
    for requirement in pyproject()["project"]["dependencies"]:
        name = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower()
        out[name] = requirement
    return out


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def docker_value(keyword: str) -> list[str]:
    return [rest for k, rest in dockerfile_instructions() if k == keyword]


def kuberay_cluster_specs() -> dict[str, dict]:
    return {"RayCluster": load(RAYCLUSTER)["spec"], "RayJob": load(RAYJOB)["spec"]["rayClusterSpec"]}


def pod_templates(spec: dict) -> dict[str, dict]:
    out = {"head": spec["headGroupSpec"]["template"]["spec"]}
    for group in spec["workerGroupSpecs"]:
        out[group["groupName"]] = group["template"]["spec"]
    return out


def containers() -> list[tuple[str, dict]]:
    out = []
    for kind, spec in kuberay_cluster_specs().items():
        for group, pod in pod_templates(spec).items():
            out += [(f"{kind}/{group}/{c['name']}", c) for c in pod["containers"]]
    return out


def launcher_env() -> dict[str, str]:
    """NAME=value pairs passed with `--env` in the launcher's docker run options."""
    out = {}
    for option in load(LAUNCHER)["docker"]["run_options"]:
        words = shlex.split(option)
        if words[0] in ("--env", "-e"):
            name, _, value = words[1].partition("=")
            out[name] = value
    return out


def dockerfile_env() -> dict[str, str]:
    out = {}
    for rest in docker_value("ENV"):
        for word in shlex.split(rest):
            name, _, value = word.partition("=")
            out[name] = value
    return out


def every_variable_we_set() -> list[tuple[str, str]]:
    """(variable name, where it is set) over every cluster file and the Dockerfile."""
    out = [(name, "cluster/aws.yaml") for name in launcher_env()]
    out += [(name, "Dockerfile") for name in dockerfile_env()]
    out += [(name, "cluster/runtime_env.yaml") for name in load(RUNTIME_ENV)["env_vars"]]
    job_env = yaml.safe_load(load(RAYJOB)["spec"]["runtimeEnvYAML"])["env_vars"]
    out += [(name, "RayJob runtimeEnvYAML") for name in job_env]
    for where, container in containers():
        out += [(entry["name"], where) for entry in container["env"]]
    return out


def image_in_dockerfile_header() -> str:
    match = re.search(r"docker build -t (\S+) \.", DOCKERFILE.read_text())
    assert match, "the Dockerfile's header names the tag it is built as"
    return match.group(1)


def base_image() -> str:
    (line,) = docker_value("FROM")
    return line.split()[0]


# ---- every file parses -------------------------------------------------------------------


def test_every_cluster_file_parses():
    files = sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml"))
    assert {LAUNCHER, RAYCLUSTER, RAYJOB, SETTINGS, RUNTIME_ENV} <= set(files)
    for path in files:
        assert isinstance(load(path), dict), path
    assert next(k for k, _ in dockerfile_instructions()) == "FROM"


def test_launcher_config_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load(LAUNCHER)
    validate_config(prepare_config(copy.deepcopy(config)))
    assert config["provider"]["type"] == "aws"


def test_runtime_env_is_accepted_by_ray():
    from ray.runtime_env import RuntimeEnv

    env = RuntimeEnv(**load(RUNTIME_ENV))
    assert env.get("working_dir") == "."


def test_kuberay_manifests_are_ray_io_v1_objects():
    for path, kind in ((RAYCLUSTER, "RayCluster"), (RAYJOB, "RayJob")):
        manifest = load(path)
        assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", kind)
    settings = load(SETTINGS)
    assert (settings["apiVersion"], settings["kind"]) == ("v1", "ConfigMap")


# ---- one image, one Ray, one Python ------------------------------------------------------


def test_image_name_is_identical_in_launcher_kuberay_and_dockerfile():
    image = load(LAUNCHER)["docker"]["image"]
    assert image == image_in_dockerfile_header()
    for where, container in containers():
        assert container["image"] == image, where
    assert "image" not in load(LAUNCHER)["docker"].get("worker_image", {})


def test_image_tag_names_the_package_ray_and_python_versions():
    import ray

    tag = load(LAUNCHER)["docker"]["image"].rpartition(":")[2]
    version = pyproject()["project"]["version"]
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert tag == f"{version}-ray{ray.__version__}-{python}-gpu"


def test_ray_version_is_one_everywhere():
    import ray

    pinned = re.search(r"==([\w.]+)", dependencies()["ray"]).group(1)
    assert ray.__version__ == pinned
    repository, _, tag = base_image().rpartition(":")
    assert repository.endswith("rayproject/ray")
    assert tag.split("-")[0] == pinned
    for kind, spec in kuberay_cluster_specs().items():
        assert spec["rayVersion"] == pinned, kind
    assert f"ray.__version__ == '{pinned}'" in DOCKERFILE.read_text()


def test_base_image_is_the_gpu_build_for_our_python():
    tag = base_image().rpartition(":")[2]
    words = tag.split("-")
    assert f"py{sys.version_info.major}{sys.version_info.minor}" in words
    assert words[-1] == "gpu" or words[-1].startswith("cu")
    assert re.search(rf"<\s*3\.{sys.version_info.minor + 1}", pyproject()["project"]["requires-python"])


def test_image_runs_as_the_non_root_ray_user():
    users = docker_value("USER")
    assert users and users[-1] not in ("root", "0")
    for _, container in containers():
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
    for kind, spec in kuberay_cluster_specs().items():
        for group, pod in pod_templates(spec).items():
            assert pod["securityContext"]["runAsNonRoot"] is True, (kind, group)
            assert pod["securityContext"]["runAsUser"] != 0, (kind, group)


def test_image_installs_the_package_it_is_built_from():
    runs = " ".join(docker_value("RUN"))
    assert "pip install" in runs and re.search(r"pip install [^&]*\.(\s|$)", runs)
    copied = {
        word.rstrip("/")
        for rest in docker_value("COPY")
        for word in shlex.split(rest)[:-1]
        if not word.startswith("--")
    }
    assert {"pyproject.toml", "lightbsr", "workflows"} <= copied
    ignore = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ignore[0] == "**", "the build context is an allow-list"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert copied <= allowed


# ---- GPU worker groups, CPU head ---------------------------------------------------------


def gpus_per_pod(group: dict) -> int:
    return int(group["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))


def test_kuberay_has_a_cpu_head_and_a_gpu_worker_group():
    for kind, spec in kuberay_cluster_specs().items():
        head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]
        assert "nvidia.com/gpu" not in head["limits"], kind
        gpu_groups = [g for g in spec["workerGroupSpecs"] if gpus_per_pod(g) > 0]
        assert gpu_groups, kind
        assert gpu_groups[0]["maxReplicas"] >= gpu_groups[0]["minReplicas"] >= 1


def test_rayjob_runs_on_the_same_cluster_spec_as_the_raycluster():
    specs = kuberay_cluster_specs()
    assert specs["RayJob"] == specs["RayCluster"]


def test_launcher_has_a_cpu_head_and_gpu_workers():
    config = load(LAUNCHER)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"].get("CPU") == 0
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert any(re.match(r"(g|p)\d", t["node_config"]["InstanceType"]) for t in workers)
    assert all(t["min_workers"] >= 1 for t in workers)


def test_paper_configs_fit_the_gpu_workers():
    """4 train workers x 1 GPU and their CPUs fit what the cluster files provide."""
    kube = kuberay_cluster_specs()["RayCluster"]
    group = next(g for g in kube["workerGroupSpecs"] if g["groupName"] == "gpu")
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    for name in ("paper_x4_setting1", "paper_x4_setting2"):
        cfg = load_config(CONFIGS / f"{name}.yaml")
        assert cfg.train.num_workers <= group["maxReplicas"] * gpus_per_pod(group)
        cpus = cfg.train.num_workers * cfg.train.cpus_per_worker + cfg.data.data_cpus
        assert cpus <= group["maxReplicas"] * float(limits["cpu"]), name


# ---- entry points and the configs they name ----------------------------------------------


def image_workdir() -> str:
    return docker_value("WORKDIR")[-1]


def commands_in_cluster_files() -> list[tuple[str, str]]:
    """(file, command) for every `python -m workflows.X ...` written in cluster/ (comments too)."""
    out = [(str(RAYJOB), load(RAYJOB)["spec"]["entrypoint"])]
    for path in sorted(CLUSTER.rglob("*")):
        if path.is_file():
            text = re.sub(r"\\\n\s*#?\s*", " ", path.read_text())
            out += [(str(path), m.group(0)) for m in re.finditer(r"python -m workflows\.\w+[^\n`|]*", text)]
    return out


def repo_path(path: str) -> Path:
    """A config path as a command names it: inside the image (WORKDIR) or relative to the repo."""
    workdir = image_workdir().rstrip("/") + "/"
    return REPO / path.removeprefix(workdir) if path.startswith(workdir) else REPO / path


def test_entry_points_exist_and_the_configs_they_name_load(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    commands = commands_in_cluster_files()
    assert len(commands) >= 3
    for where, command in commands:
        words = shlex.split(command)
        module = words[words.index("-m") + 1]
        spec = importlib.util.find_spec(module)
        assert spec is not None, f"{where}: {module} does not exist"
        assert "def main(" in Path(spec.origin).read_text(), f"{where}: {module} has no main()"
        if "--config" in words:
            path = repo_path(words[words.index("--config") + 1])
            assert path.is_file(), f"{where}: {path} does not exist"
            load_config(path)


def test_rayjob_names_the_config_inside_the_image():
    words = shlex.split(load(RAYJOB)["spec"]["entrypoint"])
    assert words[:3] == ["python", "-m", "workflows.pipeline"]
    assert words[words.index("--config") + 1].startswith(image_workdir() + "/")


# ---- environment variables and secrets ---------------------------------------------------


def names_read_by_workflows() -> set[str]:
    text = "\n".join(p.read_text() for p in (REPO / "workflows").rglob("*.py"))
    return set(re.findall(r"\b[A-Z][A-Z0-9]*_[A-Z0-9_]+\b", text))


def library_reads(name: str, package: str) -> bool:
    root = Path(importlib.util.find_spec(package).origin).parent
    return any(name in p.read_text(errors="ignore") for p in root.rglob("*.py"))


def test_every_variable_we_set_is_read_by_workflows_or_a_library():
    ours = names_read_by_workflows()
    for name, where in every_variable_we_set():
        if name in ours or name in PYTHON_VARIABLES:
            continue
        assert name in LIBRARY_VARIABLES, f"{where} sets {name}, which nothing reads"
        assert library_reads(name, LIBRARY_VARIABLES[name]), f"{LIBRARY_VARIABLES[name]} does not read {name}"


def test_every_cluster_provides_the_mlflow_uri_the_paper_configs_rely_on(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert "MLFLOW_TRACKING_URI" in names_read_by_workflows()
    for name in ("paper_x4_setting1", "paper_x4_setting2"):
        cfg = load_config(CONFIGS / f"{name}.yaml")
        with pytest.raises(ConfigError, match=r"tracking\.uri"):
            _ = cfg.tracking_uri
    assert launcher_env()["MLFLOW_TRACKING_URI"].startswith("http")
    settings = load(SETTINGS)["data"]
    for where, container in containers():
        env = {entry["name"]: entry for entry in container["env"]}
        ref = env["MLFLOW_TRACKING_URI"]["valueFrom"]["configMapKeyRef"]
        assert ref["name"] == load(SETTINGS)["metadata"]["name"], where
        assert ref["key"] in settings, where


def test_launcher_region_matches_the_provider_region():
    assert launcher_env()["AWS_REGION"] == load(LAUNCHER)["provider"]["region"]


def test_s3_credentials_come_from_a_secret_and_settings_from_the_configmap():
    settings = load(SETTINGS)
    for where, container in containers():
        env = {entry["name"]: entry for entry in container["env"]}
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert "value" not in env[name], where
            assert env[name]["valueFrom"]["secretKeyRef"]["key"] == name, where
        for entry in env.values():
            ref = entry.get("valueFrom", {}).get("configMapKeyRef")
            if ref and not ref.get("optional"):
                assert ref["name"] == settings["metadata"]["name"] and ref["key"] in settings["data"], where


def test_no_secret_values_in_cluster_files_or_the_image():
    for name, where in every_variable_we_set():
        if SECRET_NAME.search(name):
            assert where.startswith(("RayCluster/", "RayJob/")), f"{where} sets the secret {name}"
    for where, container in containers():
        for entry in container["env"]:
            if SECRET_NAME.search(entry["name"]):
                assert "value" not in entry and "secretKeyRef" in entry["valueFrom"], where
    assert not any(SECRET_NAME.search(name) for name in load(SETTINGS)["data"])
    for keyword in ("ARG", "ENV"):
        for rest in docker_value(keyword):
            assert not SECRET_NAME.search(rest), f"Dockerfile {keyword} {rest}"
    files = [p for p in CLUSTER.rglob("*") if p.is_file()] + [DOCKERFILE, REPO / ".dockerignore"]
    for path in files:
        text = path.read_text()
        assert not re.search(r"\b(AKIA|ASIA)[A-Z0-9]{16}\b", text), f"{path} holds an AWS key id"
        assert not re.search(r"(?i)(secret|password|token)\w*\s*[:=]\s*['\"]?[A-Za-z0-9/+]{16,}", text), path


def test_runtime_env_installs_exactly_the_pyproject_pins_except_ray():
    wanted = {name: req for name, req in dependencies().items() if name != "ray"}
    listed = load(RUNTIME_ENV)["pip"]["packages"]
    assert sorted(listed) == sorted(wanted.values())


def test_runtime_env_leaves_local_state_out_of_the_upload():
    excludes = {e.rstrip("/") for e in load(RUNTIME_ENV)["excludes"]}
    assert {".git", ".venv", "data", "runs", "mlruns"} <= excludes


# ---- who can reach the cluster, and with what rights -------------------------------------

README = CLUSTER / "README.md"
LOOPBACK = {"127.0.0.1", "localhost"}


def ray_start_options(command: str) -> dict[str, str]:
    """`--name=value` / `--name value` options of the `ray start` in a shell command line."""
    words = shlex.split(command.replace(";", " ; "))
    start = words.index("start", words.index("ray"))
    options, rest = {}, words[start + 1 :]
    for i, word in enumerate(rest):
        if word.startswith("--"):
            name, eq, value = word[2:].partition("=")
            options[name] = value if eq else (rest[i + 1] if i + 1 < len(rest) else "")
    return options


def readme_policies() -> list[dict]:
    """Every ```json block of cluster/README.md that is an IAM policy document."""
    blocks = re.findall(r"```json\n(.*?)```", README.read_text(), re.DOTALL)
    policies = [json.loads(block) for block in blocks]
    return [p for p in policies if p.get("Version") == "2012-10-17" and "Statement" in p]


def statements_allowing(action: str) -> list[dict]:
    out = []
    for policy in readme_policies():
        for statement in policy["Statement"]:
            actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
            if statement["Effect"] == "Allow" and action in actions:
                out.append(statement)
    return out


def test_launcher_dashboard_is_on_loopback_and_behind_token_auth():
    config = load(LAUNCHER)
    (command,) = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    options = ray_start_options(command)
    assert "head" in options
    assert options.get("dashboard-host", "localhost") in LOOPBACK, command  # Ray's default is localhost
    assert launcher_env()["RAY_AUTH_MODE"] == "token"
    # Every node gets the one token at Ray's default path for the image's user (`ray`, home /home/ray).
    assert config["file_mounts"].get("/home/ray/.ray/auth_token") == "~/.ray/auth_token"
    assert "ray get-auth-token --generate" in LAUNCHER.read_text() + README.read_text()


def test_kuberay_dashboards_need_the_token_and_are_not_exposed_outside_the_cluster():
    for kind, spec in kuberay_cluster_specs().items():
        assert spec["authOptions"]["mode"] == "token", kind
        head = spec["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP", kind
        assert "ingress" not in {k.lower() for k in head}, kind


def test_launcher_head_and_workers_have_their_own_instance_profiles():
    nodes = load(LAUNCHER)["available_node_types"]
    head = nodes[load(LAUNCHER)["head_node_type"]]["node_config"]["IamInstanceProfile"]["Name"]
    workers = {
        name: node["node_config"]["IamInstanceProfile"]["Name"]
        for name, node in nodes.items()
        if name != load(LAUNCHER)["head_node_type"]
    }
    assert workers and head not in workers.values()
    assert set(workers.values()) == {"lightbsr-s3-access"}
    text = README.read_text()
    assert f"`{head}`" in text and "`lightbsr-s3-access`" in text


def test_documented_head_policy_may_pass_exactly_the_workers_role():
    (statement,) = statements_allowing("iam:PassRole")
    workers = {
        node["node_config"]["IamInstanceProfile"]["Name"]
        for name, node in load(LAUNCHER)["available_node_types"].items()
        if name != load(LAUNCHER)["head_node_type"]
    }
    resources = statement["Resource"] if isinstance(statement["Resource"], list) else [statement["Resource"]]
    assert [r.rpartition(":role/")[2] for r in resources] == sorted(workers)
    assert "*" not in "".join(resources).rpartition(":role/")[2]
    assert statement["Condition"]["StringEquals"]["iam:PassedToService"] == "ec2.amazonaws.com"
    assert statements_allowing("ec2:RunInstances") and statements_allowing("ec2:TerminateInstances")
    assert statements_allowing("s3:PutObject") and statements_allowing("s3:GetObject")


# ---- run configs -------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_run_config_loads_and_validates(path):
    from lightbsr.protocols import PROTOCOLS

    raw = load(path)
    assert isinstance(raw, dict) and raw, path
    cfg = load_config(path)
    assert set(cfg.evaluate.protocols) <= set(PROTOCOLS), path


@pytest.mark.parametrize("setting", [1, 2])
def test_paper_configs_follow_the_papers_recipe(setting):
    cfg = load_config(CONFIGS / f"paper_x4_setting{setting}.yaml")
    assert (cfg.model.scale, cfg.model.setting) == (4, setting)
    assert (cfg.model.n_groups, cfg.model.n_blocks, cfg.model.queue_size) == (8, 8, 8192)
    assert (cfg.train.batch_size, cfg.data.patch_size, cfg.data.views) == (64, 64, 4)
    assert (cfg.schedule.epochs, cfg.schedule.iters_per_epoch) == (700, 970)
    assert (cfg.schedule.phase1_epochs, cfg.schedule.warmup_epochs) == (100, 5)
    assert (cfg.schedule.lr, cfg.schedule.min_lr, cfg.schedule.beta2) == (2e-4, 1e-6, 0.99)
    assert cfg.train.use_gpu and cfg.train.precision == "bf16" and 4 <= cfg.train.num_workers <= 8
    assert all(u.startswith("s3://") for u in (cfg.storage.root, cfg.data.train_images, cfg.data.eval_images))
    assert cfg.tracking.uri is None
    assert ("aniso_x4" in cfg.evaluate.protocols) == (setting == 2)


def test_quickstart_and_tiny_run_locally_on_the_cpu():
    paper = load_config(CONFIGS / "paper_x4_setting1.yaml")
    for name in ("quickstart", "tiny"):
        cfg = load_config(CONFIGS / f"{name}.yaml")
        assert not cfg.train.use_gpu and cfg.ray.address is None, name
        assert "://" not in cfg.storage.root and cfg.data.train_images.endswith("data/samples/train"), name
        smaller = cfg.model.n_groups * cfg.model.n_blocks < paper.model.n_groups * paper.model.n_blocks
        assert smaller and cfg.schedule.epochs * cfg.schedule.iters_per_epoch < 1000, name
