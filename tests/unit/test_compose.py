"""compose.yaml runs the same stack as `sluice up`: broker, tracing, gateway and every stage of
the pipeline declaration (contracts/pipeline.py), so a stage added there shows up here too."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from contracts.pipeline import BUILTIN, DEFAULT_STAGE_NAMES, DEFAULT_STAGES, SIDE_STAGES, build

COMPOSE_FILE = Path(__file__).resolve().parents[2] / "compose.yaml"
INFRA = {"rabbitmq", "jaeger"}
# Its own stack with its own backends, checked by test_compose_scale_out.py.
SCALE_OUT = "scale-out"
# Side stages (the webhook) run beside every pipeline, like the default stages.
SIDE = tuple(spec.name for spec in SIDE_STAGES)
# Built-in stages that plain `docker compose up` leaves out (enrich): each behind its profile.
OPTIONAL = tuple(name for name in BUILTIN if name not in (*DEFAULT_STAGE_NAMES, *SIDE))


def _services() -> dict[str, dict[str, Any]]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    services: dict[str, dict[str, Any]] = data["services"]
    return {n: s for n, s in services.items() if SCALE_OUT not in s.get("profiles", [])}


def _command(service: dict[str, Any]) -> str:
    command = service.get("command", "")
    return " ".join(command) if isinstance(command, list) else str(command)


def _stage_service(stage: str) -> dict[str, Any]:
    """The one service that runs `sluice stage NAME`; it bears the stage's name."""
    running = {n: s for n, s in _services().items() if _command(s) == f"sluice stage {stage}"}
    assert list(running) == [stage], f"services running `sluice stage {stage}`: {list(running)}"
    return running[stage]


def _apps() -> dict[str, dict[str, Any]]:
    return {name: s for name, s in _services().items() if name not in INFRA}


def test_optional_stages_exist() -> None:
    """The declaration has an optional stage, so the profile checks below check something."""
    assert "enrich" in OPTIONAL


@pytest.mark.parametrize("stage", list(BUILTIN))
def test_every_declared_stage_has_a_service(stage: str) -> None:
    """Each built-in stage runs as its own service, named for its stage, traced as such."""
    service = _stage_service(stage)
    assert service["environment"]["OTEL_SERVICE_NAME"] == f"sluice-{stage}"


@pytest.mark.parametrize("stage", (*DEFAULT_STAGE_NAMES, *SIDE))
def test_default_stages_run_without_a_profile(stage: str) -> None:
    """Plain `docker compose up` runs the whole default pipeline and the side stages."""
    assert not _stage_service(stage).get("profiles"), stage


@pytest.mark.parametrize("stage", OPTIONAL)
def test_optional_stages_wait_for_their_profile(stage: str) -> None:
    """An optional stage runs only with `--profile NAME`, which the file says how to use."""
    assert _stage_service(stage).get("profiles") == [stage]
    text = COMPOSE_FILE.read_text()
    match = re.search(rf"SLUICE_STAGES=(\S+) docker compose --profile {stage} up", text)
    assert match, f"compose.yaml does not say how to turn {stage} on"
    # The pipeline the comment gives is one that runs, with the stage in it.
    assert stage in build(match[1]).names


def test_no_service_runs_an_undeclared_stage() -> None:
    """A stage removed from the declaration leaves no service behind."""
    for name, service in _services().items():
        command = _command(service)
        if command.startswith("sluice stage "):
            assert command.removeprefix("sluice stage ") in BUILTIN, name


def test_every_app_service_reads_the_same_pipeline() -> None:
    """SLUICE_STAGES reaches the gateway and every stage, defaulting to the declared pipeline."""
    apps = _apps()
    assert apps.keys() >= {"gateway", *BUILTIN}
    for name, service in apps.items():
        stages = service["environment"].get("SLUICE_STAGES")
        assert stages == f"${{SLUICE_STAGES:-{DEFAULT_STAGES}}}", name


def test_gateway_runs_the_gateway() -> None:
    """The gateway service runs `sluice gateway`."""
    gateway = _services()["gateway"]
    assert _command(gateway) == "sluice gateway"
    assert gateway["environment"]["OTEL_SERVICE_NAME"] == "sluice-gateway"


def test_app_services_wait_for_a_healthy_broker() -> None:
    """Every app service starts only once RabbitMQ reports healthy."""
    for name, service in _apps().items():
        depends = service.get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: depends_on must use the long form"
        assert depends.get("rabbitmq", {}).get("condition") == "service_healthy", name


def test_rabbitmq_is_healthchecked_and_not_guest() -> None:
    """RabbitMQ has a healthcheck and credentials other than guest/guest."""
    rabbitmq = _services()["rabbitmq"]
    assert rabbitmq.get("healthcheck", {}).get("test")
    env = rabbitmq.get("environment", {})
    for key in ("RABBITMQ_DEFAULT_USER", "RABBITMQ_DEFAULT_PASS"):
        assert key in env, f"{key} missing: the image would fall back to guest"
        assert "guest" not in str(env[key]), f"{key} must not be guest"
    for name, service in _services().items():
        url = str(service.get("environment", {}).get("SLUICE_AMQP_URL", ""))
        assert "guest" not in url, f"{name} connects as guest"


def test_jaeger_exists() -> None:
    """Traces have somewhere to go."""
    assert "jaeger" in _services()


def test_the_gateway_and_the_webhook_stage_read_one_private_address_rule() -> None:
    """The gateway checks a callback URL at upload and the webhook stage again at send time:
    both must read the same SLUICE_WEBHOOK_ALLOW_PRIVATE."""
    services = _services()
    rule = {
        n: services[n]["environment"].get("SLUICE_WEBHOOK_ALLOW_PRIVATE")
        for n in ("gateway", *SIDE)
    }
    assert len(set(rule.values())) == 1 and None not in rule.values(), rule
