"""compose.yaml's `scale-out` profile runs Sluice as it runs on many machines: PostgreSQL with
pgvector, an S3 store (MinIO), two gateways and one process per default stage, every Sluice
process reaching shared state through URLs only, never through a disk another one mounts.

There is no Docker here: these tests read the file as compose would, with an empty
environment (every `${VAR:-default}` takes its default), and check what it says against the
pipeline declaration and against Sluice's own settings checks.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from contracts.pipeline import BUILTIN, DEFAULT_STAGE_NAMES
from contracts.settings import Settings
from gateway.http.services import refuse_open_exposure

COMPOSE_FILE = Path(__file__).resolve().parents[2] / "compose.yaml"
PROFILE = "scale-out"
# Compose's interpolation: `${VAR}`, `${VAR:-default}`, `${VAR-default}`; `$$` is a literal `$`.
_VARIABLE = re.compile(r"\$\$|\$\{(?P<name>\w+)(?::?-(?P<default>[^}]*))?\}")
# What the official images fall back to when no credentials are given.
DEFAULT_CREDENTIALS = {"guest", "minioadmin", "postgres", ""}


def _interpolate(value: Any) -> Any:
    """A value as compose sees it with no variables set: every default taken."""
    if isinstance(value, str):
        return _VARIABLE.sub(lambda m: "$" if m[0] == "$$" else (m["default"] or ""), value)
    if isinstance(value, list):
        return [_interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: _interpolate(v) for k, v in value.items()}
    return value


def _file() -> dict[str, Any]:
    data: dict[str, Any] = _interpolate(yaml.safe_load(COMPOSE_FILE.read_text()))
    return data


def _profile() -> dict[str, dict[str, Any]]:
    """The services `--profile scale-out` adds."""
    services: dict[str, dict[str, Any]] = _file()["services"]
    return {n: s for n, s in services.items() if PROFILE in s.get("profiles", [])}


def _command(service: dict[str, Any]) -> str:
    command = service.get("command", "")
    return " ".join(command) if isinstance(command, list) else str(command)


def _sluice() -> dict[str, dict[str, Any]]:
    """The profile's Sluice processes (gateways and stages), by the command they run."""
    return {n: s for n, s in _profile().items() if _command(s).startswith("sluice ")}


def _gateways() -> dict[str, dict[str, Any]]:
    return {n: s for n, s in _sluice().items() if _command(s) == "sluice gateway"}


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    assert isinstance(env, dict), "environment must use the mapping form"
    return {k: str(v) for k, v in env.items()}


def _settings(service: dict[str, Any]) -> Settings:
    """The Settings a process of this service starts with; raises if any SLUICE_* is wrong."""
    given = {
        key.removeprefix("SLUICE_").lower(): value
        for key, value in _env(service).items()
        if key.startswith("SLUICE_")
    }
    # Only what the file sets (not this test's environment); a variable naming no setting fails.
    settings = Settings.model_validate(given)
    settings.check()
    return settings


def _one(kind: str, predicate: Any) -> tuple[str, dict[str, Any]]:
    found = [(n, s) for n, s in _profile().items() if predicate(s)]
    assert len(found) == 1, f"the profile needs exactly one {kind}, has {[n for n, _ in found]}"
    return found[0]


def _postgres() -> tuple[str, dict[str, Any]]:
    return _one("PostgreSQL", lambda s: str(s.get("image", "")).startswith("pgvector/pgvector:"))


def _minio() -> tuple[str, dict[str, Any]]:
    return _one("MinIO server", lambda s: str(s.get("image", "")).startswith("minio/minio"))


def _bucket_job() -> tuple[str, dict[str, Any]]:
    return _one("bucket job", lambda s: str(s.get("image", "")).startswith("minio/mc"))


def test_profile_is_opt_in() -> None:
    """Plain `docker compose up` stays the embedded stack: every service of the profile is in
    that profile only, and the file says how to start it."""
    # PostgreSQL, MinIO, the bucket job, two gateways, one service per stage.
    assert len(_profile()) >= 3 + 2 + len(DEFAULT_STAGE_NAMES)
    for name, service in _profile().items():
        assert service["profiles"] == [PROFILE], name
    assert f"docker compose --profile {PROFILE} up" in COMPOSE_FILE.read_text()


def test_postgres_has_pgvector_a_healthcheck_and_its_own_volume() -> None:
    """PostgreSQL comes with pgvector, says when it accepts connections, keeps its data."""
    _, postgres = _postgres()
    assert "pg_isready" in postgres["healthcheck"]["test"]
    volumes = [str(v).split(":", 1)[0] for v in postgres.get("volumes", [])]
    assert any(v in _file()["volumes"] for v in volumes), "postgres data needs a named volume"
    env = _env(postgres)
    assert env.get("POSTGRES_PASSWORD", "") not in DEFAULT_CREDENTIALS


def test_minio_and_its_bucket() -> None:
    """MinIO serves /data behind a healthcheck with its own credentials; a one-shot job
    creates the bucket the blob store URL names, once MinIO is healthy."""
    minio_name, minio = _minio()
    assert _command(minio).startswith("server /data")
    assert minio.get("healthcheck", {}).get("test")
    env = _env(minio)
    for key in ("MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"):
        assert env.get(key, "") not in DEFAULT_CREDENTIALS, f"{key} falls back to the default"
    _, job = _bucket_job()
    assert job["depends_on"][minio_name]["condition"] == "service_healthy"
    script = " ".join([*job.get("entrypoint", []), _command(job)])
    buckets = {urlsplit(_env(s)["SLUICE_BLOB_STORE_URL"]).netloc for s in _sluice().values()}
    for bucket in buckets:
        assert re.search(rf"mc mb (--ignore-existing )?\S+/{bucket}\b", script), bucket


def test_at_least_two_gateways_that_may_listen() -> None:
    """Two gateways or more, each on its own host port, each allowed beyond loopback."""
    gateways = _gateways()
    assert len(gateways) >= 2, list(gateways)
    ports = [p.split(":")[0] for s in gateways.values() for p in s.get("ports", [])]
    assert len(ports) == len(set(ports)) >= len(gateways), f"host ports clash: {ports}"
    for name, gateway in gateways.items():
        settings = _settings(gateway)
        assert settings.host == "0.0.0.0", name
        refuse_open_exposure(settings)
        assert _env(gateway)["OTEL_SERVICE_NAME"] == "sluice-gateway", name


@pytest.mark.parametrize("stage", DEFAULT_STAGE_NAMES)
def test_one_service_per_default_stage(stage: str) -> None:
    """Each stage of the default pipeline runs as exactly one service of the profile."""
    running = [n for n, s in _sluice().items() if _command(s) == f"sluice stage {stage}"]
    assert len(running) == 1, f"services running `sluice stage {stage}`: {running}"
    service = _profile()[running[0]]
    assert _env(service)["OTEL_SERVICE_NAME"] == f"sluice-{stage}"
    assert stage in _settings(service).pipeline.names


def test_no_stage_service_outside_the_declaration() -> None:
    """A stage removed from the declaration leaves no scale-out service behind."""
    for name, service in _sluice().items():
        command = _command(service)
        if command.startswith("sluice stage "):
            assert command.removeprefix("sluice stage ") in BUILTIN, name


def test_every_sluice_service_points_at_postgres_and_s3() -> None:
    """Job store and index are the profile's PostgreSQL (with its credentials and database),
    blobs its MinIO bucket (with its credentials): nothing falls back to a local directory."""
    postgres_name, postgres = _postgres()
    pg_env = _env(postgres)
    minio_name, minio = _minio()
    minio_env = _env(minio)
    assert _sluice(), "the profile runs no Sluice process"
    for name, service in _sluice().items():
        settings = _settings(service)
        env = _env(service)
        for url in (settings.job_store_url, settings.index_url):
            assert url, f"{name}: job store and index need a URL"
            parts = urlsplit(url)
            assert parts.scheme == "postgresql", f"{name}: {url}"
            assert parts.hostname == postgres_name, f"{name}: {url}"
            assert parts.username == pg_env["POSTGRES_USER"], name
            assert parts.password == pg_env["POSTGRES_PASSWORD"], name
            assert parts.path.lstrip("/") == pg_env["POSTGRES_DB"], name
        blob = urlsplit(settings.blob_store_url or "")
        assert blob.scheme == "s3" and blob.netloc and blob.path.strip("/"), f"{name}: {blob}"
        assert urlsplit(env["AWS_ENDPOINT_URL"]).hostname == minio_name, name
        assert env["AWS_ACCESS_KEY_ID"] == minio_env["MINIO_ROOT_USER"], name
        assert env["AWS_SECRET_ACCESS_KEY"] == minio_env["MINIO_ROOT_PASSWORD"], name
        assert env.get("AWS_REGION"), name


def test_no_sluice_service_mounts_a_volume() -> None:
    """State lives in PostgreSQL and S3 only, so any process could run on any host: no
    Sluice service mounts a volume (nothing to share by accident)."""
    for name, service in _sluice().items():
        assert not service.get("volumes"), f"{name} mounts {service['volumes']}"
        assert not service.get("volumes_from"), name


def test_no_default_credentials() -> None:
    """No service of the profile connects with an image's default user or password."""
    for name, service in _profile().items():
        for key, value in _env(service).items():
            if "://" not in value:
                continue
            parts = urlsplit(value)
            if parts.username is not None:
                assert parts.username not in DEFAULT_CREDENTIALS, f"{name}: {key}"
                assert (parts.password or "") not in DEFAULT_CREDENTIALS, f"{name}: {key}"


def test_sluice_services_wait_for_healthy_backends() -> None:
    """Every Sluice process starts once the broker, PostgreSQL and MinIO are healthy and the
    bucket exists; those have healthchecks, so `service_healthy` means something."""
    services = _file()["services"]
    needs = {
        "rabbitmq": "service_healthy",
        _postgres()[0]: "service_healthy",
        _minio()[0]: "service_healthy",
        _bucket_job()[0]: "service_completed_successfully",
    }
    for dependency, condition in needs.items():
        if condition == "service_healthy":
            assert services[dependency].get("healthcheck", {}).get("test"), dependency
    for name, service in _sluice().items():
        depends = service.get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: depends_on must use the long form"
        for dependency, condition in needs.items():
            assert depends.get(dependency, {}).get("condition") == condition, (name, dependency)


def test_scale_out_pipeline_is_apart_from_the_embedded_one() -> None:
    """Services without a profile start too; the profile's processes use a namespace of their
    own on the shared broker, so an embedded stage never takes a scale-out message."""
    services = _file()["services"]
    embedded = {
        _settings(s).namespace
        for s in services.values()
        if not s.get("profiles") and _command(s).startswith("sluice ")
    }
    scale_out = {_settings(s).namespace for s in _sluice().values()}
    assert len(scale_out) == 1, scale_out
    assert not scale_out & embedded, f"both stacks use namespace {scale_out & embedded}"


def test_the_webhook_stage_runs_with_one_secret_for_every_replica() -> None:
    """The webhook side stage runs here too; with no shared disk its replicas cannot agree on
    a secret kept in a file, so the signing secret comes from the environment."""
    running = [n for n, s in _sluice().items() if _command(s) == "sluice stage webhook"]
    assert len(running) == 1, running
    settings = _settings(_profile()[running[0]])
    assert settings.webhook_secret, "scale-out webhook replicas need SLUICE_WEBHOOK_SECRET"
    assert _env(_profile()[running[0]])["OTEL_SERVICE_NAME"] == "sluice-webhook"


def test_every_process_signs_messages_with_one_secret() -> None:
    """With no disk shared, processes cannot agree on a message secret kept in a file: every
    gateway and stage of the profile is given the same SLUICE_MESSAGE_SECRET."""
    secrets = {_settings(service).message_secret for service in _sluice().values()}
    assert len(secrets) == 1 and None not in secrets, secrets
