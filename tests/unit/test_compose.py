"""compose.yaml runs the same stack as `sluice up`: broker, tracing, gateway and every stage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

COMPOSE_FILE = Path(__file__).resolve().parents[2] / "compose.yaml"
STAGES = ("parse", "chunk", "embed", "index")
INFRA = {"rabbitmq", "jaeger"}


def _services() -> dict[str, dict[str, Any]]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    services: dict[str, dict[str, Any]] = data["services"]
    return services


def _command(service: dict[str, Any]) -> str:
    command = service.get("command", "")
    return " ".join(command) if isinstance(command, list) else str(command)


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_has_a_service(stage: str) -> None:
    """Each stage runs as its own service with `sluice stage NAME`."""
    commands = [_command(s) for s in _services().values()]
    assert any(f"sluice stage {stage}" in c for c in commands), commands


def test_gateway_runs_the_gateway() -> None:
    """The gateway service runs `sluice gateway`."""
    assert "sluice gateway" in _command(_services()["gateway"])


def test_app_services_wait_for_a_healthy_broker() -> None:
    """Every app service starts only once RabbitMQ reports healthy."""
    apps = {name: s for name, s in _services().items() if name not in INFRA}
    assert apps.keys() >= {"gateway", *STAGES}
    for name, service in apps.items():
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
