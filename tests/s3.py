"""An S3 stand-in for the test suite: moto's standalone server, in a process of its own.

No real S3-compatible server installs on these machines, so tests that need "S3" (where
production would use AWS S3, MinIO or Ceph) talk to this emulator over HTTP on loopback.
Sluice itself only makes standard S3 calls through boto3; nothing in it knows about moto.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx

# Credentials the emulator accepts; any non-empty value does.
ACCESS_KEY = "sluice-test"
SECRET_KEY = "sluice-test-secret"
REGION = "us-east-1"


@dataclass
class S3StandIn:
    """A running emulator: its endpoint, and the environment a client needs to reach it."""

    process: subprocess.Popen[bytes]
    endpoint: str

    def env(self) -> dict[str, str]:
        """The standard AWS variables pointing a client at the emulator."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": REGION,
        }

    def bucket(self) -> str:
        """A new, empty bucket; returns its name."""
        import boto3

        name = f"sluice-{uuid.uuid4().hex[:10]}"
        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
        )
        client.create_bucket(Bucket=name)
        return name

    def close(self) -> None:
        """Stop the emulator."""
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_s3(log: Path) -> S3StandIn:
    """Start moto's server on a free loopback port; returns once it answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    moto = Path(sys.executable).parent / "moto_server"
    process = subprocess.Popen(
        [str(moto), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"moto_server exited with {process.returncode}: see {log}")
        try:
            httpx.get(endpoint, timeout=1)
            return S3StandIn(process, endpoint)
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"moto_server did not answer at {endpoint} in 30 s")
