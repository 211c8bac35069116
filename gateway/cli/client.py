"""A small async client for the Sluice HTTP API v1, used by `sluice ingest`, `search`, `jobs`
and `dlq`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx

from contracts.errors import SluiceError

Job = dict[str, Any]
TERMINAL_STATUSES = frozenset({"indexed", "failed"})

# A stream that breaks this often is given up for plain polling.
_STREAM_TRIES = 3
# The event stream only speaks when the job changes, so a quiet minute is normal: reconnect.
_STREAM_IDLE_S = 60.0
# How long polling rides out a gateway that is down (e.g. being restarted by `sluice up`).
_UNREACHABLE_GRACE_S = 30.0


class ApiError(SluiceError):
    """A 4xx/5xx answer from the gateway, parsed from its `{"error": {"code", "message"}}` body."""

    def __init__(
        self, code: str, message: str, status: int, retry_after: float | None = None
    ) -> None:
        super().__init__(message, code=code)
        self.status = status
        self.retry_after = retry_after

    @classmethod
    def from_response(cls, response: httpx.Response) -> ApiError:
        """Build the error from a read response, tolerating bodies that break the contract."""
        code, message = f"http_{response.status_code}", response.reason_phrase
        try:
            body = response.json()
            code, message = str(body["error"]["code"]), str(body["error"]["message"])
        except (ValueError, KeyError, TypeError):
            if response.text.strip():
                message = response.text.strip()[:300]
        return cls(code, message, response.status_code, _retry_after(response))


class GatewayUnreachable(SluiceError):
    """Nothing accepts connections at the gateway URL."""

    code = "gateway_unreachable"

    def __init__(self, url: str) -> None:
        super().__init__(f"no Sluice gateway answers at {url}; start it with `sluice up`")
        self.url = url


class TransportFailed(SluiceError):
    """A connection was made but the exchange broke (timeout, reset, malformed answer)."""

    code = "transport_error"


class _StreamUnusable(Exception):
    """The event stream cannot be used; `permanent` means stop trying it for this job."""

    def __init__(self, permanent: bool) -> None:
        super().__init__()
        self.permanent = permanent


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return max(0.0, float(response.headers["Retry-After"]))
    except (KeyError, ValueError):
        # Absent, or the HTTP-date form, which Sluice does not send.
        return None


class SluiceClient:
    """Typed calls to one Sluice gateway; use as `async with SluiceClient(url, key) as c:`."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout_s: float = 30.0,
        poll_interval_s: float = 1.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.poll_interval_s = poll_interval_s
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout_s),
            limits=httpx.Limits(max_connections=200, max_keepalive_connections=20),
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self._http.request(method, url, **kwargs)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise GatewayUnreachable(self.base_url) from exc
        except httpx.TransportError as exc:
            raise TransportFailed(f"{method} {url} failed: {exc!r}") from exc
        if response.status_code >= 400:
            raise ApiError.from_response(response)
        return response

    async def ping(self) -> None:
        """Raise `GatewayUnreachable` unless something answers HTTP at the gateway URL."""
        try:
            await self._http.get("/healthz")
        except httpx.TransportError as exc:
            raise GatewayUnreachable(self.base_url) from exc

    async def upload(
        self, path: Path, collection: str = "default", *, priority: str = "interactive"
    ) -> Job:
        """Upload one file; the answer is the 202 (new job) or 200 (`duplicate: true`) body."""
        # Streamed from disk rather than read whole, so 100 MiB uploads keep memory flat.
        handle = await asyncio.to_thread(path.open, "rb")
        try:
            response = await self._request(
                "POST",
                "/v1/documents",
                files={"file": (path.name, handle)},
                data={"collection": collection, "priority": priority},
            )
        finally:
            handle.close()
        job: Job = response.json()
        return job

    async def job(self, job_id: str) -> Job:
        """The job's current state."""
        job: Job = (await self._request("GET", f"/v1/jobs/{job_id}")).json()
        return job

    async def jobs(
        self,
        *,
        status: str | None = None,
        collection: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
        stalled: bool | None = None,
    ) -> dict[str, Any]:
        """One page of jobs, newest first: `{"jobs": [...], "next_cursor": str | None}`."""
        params = {
            "status": status,
            "collection": collection,
            "limit": limit,
            "cursor": cursor,
            "stalled": None if stalled is None else str(stalled).lower(),
        }
        query = {key: value for key, value in params.items() if value is not None}
        page: dict[str, Any] = (await self._request("GET", "/v1/jobs", params=query)).json()
        return page

    async def search(
        self, query: str, *, collection: str = "default", k: int = 5
    ) -> list[dict[str, Any]]:
        """The `k` chunks that best match `query`, best first."""
        params = {"q": query, "collection": collection, "k": k}
        body = (await self._request("GET", "/v1/search", params=params)).json()
        results: list[dict[str, Any]] = body["results"]
        return results

    async def collection(self, name: str) -> dict[str, Any]:
        """One collection: documents, chunks, serving generation and settings, its reindex."""
        body: dict[str, Any] = (await self._request("GET", f"/v1/collections/{name}")).json()
        return body

    async def start_reindex(self, name: str, settings: dict[str, Any]) -> dict[str, Any]:
        """Start re-indexing a collection with the settings given; the reindex (202)."""
        response = await self._request("POST", f"/v1/collections/{name}/reindex", json=settings)
        body: dict[str, Any] = response.json()
        return body

    async def cancel_reindex(self, name: str) -> dict[str, Any]:
        """Cancel a collection's reindex; the reindex, now cancelled."""
        body: dict[str, Any] = (
            await self._request("DELETE", f"/v1/collections/{name}/reindex")
        ).json()
        return body

    async def pipeline(self) -> dict[str, Any]:
        """Every stage's lanes, rates and workers (`GET /v1/pipeline`)."""
        body: dict[str, Any] = (await self._request("GET", "/v1/pipeline")).json()
        return body

    async def dead_letters(self) -> list[dict[str, Any]]:
        """Every dead letter this key may see, oldest first."""
        body = (await self._request("GET", "/v1/dead-letters")).json()
        letters: list[dict[str, Any]] = body["dead_letters"]
        return letters

    async def replay_dead_letters(
        self, *, stage: str | None = None, job_id: str | None = None, all: bool = False
    ) -> dict[str, Any]:
        """Send matching dead letters back to their stage: `{"replayed": n, "jobs": [...]}`."""
        selector = {"stage": stage, "job_id": job_id, "all": all or None}
        body = {key: value for key, value in selector.items() if value is not None}
        answer: dict[str, Any] = (
            await self._request("POST", "/v1/dead-letters/replay", json=body)
        ).json()
        return answer

    async def follow(self, job_id: str) -> AsyncIterator[Job]:
        """Yield the job each time it changes until it is `indexed` or `failed`.

        Listens on the SSE stream; when that breaks, polls, and reconnects to the stream
        a few times before settling for polling.
        """
        last: Job | None = None
        stream_tries = 0
        while True:
            if stream_tries < _STREAM_TRIES:
                try:
                    async for job in self._events(job_id):
                        if job != last:
                            last = job
                            yield job
                        if job.get("status") in TERMINAL_STATUSES:
                            return
                    stream_tries += 1
                except httpx.ReadTimeout:
                    pass
                except _StreamUnusable as exc:
                    stream_tries = _STREAM_TRIES if exc.permanent else stream_tries + 1
                except httpx.TransportError:
                    stream_tries += 1
            job = await self._poll(job_id)
            if job != last:
                last = job
                yield job
            if job.get("status") in TERMINAL_STATUSES:
                return
            await asyncio.sleep(self.poll_interval_s)

    async def _poll(self, job_id: str) -> Job:
        deadline = asyncio.get_running_loop().time() + _UNREACHABLE_GRACE_S
        while True:
            try:
                return await self.job(job_id)
            except (GatewayUnreachable, TransportFailed):
                if asyncio.get_running_loop().time() > deadline:
                    raise
            except ApiError as exc:
                if exc.status < 500 or asyncio.get_running_loop().time() > deadline:
                    raise
            await asyncio.sleep(self.poll_interval_s)

    async def _events(self, job_id: str) -> AsyncIterator[Job]:
        timeout = httpx.Timeout(self._http.timeout.connect, read=_STREAM_IDLE_S)
        url = f"/v1/jobs/{job_id}/events"
        headers = {"Accept": "text/event-stream"}
        async with self._http.stream("GET", url, headers=headers, timeout=timeout) as response:
            if response.status_code >= 400:
                await response.aread()
                error = ApiError.from_response(response)
                if error.code == "job_not_found" or error.status in (401, 403):
                    raise error
                raise _StreamUnusable(permanent=error.status < 500)
            if not response.headers.get("content-type", "").startswith("text/event-stream"):
                raise _StreamUnusable(permanent=True)
            async for event, data in _sse_events(response.aiter_lines()):
                if event == "status":
                    job: Job = json.loads(data)
                    yield job


async def _sse_events(lines: AsyncIterator[str]) -> AsyncIterator[tuple[str, str]]:
    """(event, data) pairs from server-sent-event lines, per the WHATWG framing rules."""
    event = "message"
    data: list[str] = []
    async for line in lines:
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            event = value
        elif field == "data":
            data.append(value)
