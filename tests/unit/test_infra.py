"""The infrastructure definitions parse, agree with the repository, and hold no secrets.

Kubernetes core objects and the pod templates inside the Ray CRDs are checked against the Kubernetes
schemas of `kubernetes-validate` when it is installed; the cluster-launcher config against the JSON
schema that ships with Ray. Nothing here talks to a cluster.
"""

import importlib.util
import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
K8S_FILES = sorted((INFRA / "k8s").glob("*.yaml"))
AWS_CONFIG = INFRA / "aws" / "cluster.yaml"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
CLUSTER_DOC = REPO / "docs" / "cluster.md"
RAY_KINDS = {"RayCluster", "RayJob", "RayService"}
# The custom Ray resource of the CPU preprocessing nodes (dragonfly_platform.data.DataConfig).
PREPROCESS_RESOURCE = "cpu_preprocess"
GPUS_PER_NODE = 8
JOB_NAMES = {"train", "sweep", "evaluate", "promote"}
SECRET_NAME = re.compile(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY|PRIVATE)", re.IGNORECASE)


def _documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _k8s_objects() -> list[tuple[Path, dict]]:
    return [
        (path, doc) for path in K8S_FILES for doc in _documents(path) if doc.get("kind") != "Kustomization"
    ]


def _of_kind(kind: str) -> list[dict]:
    return [doc for _, doc in _k8s_objects() if doc["kind"] == kind]


def _raycluster() -> dict:
    (cluster,) = _of_kind("RayCluster")
    return cluster


def _pod_templates(doc: dict) -> list[tuple[str, dict]]:
    """(where, pod template) for every pod the object creates."""
    spec = doc.get("spec", {})
    if doc["kind"] == "RayCluster":
        groups = [("head", spec["headGroupSpec"]["template"])]
        groups += [(group["groupName"], group["template"]) for group in spec["workerGroupSpecs"]]
        return groups
    if doc["kind"] == "RayJob":
        return [("submitter", spec["submitterPodTemplate"])] if "submitterPodTemplate" in spec else []
    if doc["kind"] in ("Deployment", "StatefulSet"):
        return [(doc["metadata"]["name"], spec["template"])]
    return []


def _containers(template: dict) -> list[dict]:
    pod = template["spec"]
    return pod.get("containers", []) + pod.get("initContainers", [])


def _all_containers() -> list[tuple[str, dict]]:
    return [
        (
            f"{doc['kind']}/{doc['metadata'].get('name', doc['metadata'].get('generateName'))}:{where}",
            container,
        )
        for _, doc in _k8s_objects()
        for where, template in _pod_templates(doc)
        for container in _containers(template)
    ]


def _gpu_request(container: dict) -> int:
    resources = container.get("resources", {})
    values = {
        int(part.get("nvidia.com/gpu", 0))
        for part in (resources.get("requests", {}), resources.get("limits", {}))
    }
    assert len(values) == 1, f"GPU requests and limits differ: {resources}"
    return values.pop()


# ------------------------------------------------------------------------------------- Kubernetes


@pytest.mark.parametrize("path", K8S_FILES, ids=lambda path: path.name)
def test_every_manifest_parses_into_named_objects(path):
    documents = _documents(path)
    assert documents, f"{path.name} is empty"
    for doc in documents:
        assert {"apiVersion", "kind"} <= doc.keys(), f"{path.name}: object without apiVersion/kind"
        if doc["kind"] != "Kustomization":
            assert doc["metadata"].get("name") or doc["metadata"].get("generateName")


def test_ray_objects_use_ray_io_v1_and_all_jobs_are_defined():
    ray_objects = [doc for _, doc in _k8s_objects() if doc["kind"] in RAY_KINDS]
    assert {doc["apiVersion"] for doc in ray_objects} == {"ray.io/v1"}
    assert len(_of_kind("RayCluster")) == 1
    components = {doc["metadata"]["labels"]["app.kubernetes.io/component"] for doc in _of_kind("RayJob")}
    assert components == {f"job-{name}" for name in JOB_NAMES}


def test_kustomization_lists_existing_files_and_the_project_image():
    (kustomization,) = _documents(INFRA / "k8s" / "kustomization.yaml")
    for resource in kustomization["resources"]:
        assert (INFRA / "k8s" / resource).exists(), resource
    image_names = {image["name"] for image in kustomization["images"]}
    for where, container in _all_containers():
        name = container["image"].split(":")[0]
        assert name in image_names or name == "postgres", f"{where} uses an image kustomize does not set"


def _entrypoint_paths(entrypoint: str) -> list[str]:
    words = shlex.split(entrypoint)
    assert words[0] == "python" and words[1].startswith("jobs/"), entrypoint
    return [word for word in words[1:] if word.startswith("jobs/")]


def test_rayjob_entrypoints_reference_scripts_and_configs_that_exist():
    for job in _of_kind("RayJob"):
        paths = _entrypoint_paths(job["spec"]["entrypoint"])
        assert len(paths) >= 2 or "evaluate" in paths[0], f"no recipe in {job['spec']['entrypoint']}"
        for path in paths:
            assert (REPO / path).is_file(), f"{job['metadata']['generateName']}: {path} is not in the repo"
            if path.startswith("jobs/configs/"):
                base = yaml.safe_load((REPO / path).read_text()).get("base")
                if isinstance(base, str):  # a sweep names its training recipe
                    assert (REPO / path).with_name(base).is_file(), f"{path}: base {base} missing"


def test_rayjobs_target_the_raycluster():
    cluster_name = _raycluster()["metadata"]["name"]
    for job in _of_kind("RayJob"):
        assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster_name}
        assert "rayClusterSpec" not in job["spec"]


def test_gpus_are_requested_only_by_the_gpu_group():
    spec = _raycluster()["spec"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no tasks on the head
    gpu_groups = [group for group in spec["workerGroupSpecs"] if "gpu" in group["groupName"]]
    cpu_groups = [group for group in spec["workerGroupSpecs"] if "gpu" not in group["groupName"]]
    assert len(gpu_groups) == 1 and cpu_groups
    for group in gpu_groups:
        assert [_gpu_request(c) for c in _containers(group["template"])] == [GPUS_PER_NODE]
        assert "num-gpus" not in group["rayStartParams"] or group["rayStartParams"]["num-gpus"] == "8"
    for group in cpu_groups:
        assert group["rayStartParams"]["num-gpus"] == "0"
        resources = json.loads(json.loads(group["rayStartParams"]["resources"]))
        assert resources.get(PREPROCESS_RESOURCE, 0) > 0
    gpu_pods = {
        f"RayCluster/{_raycluster()['metadata']['name']}:{group['groupName']}" for group in gpu_groups
    }
    for where, container in _all_containers():
        if where not in gpu_pods:
            assert _gpu_request(container) == 0, f"{where} requests GPUs outside the GPU group"


def test_worker_groups_have_autoscaling_bounds():
    spec = _raycluster()["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    for group in spec["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]


def test_credentials_only_through_secrets():
    secret_refs = set()
    for where, container in _all_containers():
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                secret_refs.add(ref["name"])
            elif SECRET_NAME.search(env["name"]):
                raise AssertionError(f"{where}: {env['name']} has a literal value; use a secretKeyRef")
            # A value may splice a secret in via $(VAR), but never contain one literally.
            assert not re.search(r"://[^:/@$]+:[^@$(]+@", env.get("value", "")), f"{where}: {env['name']}"
    assert not _of_kind("Secret"), "Secrets are created by hand (docs/cluster.md), never committed"
    # Every Secret the manifests need is explained in the guide.
    guide = CLUSTER_DOC.read_text()
    for name in secret_refs:
        assert name in guide, f"docs/cluster.md does not say how to create Secret {name}"


def test_ray_token_auth_through_kuberay_auth_options():
    """The operator hands the token to every Ray container (the autoscaler sidecar too) and uses it
    for its own job-status calls only when `authOptions` says so; the RayJob submitters, which run
    outside the cluster's pods, read the same Secret under KubeRay's key name."""
    auth = _raycluster()["spec"]["authOptions"]
    assert auth["mode"] == "token"
    for where, container in _all_containers():
        env = {e["name"]: e for e in container.get("env", [])}
        if where.startswith("RayCluster/"):
            assert "RAY_AUTH_TOKEN" not in env, f"{where}: the operator sets the token"
        elif ":submitter" in where:
            assert env["RAY_AUTH_MODE"]["value"] == "token", where
            assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {
                "name": auth["secretName"],
                "key": "auth_token",
            }, where


def test_submitter_shell_variables_are_set_in_the_submitter():
    """KubeRay pastes a RayJob's entrypoint into its submitter pod's shell: a `$VAR` there expands
    in that pod, so it must be in the submitter's env (a runtime-env variable is set too late)."""
    for job in _of_kind("RayJob"):
        used = set(re.findall(r"\$\{?([A-Z_][A-Z0-9_]*)", job["spec"]["entrypoint"]))
        (template,) = [t for where, t in _pod_templates(job) if where == "submitter"]
        env = {e["name"] for c in _containers(template) for e in c.get("env", [])}
        assert used <= env, f"{job['metadata']['generateName']}: {sorted(used - env)} unset in the submitter"


def test_job_runtime_env_ships_the_checkouts_platform_package():
    """`--working-dir .` alone puts `dragonfly` and `jobs` on the path but not the platform package
    (installed from platform/ under its own name): the runtime env must ship it as a py_module."""
    runtime_env = yaml.safe_load((INFRA / "runtime_env.yaml").read_text())
    assert runtime_env["working_dir"] == "."
    package_dir = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    shipped = {Path(module).name: module for module in runtime_env["py_modules"]}
    for name, source in package_dir.items():
        if name != "" and source != name:  # installed under another name than its folder's
            assert shipped.get(name) == source, f"{name} ({source}) is not in py_modules"
            assert (REPO / source / "__init__.py").is_file()


def test_no_secret_material_anywhere_in_infra():
    patterns = {
        "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
        "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
        "hex token": re.compile(r"\b[0-9a-f]{40,}\b"),
        "literal secret": re.compile(
            r"(secret[_-]?access[_-]?key|password|auth[_-]?token)\s*[:=]\s*['\"]?[A-Za-z0-9/+]{8,}", re.I
        ),
    }
    for path in sorted(p for p in INFRA.rglob("*") if p.is_file()):
        text = path.read_text()
        for what, pattern in patterns.items():
            assert not pattern.search(text), f"{path.relative_to(REPO)} contains a {what}"


def test_dashboard_and_services_are_not_public():
    assert not _of_kind("Ingress")
    for service in _of_kind("Service"):
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP", service["metadata"]["name"]
    assert _raycluster()["spec"]["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"


def test_core_objects_and_pod_templates_match_the_kubernetes_schema():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    version = "1.33"
    for _, doc in _k8s_objects():
        if doc["kind"] not in RAY_KINDS:
            kubernetes_validate.validate(doc, version, strict=True)
        for where, template in _pod_templates(doc):
            wrapped = {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": where},
                "template": template,
            }
            kubernetes_validate.validate(wrapped, version, strict=True)


# ----------------------------------------------------------------------------- cluster launcher


def _aws() -> dict:
    return yaml.safe_load(AWS_CONFIG.read_text())


def test_aws_config_matches_rays_cluster_launcher_schema():
    import jsonschema

    schema_path = (
        Path(importlib.util.find_spec("ray").submodule_search_locations[0]) / "autoscaler" / "ray-schema.json"
    )
    jsonschema.validate(_aws(), json.loads(schema_path.read_text()))


def test_aws_config_has_cpu_and_gpu_node_types():
    config = _aws()
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    gpu_types = {name for name, node in types.items() if node["resources"].get("GPU")}
    cpu_types = {name for name, node in types.items() if node["resources"].get(PREPROCESS_RESOURCE)}
    assert gpu_types and cpu_types and not gpu_types & cpu_types
    assert {types[name]["resources"]["GPU"] for name in gpu_types} == {GPUS_PER_NODE}
    assert {types[name]["node_config"]["InstanceType"] for name in gpu_types} <= {
        "p5.48xlarge",
        "p5e.48xlarge",
        "p5en.48xlarge",
    }
    for name, node in types.items():
        if name != config["head_node_type"]:
            assert 0 <= node["min_workers"] <= node["max_workers"] <= config["max_workers"], name
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start


# ------------------------------------------------------------------------------------ Dockerfile


def _pins(lines) -> dict[str, str]:
    """`name==version` requirement strings -> {normalised name: version}."""
    pins = {}
    for line in lines:
        match = re.match(r"^\s*([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==([^\s;,#]+)", line)
        if match:
            pins[re.sub(r"[-_.]+", "-", match.group(1)).lower()] = match.group(3)
    return pins


def _lock() -> dict[str, str]:
    return _pins((REPO / "requirements.lock").read_text().splitlines())


def _pyproject_pins() -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return _pins(project["dependencies"])


def _dockerfile_instructions() -> list[str]:
    # Joined continuation lines, comments dropped.
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_pyproject_pins_agree_with_the_lock():
    lock = _lock()
    for name, version in _pyproject_pins().items():
        assert lock.get(name) == version, (
            f"{name}: pyproject pins {version}, requirements.lock {lock.get(name)}"
        )


def test_dockerfile_installs_the_project_with_the_lock_as_constraints():
    installs = [line for line in _dockerfile_instructions() if re.search(r"\bpip install\b", line)]
    project_installs = [line for line in installs if re.search(r"\s\.(\s|$)", line)]
    assert project_installs, "the Dockerfile never installs the project (`pip install ... .`)"
    for line in project_installs:
        assert re.search(r"(-c|--constraint)\s+requirements\.lock", line), line
        assert "--no-deps" not in line and " -e " not in line, line
    copies = " ".join(line for line in _dockerfile_instructions() if line.startswith("COPY"))
    for needed in ("pyproject.toml", "requirements.lock", "dragonfly/", "platform/", "jobs/"):
        assert needed in copies, f"the image does not copy {needed}"
    lock = _lock()
    for name, version in _pins(" ".join(installs).split()).items():
        if name in lock:
            assert lock[name] == version, f"Dockerfile pins {name}=={version}, requirements.lock {lock[name]}"


def _torch_cuda_major() -> int:
    # torch/version.py says which CUDA the installed build targets, without importing torch.
    spec = importlib.util.find_spec("torch")
    text = (Path(spec.submodule_search_locations[0]) / "version.py").read_text()
    match = re.search(r"^cuda(?:: [^=]+)? = '(\d+)\.", text, re.M)
    assert match, "the installed torch is not a CUDA build"
    return int(match.group(1))


def test_dockerfile_base_image_cuda_matches_torchs_build():
    from importlib.metadata import version

    assert version("torch").split("+")[0] == _pyproject_pins()["torch"], (
        "installed torch is not the pinned one"
    )
    (base,) = [
        re.search(r"nvidia/cuda:(\d+)\.(\d+)", line)
        for line in _dockerfile_instructions()
        if "nvidia/cuda:" in line
    ]
    assert base, "the base image is not an nvidia/cuda image"
    assert int(base.group(1)) == _torch_cuda_major()
    assert "devel" in _dockerfile_instructions()[0] or any(
        "devel" in line for line in _dockerfile_instructions()[:2]
    )


def test_dockerfile_python_is_one_the_project_supports():
    (arg,) = [line for line in _dockerfile_instructions() if line.startswith("ARG PYTHON_VERSION=")]
    minor = int(arg.split("=")[1].split(".")[1])
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    low, high = (int(v) for v in re.findall(r"3\.(\d+)", requires))
    assert low <= minor < high


# ---------------------------------------------------------------------------------- local + docs


def test_stack_script_wraps_the_services_cli():
    script = INFRA / "local" / "stack.sh"
    assert script.stat().st_mode & 0o111, "stack.sh is not executable"
    assert "-m dragonfly_platform.services" in script.read_text()


def test_cluster_guide_references_files_that_exist():
    guide = CLUSTER_DOC.read_text()
    referenced = set(
        re.findall(r"\b((?:infra|jobs|docs)/[\w./-]+\.(?:ya?ml|py|sh|md)|infra/docker/Dockerfile)\b", guide)
    )
    assert referenced, "docs/cluster.md references no repository files"
    missing = sorted(path for path in referenced if not (REPO / path).exists())
    assert not missing, f"docs/cluster.md references missing files: {missing}"
