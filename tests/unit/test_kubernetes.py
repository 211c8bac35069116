"""deploy/kubernetes is a set Kubernetes and KEDA would accept, and one that runs Sluice as
declared: every built-in kind validates strictly against the Kubernetes schemas
(kubernetes-validate), the KEDA resources against the documented fields they use, and the
references between them (Deployment ↔ ScaledObject ↔ TriggerAuthentication ↔ Secret, queue
names, ports, settings) against Sluice's own code. No cluster is needed.
"""

from __future__ import annotations

import functools
import importlib.resources
import inspect
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate
import pytest
import yaml
from referencing import Registry, Resource

from contracts import routing
from contracts.pipeline import BUILTIN, DEFAULT_STAGE_NAMES, DEFAULT_STAGES, SIDE_STAGES
from contracts.settings import Settings
from gateway.http.services import refuse_open_exposure
from stages.runtime.runner import StageRunner

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
# The oldest Kubernetes the set targets and the newest kubernetes-validate ships schemas for.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
KEDA_API = "keda.sh/v1alpha1"
# The Sluice namespace (SLUICE_NAMESPACE) the ScaledObjects' queue names are built with.
SLUICE_NAMESPACE = "sluice"
PLACEHOLDER = "CHANGE-ME"
# The operator's filled copy of secret.example.yaml: git-ignored, real values, never read here.
FILLED_SECRET = "secret.yaml"
EXAMPLE_SECRET = "secret.example.yaml"
# Every stage a deployment runs: the default pipeline, then the side stages (the webhook).
PROCESSES = (*DEFAULT_STAGE_NAMES, *(spec.name for spec in SIDE_STAGES))

Doc = dict[str, Any]


def _manifest_files() -> list[Path]:
    skip = {"kustomization.yaml", FILLED_SECRET}
    return sorted(p for p in DEPLOY.glob("*.yaml") if p.name not in skip)


def _load() -> list[tuple[str, Doc]]:
    found: list[tuple[str, Doc]] = []
    for path in _manifest_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                found.append((path.name, doc))
    return found


DOCS = _load()


def _id(entry: tuple[str, Doc]) -> str:
    name, doc = entry
    return f"{name}:{doc['kind']}/{doc['metadata']['name']}"


def _of(kind: str) -> dict[str, Doc]:
    return {d["metadata"]["name"]: d for _, d in DOCS if d["kind"] == kind}


def _only(kind: str) -> Doc:
    docs = list(_of(kind).values())
    assert len(docs) == 1, f"the set needs exactly one {kind}, has {len(docs)}"
    return docs[0]


def _containers(deployment: Doc) -> list[Doc]:
    containers: list[Doc] = deployment["spec"]["template"]["spec"]["containers"]
    return containers


def _argv(deployment: Doc) -> list[str]:
    """What the first container runs. The image has no ENTRYPOINT, only `CMD sluice gateway`,
    so `command` (or `args`, which replaces CMD) must start with `sluice`."""
    container = _containers(deployment)[0]
    return [str(a) for a in (*container.get("command", []), *container.get("args", []))]


def _stage_of(deployment: Doc) -> str | None:
    """The stage a Deployment runs (`sluice stage NAME`), or None for anything else."""
    argv = _argv(deployment)
    return argv[2] if argv[:2] == ["sluice", "stage"] and len(argv) == 3 else None


def _stage_deployments() -> dict[str, Doc]:
    found: dict[str, Doc] = {}
    for deployment in _of("Deployment").values():
        stage = _stage_of(deployment)
        if stage is not None:
            assert stage not in found, f"two Deployments run stage {stage}"
            found[stage] = deployment
    return found


def _gateway() -> Doc:
    gateways = [d for d in _of("Deployment").values() if _argv(d) == ["sluice", "gateway"]]
    assert len(gateways) == 1, "the set needs exactly one gateway Deployment"
    return gateways[0]


def _secret_values() -> dict[str, str]:
    secret = _only("Secret")
    return {k: str(v) for k, v in secret.get("stringData", {}).items()}


def _pod_env(container: Doc) -> dict[str, str]:
    """The environment a container starts with, as Kubernetes builds it: envFrom in order,
    then env on top (literal values only; references are checked elsewhere)."""
    config_maps = _of("ConfigMap")
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(config_maps[source["configMapRef"]["name"]].get("data", {}))
        if "secretRef" in source:
            assert source["secretRef"]["name"] == _only("Secret")["metadata"]["name"]
            env.update(_secret_values())
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
    return env


def _settings(container: Doc) -> Settings:
    """The Settings this container's process starts with; raises if any SLUICE_* is wrong."""
    given = {
        key.removeprefix("SLUICE_").lower(): value
        for key, value in _pod_env(container).items()
        if key.startswith("SLUICE_")
    }
    settings = Settings.model_validate(given)
    settings.check()
    return settings


# --- Kubernetes' own kinds ------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("entry", [e for e in DOCS if e[1]["apiVersion"] != KEDA_API], ids=_id)
def test_builtin_kinds_validate_strictly(entry: tuple[str, Doc], version: str) -> None:
    """Each built-in resource matches its Kubernetes schema; strict, so a misspelt or
    misplaced field fails instead of being dropped by the API server."""
    _, doc = entry
    try:
        used = kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as error:
        where, message = ".".join(map(str, error.absolute_path)), error.message
    else:
        assert used == version.rsplit(".", 1)[0], f"no {version} schemas; validated with {used}"
        return
    # Outside the handler: the message and where, not the whole schema jsonschema would print.
    pytest.fail(f"{where}: {message}")


def test_only_known_kinds() -> None:
    """Every document is a built-in kind or one of the two KEDA kinds checked below."""
    keda = {d["kind"] for _, d in DOCS if d["apiVersion"] == KEDA_API}
    assert keda <= {"ScaledObject", "TriggerAuthentication"}, keda


# --- KEDA's kinds: the documented fields this set relies on ---------------------------------
# From keda.sh/docs (ScaledObject specification, RabbitMQ Queue scaler, TriggerAuthentication).
# Closed objects on purpose: a field KEDA does not document there fails here.

_K8S = "https://kubernetes.io/api/_definitions.json#/$defs/"
_TEXT = {"type": "string", "minLength": 1}
_NUMBER_TEXT = {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"}
_METADATA = {"$ref": _K8S + "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}


def _closed(required: list[str], **properties: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "required": required,
        "additionalProperties": False,
        "properties": properties,
    }


# Trigger metadata is a string map in KEDA's CRD; these are the RabbitMQ scaler's keys.
_RABBITMQ_METADATA = {
    **_closed(
        ["protocol", "queueName", "mode", "value"],
        host=_TEXT,
        hostFromEnv=_TEXT,
        protocol={"enum": ["amqp", "http", "auto"]},
        mode={
            "enum": [
                "QueueLength",
                "MessageRate",
                "DeliverGetRate",
                "PublishedToDeliveredRatio",
                "ExpectedQueueConsumptionTime",
            ]
        },
        value=_NUMBER_TEXT,
        activationValue=_NUMBER_TEXT,
        queueName=_TEXT,
        vhostName={"type": "string"},
        useRegex={"enum": ["true", "false"]},
        excludeUnacknowledged={"enum": ["true", "false"]},
        unsafeSsl={"enum": ["true", "false"]},
        timeout=_NUMBER_TEXT,
    ),
    # The broker URL carries a password: it comes from the TriggerAuthentication, never here.
    "not": {"anyOf": [{"required": ["host"]}, {"required": ["hostFromEnv"]}]},
}
_TRIGGER = _closed(
    ["type", "metadata", "authenticationRef"],
    type={"const": "rabbitmq"},
    name=_TEXT,
    metadata=_RABBITMQ_METADATA,
    authenticationRef=_closed(
        ["name"],
        name=_TEXT,
        kind={"enum": ["TriggerAuthentication", "ClusterTriggerAuthentication"]},
    ),
    metricType={"enum": ["AverageValue", "Value"]},
    useCachedMetrics={"type": "boolean"},
)
_COUNT = {"type": "integer", "minimum": 0}
SCALED_OBJECT = _closed(
    ["apiVersion", "kind", "metadata", "spec"],
    apiVersion={"const": KEDA_API},
    kind={"const": "ScaledObject"},
    metadata=_METADATA,
    spec=_closed(
        ["scaleTargetRef", "triggers"],
        scaleTargetRef=_closed(
            ["name"],
            apiVersion={"const": "apps/v1"},
            kind={"const": "Deployment"},
            name=_TEXT,
            envSourceContainerName=_TEXT,
        ),
        pollingInterval={"type": "integer", "minimum": 1},
        cooldownPeriod=_COUNT,
        initialCooldownPeriod=_COUNT,
        idleReplicaCount={"const": 0},
        minReplicaCount=_COUNT,
        maxReplicaCount={"type": "integer", "minimum": 1},
        fallback=_closed(
            ["failureThreshold", "replicas"],
            failureThreshold={"type": "integer", "minimum": 1},
            replicas=_COUNT,
            behavior={
                "enum": [
                    "static",
                    "currentReplicas",
                    "currentReplicasIfHigher",
                    "currentReplicasIfLower",
                ]
            },
        ),
        advanced=_closed(
            [],
            restoreToOriginalReplicaCount={"type": "boolean"},
            horizontalPodAutoscalerConfig=_closed(
                [],
                name=_TEXT,
                # KEDA hands this to the HPA as is: Kubernetes' own schema for it.
                behavior={
                    "$ref": _K8S + "io.k8s.api.autoscaling.v2.HorizontalPodAutoscalerBehavior"
                },
            ),
        ),
        triggers={"type": "array", "minItems": 1, "items": _TRIGGER},
    ),
)
TRIGGER_AUTHENTICATION = _closed(
    ["apiVersion", "kind", "metadata", "spec"],
    apiVersion={"const": KEDA_API},
    kind={"const": "TriggerAuthentication"},
    metadata=_METADATA,
    spec=_closed(
        ["secretTargetRef"],
        secretTargetRef={
            "type": "array",
            "minItems": 1,
            "items": _closed(["parameter", "name", "key"], parameter=_TEXT, name=_TEXT, key=_TEXT),
        },
    ),
)
KEDA_SCHEMAS = {"ScaledObject": SCALED_OBJECT, "TriggerAuthentication": TRIGGER_AUTHENTICATION}


@functools.cache
def _kubernetes_definitions() -> Registry[Any]:
    """Kubernetes' strict definitions, so the KEDA schemas can point at ObjectMeta and HPA."""
    version = KUBERNETES_VERSIONS[-1]
    path = (
        importlib.resources.files("kubernetes_validate")
        / "kubernetes-json-schema"
        / f"v{version}-local-strict"
        / "_definitions.json"
    )
    definitions: Resource[Any] = Resource.from_contents(json.loads(path.read_text()))
    uri = definitions.id()
    assert uri == _K8S.split("#")[0], uri
    registry: Registry[Any] = Registry().with_resource(uri, definitions)
    return registry


@pytest.mark.parametrize("entry", [e for e in DOCS if e[1]["apiVersion"] == KEDA_API], ids=_id)
def test_keda_resources_match_their_documented_spec(entry: tuple[str, Doc]) -> None:
    """ScaledObjects and TriggerAuthentications use KEDA's documented fields, typed as KEDA
    types them (trigger metadata values are strings, replica counts integers)."""
    _, doc = entry
    schema = KEDA_SCHEMAS[doc["kind"]]
    validator = jsonschema.Draft202012Validator(schema, registry=_kubernetes_definitions())
    errors = [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)
    ]
    assert not errors, errors


def test_the_keda_schema_can_fail() -> None:
    """The schemas above reject what they must: a misspelt key, a number where KEDA wants
    text, a broker URL in the ScaledObject."""
    validator = jsonschema.Draft202012Validator(SCALED_OBJECT, registry=_kubernetes_definitions())
    good = next(iter(_of("ScaledObject").values()))
    metadata = good["spec"]["triggers"][0]["metadata"]
    for bad in ({"queuename": "x"}, {"value": 5}, {"host": "amqp://u:p@h/"}):
        broken = json.loads(json.dumps(good))
        broken["spec"]["triggers"][0]["metadata"] = {**metadata, **bad}
        assert not validator.is_valid(broken), bad


# --- the set hangs together -----------------------------------------------------------------


def _triggers_by_queue(scaled: Doc) -> dict[str, Doc]:
    """A ScaledObject's triggers by the queue each one watches."""
    return {t["metadata"]["queueName"]: t for t in scaled["spec"]["triggers"]}


@pytest.mark.parametrize("stage", PROCESSES)
def test_every_stage_has_a_deployment_scaled_on_both_lanes(stage: str) -> None:
    """Each stage of the default pipeline, and each side stage, runs as its own Deployment
    (`sluice stage NAME`), scaled by exactly one ScaledObject on that stage's own queues:
    one trigger per lane (`sluice.stage.NAME` and `sluice.stage.NAME.bulk`), alike."""
    deployments = _stage_deployments()
    assert stage in deployments, f"no Deployment runs `sluice stage {stage}`"
    name = deployments[stage]["metadata"]["name"]
    scaled = [
        s for s in _of("ScaledObject").values() if s["spec"]["scaleTargetRef"]["name"] == name
    ]
    assert len(scaled) == 1, f"{name} needs one ScaledObject, has {len(scaled)}"
    triggers = _triggers_by_queue(scaled[0])
    lanes = {routing.stage_queue(SLUICE_NAMESPACE, stage, lane) for lane in routing.LANES}
    assert triggers.keys() == lanes, triggers.keys() ^ lanes
    assert len(scaled[0]["spec"]["triggers"]) == len(lanes), "one trigger per lane"
    for trigger in triggers.values():
        assert trigger["type"] == "rabbitmq"
        metadata = trigger["metadata"]
        assert metadata["mode"] == "QueueLength"
        assert metadata["protocol"] == "amqp"
    assert len({t["metadata"]["value"] for t in triggers.values()}) == 1, "lanes scale alike"


def test_no_deployment_runs_an_undeclared_stage() -> None:
    """A Deployment's stage is a built-in one."""
    for stage in _stage_deployments():
        assert stage in BUILTIN, stage


def test_scaled_objects_point_at_what_exists() -> None:
    """Every ScaledObject scales a Deployment of the set (not the gateway, which KEDA has no
    queue for) and authenticates through a TriggerAuthentication of the set, which reads an
    existing key of the Secret as the broker `host`."""
    deployments = _of("Deployment")
    auths = _of("TriggerAuthentication")
    gateway = _gateway()["metadata"]["name"]
    for name, scaled in _of("ScaledObject").items():
        target = scaled["spec"]["scaleTargetRef"]["name"]
        assert target in deployments, f"{name} scales {target}, which the set lacks"
        assert target != gateway, f"{name} scales the gateway"
        assert "replicas" not in deployments[target]["spec"], f"{target}: KEDA owns the count"
        for trigger in scaled["spec"]["triggers"]:
            ref = trigger["authenticationRef"]
            assert ref.get("kind", "TriggerAuthentication") == "TriggerAuthentication"
            assert ref["name"] in auths, f"{name} names {ref['name']}, which the set lacks"
    secret = _only("Secret")
    for name, auth in auths.items():
        for ref in auth["spec"]["secretTargetRef"]:
            assert ref["name"] == secret["metadata"]["name"], name
            assert ref["key"] in _secret_values(), f"{name} reads {ref['key']}, not in the Secret"
        assert [r["parameter"] for r in auth["spec"]["secretTargetRef"]] == ["host"]
        # KEDA takes one URL; Sluice's may list several brokers.
        (key,) = [r["key"] for r in auth["spec"]["secretTargetRef"]]
        assert urlsplit(_secret_values()[key]).scheme in ("amqp", "amqps")
        assert "," not in _secret_values()[key]


def test_scaling_targets_follow_the_stages_costs() -> None:
    """Embed (the model) scales on fewer waiting messages per replica than any other stage;
    every stage keeps one replica and may grow."""
    deployments = _stage_deployments()
    target: dict[str, float] = {}
    for scaled in _of("ScaledObject").values():
        stage = _stage_of(_of("Deployment")[scaled["spec"]["scaleTargetRef"]["name"]])
        assert stage is not None
        target[stage] = min(float(t["metadata"]["value"]) for t in scaled["spec"]["triggers"])
        spec = scaled["spec"]
        assert 1 <= spec["minReplicaCount"] < spec["maxReplicaCount"], stage
    assert target.keys() == deployments.keys()
    assert target["embed"] < min(v for s, v in target.items() if s != "embed"), target
    assert target["embed"] < target["parse"], target


def test_env_comes_from_what_exists() -> None:
    """Every container's environment comes from the ConfigMap and Secret of the set (no
    reference to anything missing, nothing optional), and the two never name the same key."""
    config_maps = _of("ConfigMap")
    secrets = _of("Secret")
    for name, deployment in _of("Deployment").items():
        for container in _containers(deployment):
            sources = container.get("envFrom", [])
            assert sources, f"{name}: no envFrom"
            for source in sources:
                ref = source.get("configMapRef") or source.get("secretRef")
                assert ref, f"{name}: envFrom {source}"
                pool = config_maps if "configMapRef" in source else secrets
                assert ref["name"] in pool, f"{name}: envFrom names {ref['name']}"
                assert not ref.get("optional"), f"{name}: {ref['name']} must not be optional"
            for item in container.get("env", []):
                ref = item.get("valueFrom", {})
                if "configMapKeyRef" in ref:
                    key_ref = ref["configMapKeyRef"]
                    data = config_maps[key_ref["name"]].get("data", {})
                elif "secretKeyRef" in ref:
                    key_ref = ref["secretKeyRef"]
                    data = _secret_values()
                else:
                    assert "value" in item, f"{name}: env {item['name']} has no value"
                    continue
                assert key_ref["key"] in data, f"{name}: env {item['name']} reads a missing key"
    (config,) = config_maps.values()
    shared = config.get("data", {}).keys() & _secret_values().keys()
    assert not shared, f"both the ConfigMap and the Secret set {shared}"


def test_every_pod_starts_with_settings_sluice_accepts() -> None:
    """The environment each container gets passes Sluice's own start-up checks, with the
    scale-out backends chosen and the declared pipeline."""
    (config,) = _of("ConfigMap").values()
    assert config["data"]["SLUICE_STAGES"] == DEFAULT_STAGES
    for name, deployment in _of("Deployment").items():
        for container in _containers(deployment):
            settings = _settings(container)
            assert settings.namespace == SLUICE_NAMESPACE, name
            assert settings.host == "0.0.0.0", f"{name}: probes reach the pod IP, not loopback"
            for url in (settings.job_store_url, settings.index_url):
                assert urlsplit(url or "").scheme == "postgresql", f"{name}: {url}"
            assert urlsplit(settings.blob_store_url or "").scheme == "s3", name
            env = _pod_env(container)
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"):
                assert env.get(key), f"{name}: {key} unset"


def _port(container: Doc, ref: int | str) -> int:
    """The container port a probe or Service names (by number or by name)."""
    if isinstance(ref, int):
        return ref
    ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
    assert ref in ports, f"no container port named {ref}"
    return int(ports[ref])


@pytest.mark.parametrize("stage", PROCESSES)
def test_stage_pods_probe_their_metrics_port_and_outlast_the_drain(stage: str) -> None:
    """A stage pod is ready when its metrics port answers (the stage's SLUICE_<STAGE>_METRICS_PORT),
    and Kubernetes waits longer than the stage's drain before killing it."""
    deployment = _stage_deployments()[stage]
    (container,) = _containers(deployment)
    settings = _settings(container)
    assert stage in {spec.name for spec in settings.pipeline.processes}
    metrics_port = settings.stage(stage).metrics_port
    assert metrics_port == BUILTIN[stage].metrics_port
    probe = container["readinessProbe"]["httpGet"]
    assert _port(container, probe["port"]) == metrics_port
    assert probe["path"] == "/metrics"
    drain_s = inspect.signature(StageRunner.run).parameters["drain_timeout_s"].default
    grace_s = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace_s > drain_s, f"{stage}: {grace_s}s grace, {drain_s}s drain"


def test_gateway_is_replicated_probed_and_behind_a_service() -> None:
    """Two gateways or more, ready on /readyz, alive on /healthz, allowed to listen beyond
    loopback, behind a Service on port 80 that needs no session affinity."""
    gateway = _gateway()
    assert gateway["spec"]["replicas"] >= 2
    (container,) = _containers(gateway)
    settings = _settings(container)
    refuse_open_exposure(settings)
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert _port(container, container["readinessProbe"]["httpGet"]["port"]) == settings.port
    services = [
        s
        for s in _of("Service").values()
        if s["spec"]["selector"].items()
        <= gateway["spec"]["template"]["metadata"]["labels"].items()
    ]
    assert len(services) == 1, "one Service selects the gateway pods"
    (service,) = services
    (port,) = service["spec"]["ports"]
    assert port["port"] == 80
    assert _port(container, port["targetPort"]) == settings.port
    assert service["spec"].get("sessionAffinity", "None") == "None"


def test_selectors_pick_their_own_pods_only() -> None:
    """Each Deployment's selector matches its own pod labels and no other Deployment's."""
    deployments = _of("Deployment")
    for name, deployment in deployments.items():
        selector = deployment["spec"]["selector"]["matchLabels"].items()
        for other, candidate in deployments.items():
            labels = candidate["spec"]["template"]["metadata"]["labels"].items()
            assert (selector <= labels) == (other == name), f"{name} selects {other}'s pods"


_QUANTITY = re.compile(r"^(?P<n>[0-9.]+)(?P<unit>m|Ki|Mi|Gi)?$")
_SCALE = {None: 1.0, "m": 1e-3, "Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30}


def _quantity(value: str | int) -> float:
    match = _QUANTITY.match(str(value))
    assert match, f"unexpected quantity {value}"
    return float(match["n"]) * _SCALE[match["unit"]]


def test_resources_are_sized_for_each_role() -> None:
    """Every container requests CPU and memory and has a memory limit above its request;
    embed, which holds the model, gets the most memory; parse's limit sits above the cap its
    sandboxed worker enforces, so a hostile document fails alone, not the pod."""
    limit: dict[str, float] = {}
    for name, deployment in _of("Deployment").items():
        (container,) = _containers(deployment)
        resources = container["resources"]
        for key in ("cpu", "memory"):
            assert key in resources["requests"], f"{name}: no {key} request"
        memory = _quantity(resources["limits"]["memory"])
        assert memory >= _quantity(resources["requests"]["memory"]), name
        limit[_stage_of(deployment) or name] = memory
    assert limit["embed"] == max(limit.values()), limit
    parse_cap = _settings(_containers(_stage_deployments()["parse"])[0]).parse_memory_mb
    assert limit["parse"] > parse_cap * 2.0**20


def test_one_image_everywhere() -> None:
    """Every container runs the one Sluice image (the command picks the role)."""
    images = {c["image"] for d in _of("Deployment").values() for c in _containers(d)}
    assert images == {"sluice:local"}, images


# --- no secrets in the tree -----------------------------------------------------------------

_URL_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]+:(?P<password>[^@\s/]*)@", re.I)
_AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
_LONG_TOKEN = re.compile(r"[A-Za-z0-9+/]{40,}={0,2}")


def _text_of_every_file() -> Iterator[tuple[str, str]]:
    for path in sorted(DEPLOY.iterdir()):
        if path.is_file() and path.name != FILLED_SECRET:
            yield path.name, path.read_text()


def test_the_secret_is_a_template() -> None:
    """The only Secret is secret.example.yaml, in plain stringData, every value a visible
    placeholder; it holds every key Sluice needs from it."""
    files = {name for name, doc in DOCS if doc["kind"] == "Secret"}
    assert files == {EXAMPLE_SECRET}, files
    secret = _only("Secret")
    assert "data" not in secret, "base64 `data` hides what is in it: use stringData"
    values = _secret_values()
    needed = {
        "SLUICE_AMQP_URL",
        "SLUICE_JOB_STORE_URL",
        "SLUICE_INDEX_URL",
        "SLUICE_BLOB_STORE_URL",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "SLUICE_API_KEYS",
        # Pods share no disk: every webhook replica must sign with the one secret.
        "SLUICE_WEBHOOK_SECRET",
        # ... and every process must sign and check messages with the one secret.
        "SLUICE_MESSAGE_SECRET",
    }
    assert values.keys() == needed, values.keys() ^ needed
    for key, value in values.items():
        assert PLACEHOLDER in value, f"{key} is not a placeholder"


def test_no_file_carries_a_real_looking_secret() -> None:
    """No manifest (comments included) holds a password in a URL other than the placeholder,
    an AWS key id, or a long token; the ConfigMap holds no credential."""
    for name, text in _text_of_every_file():
        for match in _URL_PASSWORD.finditer(text):
            assert match["password"] == PLACEHOLDER, f"{name}: {match[0]}"
        assert not _AWS_KEY_ID.search(text), name
        token = _LONG_TOKEN.search(text)
        assert not token, f"{name}: {token[0] if token else ''}"
    (config,) = _of("ConfigMap").values()
    for key, value in config.get("data", {}).items():
        assert not re.search(r"PASSWORD|SECRET|TOKEN|API_KEY|ACCESS_KEY", key), key
        assert urlsplit(str(value)).password is None, key


def test_the_filled_secret_is_git_ignored_and_applied() -> None:
    """kustomization.yaml applies the operator's filled copy (so `kubectl apply -k` stops
    until it exists), and git never picks that copy up."""
    ignored = (DEPLOY / ".gitignore").read_text().split()
    assert FILLED_SECRET in ignored
    assert FILLED_SECRET in _kustomization()["resources"]


# --- kustomization --------------------------------------------------------------------------


def _kustomization() -> Doc:
    data: Doc = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    return data


def test_kustomization_lists_every_manifest_in_one_namespace() -> None:
    """`kubectl apply -k` applies every manifest (the Secret as its filled copy), into the
    namespace the set creates, which every resource names too."""
    kustomization = _kustomization()
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    files = {p.name for p in _manifest_files()} - {EXAMPLE_SECRET} | {FILLED_SECRET}
    resources = kustomization["resources"]
    assert len(resources) == len(set(resources))
    assert set(resources) == files, set(resources) ^ files
    namespace = _only("Namespace")["metadata"]["name"]
    assert kustomization["namespace"] == namespace
    for entry in DOCS:
        if entry[1]["kind"] != "Namespace":
            assert entry[1]["metadata"].get("namespace") == namespace, _id(entry)


def test_webhook_pods_sign_with_the_secret_from_the_secret() -> None:
    """The webhook stage's pods get SLUICE_WEBHOOK_SECRET from the Secret, so replicas (which
    share no disk to keep a made-up one in) all sign alike; the gateway and they read the
    same private-address rule from one ConfigMap."""
    (container,) = _containers(_stage_deployments()["webhook"])
    assert _settings(container).webhook_secret
    (gateway,) = _containers(_gateway())
    assert _settings(container).webhook_allow_private == _settings(gateway).webhook_allow_private


def test_every_sluice_pod_signs_messages_with_the_secret_from_the_secret() -> None:
    """Messages between Sluice processes are signed with SLUICE_MESSAGE_SECRET and checked by
    every consumer; pods share no disk to keep a made-up one in, so every gateway and stage
    pod gets it from the one Secret."""
    containers = [_containers(d)[0] for d in (_gateway(), *_stage_deployments().values())]
    secrets = {_settings(container).message_secret for container in containers}
    assert secrets == {_secret_values()["SLUICE_MESSAGE_SECRET"]}, secrets
