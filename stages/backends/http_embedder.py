"""Sentence embeddings from an OpenAI-compatible `POST {url}/embeddings` endpoint."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import httpx

from contracts.errors import Permanent, Transient

# Statuses that say "not now" rather than "not this input": rate limits and request timeouts.
_RETRYABLE_4XX = {408, 429}


class HttpEmbedder:
    """An `Embedder` backed by a remote embeddings endpoint; one reused HTTP client per embedder."""

    def __init__(
        self,
        url: str,
        *,
        model: str,
        api_key: str | None = None,
        timeout_s: float = 30.0,
        batch_size: int = 64,
    ) -> None:
        self.endpoint = f"{url.rstrip('/')}/embeddings"
        self.model = model
        self.batch_size = batch_size
        # 0 until the first answer: probing at start-up would crash a stage whose endpoint is
        # briefly down, and that is exactly what the retry tiers are there to ride out.
        self.dimensions = 0
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(headers=headers, timeout=httpx.Timeout(timeout_s))

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One unit-length vector per text, in order."""
        vectors: list[list[float]] = []
        for start in range(0, len(texts), self.batch_size):
            vectors.extend(self._embed_batch(list(texts[start : start + self.batch_size])))
        return vectors

    def close(self) -> None:
        """Release the HTTP client's connections."""
        self._client.close()

    def _embed_batch(self, texts: list[str]) -> list[list[float]]:
        answer = self._post({"model": self.model, "input": texts})
        vectors = self._parse(answer, len(texts))
        return [self._normalised(v) for v in vectors]

    def _post(self, body: dict[str, Any]) -> httpx.Response:
        try:
            answer = self._client.post(self.endpoint, json=body)
        except httpx.TimeoutException as exc:
            raise Transient(
                f"the embeddings endpoint {self.endpoint} did not answer in time "
                f"({type(exc).__name__}); the batch will be retried — if this persists, check "
                "the endpoint's load or raise SLUICE_EMBED_TIMEOUT_S",
                code="embedding_unavailable",
            ) from exc
        except httpx.HTTPError as exc:
            raise Transient(
                f"the embeddings endpoint {self.endpoint} could not be reached "
                f"({type(exc).__name__}: {exc}); the batch will be retried — check that the "
                "endpoint is up and SLUICE_EMBED_URL points at it",
                code="embedding_unavailable",
            ) from exc
        status = answer.status_code
        if status >= 500 or status in _RETRYABLE_4XX:
            raise Transient(
                f"the embeddings endpoint {self.endpoint} answered HTTP {status} "
                f"({_error_detail(answer)}); the batch will be retried later",
                code="embedding_unavailable",
            )
        if status >= 400:
            hint = (
                "check SLUICE_EMBED_API_KEY"
                if status in (401, 403)
                else "check SLUICE_EMBED_MODEL_NAME and SLUICE_CHUNK_MAX_TOKENS against what "
                "the endpoint accepts"
            )
            raise Permanent(
                f"the embeddings endpoint {self.endpoint} rejected the input with HTTP {status} "
                f"({_error_detail(answer)}); retrying cannot help — {hint}, then replay the job",
                code="embedding_rejected",
            )
        return answer

    def _parse(self, answer: httpx.Response, expected: int) -> list[list[float]]:
        """The answer's vectors ordered by `index`; anything off is the backend's fault."""
        try:
            data = answer.json()["data"]
            by_index = {int(item["index"]): item["embedding"] for item in data}
        except (ValueError, KeyError, TypeError) as exc:
            raise self._malformed(f"it is not an embeddings answer ({exc!r})") from exc
        if len(data) != expected or sorted(by_index) != list(range(expected)):
            raise self._malformed(
                f"it holds {len(data)} embeddings with indexes {sorted(by_index)[:10]} "
                f"for {expected} inputs"
            )
        vectors = [by_index[i] for i in range(expected)]
        if not all(isinstance(v, list) for v in vectors):
            raise self._malformed("an embedding is not a list of numbers")
        dimensions = self.dimensions or len(vectors[0])
        if any(len(v) != dimensions for v in vectors):
            raise self._malformed(
                f"its vectors do not all have the {dimensions} dimensions this model gives"
            )
        self.dimensions = dimensions
        return vectors

    def _normalised(self, vector: list[Any]) -> list[float]:
        # Not every endpoint normalises; the index compares by cosine on unit vectors.
        try:
            values = [float(x) for x in vector]
        except (TypeError, ValueError) as exc:
            raise self._malformed("a vector holds something other than numbers") from exc
        norm = math.sqrt(math.fsum(x * x for x in values))
        if not math.isfinite(norm) or norm == 0.0:
            raise self._malformed(f"a vector has length {norm}, which cannot be normalised")
        return [x / norm for x in values]

    def _malformed(self, what: str) -> Transient:
        return Transient(
            f"the embeddings endpoint {self.endpoint} gave a malformed answer: {what}; the batch "
            "will be retried — if this persists, check that the endpoint is OpenAI-compatible",
            code="embedding_backend_error",
        )


def _error_detail(answer: httpx.Response) -> str:
    """The endpoint's own error message, short enough for a job's error field."""
    try:
        error = answer.json().get("error")
        message = error.get("message") if isinstance(error, dict) else error
    except (ValueError, AttributeError):
        message = None
    text = str(message) if message else answer.text.strip() or answer.reason_phrase
    return text[:300]
