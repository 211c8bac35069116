"""The embed stage on a GPU: the raw model's chunks/s per batch size in fp16 and fp32, then
the real embed stage process draining a backlog from a private RabbitMQ, as one table.

`bash bench/gpu.sh` (installs what it needs) or `python -m bench.gpu`; `--device cpu` runs
the same steps on CPU, `--quick` with tiny sizes (how the tests run it). See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

from aio_pika.abc import AbstractIncomingMessage
from broker import PrivateBroker
from pipeline import sluice_command

from bench.answer_time import paragraph
from contracts import routing
from contracts.messages import Chunk, ChunkBatch
from contracts.routing import BULK
from contracts.settings import Settings
from stages.backends.embedder import SentenceTransformerEmbedder, on_cuda
from stages.infra.broker import Broker

# No CUDA device visible (or a CPU build of torch) and `--device cpu` not given.
REFUSED = 2
# The raw model's precisions; the stage runs as deployed (fp16 on CUDA, fp32 on CPU).
PRECISIONS = ("fp16", "fp32")


@dataclass(frozen=True)
class Sizes:
    """How much each phase embeds."""

    texts: int
    # Words per chunk text, drawn in this range.
    words: tuple[int, int]
    batch_sizes: tuple[int, ...]
    # Timed passes over the texts per batch size; the best one is reported.
    repeats: int
    messages: int
    chunks_per_message: int
    deadline_s: float


# 180-215 words are ~200-250 tokens with the model's tokenizer: chunks as the chunk stage cuts
# them (at most 256 tokens, SLUICE_CHUNK_MAX_TOKENS).
FULL = Sizes(8192, (180, 215), (32, 64, 128, 256, 512), 3, 1000, 64, 300.0)
# A smoke test of every step, small enough for a test on a busy CPU.
QUICK = Sizes(4, (20, 30), (2, 4), 1, 3, 2, 120.0)


@dataclass(frozen=True)
class Row:
    """One line of the table."""

    phase: str
    precision: str
    batch: int
    chunks: int
    seconds: float
    gpu_util: str = "n/a"
    note: str = ""

    @property
    def chunks_per_s(self) -> float:
        """The rate this row measured."""
        return self.chunks / self.seconds


def texts(count: int, words: tuple[int, int], seed: str = "gpu-bench") -> list[str]:
    """`count` texts of the corpus generator's prose, of `words` words (lengths varied)."""
    rng = random.Random(seed)
    return [paragraph(rng, rng.randint(*words)) for _ in range(count)]


def synchronize(device: str) -> None:
    """Wait for the GPU's queued work, so a timer measures it (nothing to wait for on CPU)."""
    if on_cuda(device):
        import torch

        torch.cuda.synchronize()


def raw_model(device: str, sample: list[str], sizes: Sizes) -> list[Row]:
    """`SentenceTransformerEmbedder.embed` over `sample`, per precision and batch size."""
    rows: list[Row] = []
    for precision in PRECISIONS:
        embedder = SentenceTransformerEmbedder(
            None, device, sizes.batch_sizes[0], half=precision == "fp16"
        )
        for size in sizes.batch_sizes:
            embedder.batch_size = size
            # Warm-up: lazy initialisation (kernels chosen per shape, the allocator, thread
            # pools) is not the model's speed.
            embedder.embed(sample[: 2 * size])
            best = float("inf")
            for _ in range(sizes.repeats):
                synchronize(device)
                started = time.perf_counter()
                embedder.embed(sample)
                synchronize(device)
                best = min(best, time.perf_counter() - started)
            rows.append(Row("raw model", precision, size, len(sample), best))
            print(
                f"gpu.py: raw {precision} batch {size}: {len(sample) / best:.0f} chunks/s",
                file=sys.stderr,
                flush=True,
            )
        del embedder
        if on_cuda(device):
            import torch

            torch.cuda.empty_cache()
    return rows


def mean_tokens(sample: Sequence[str]) -> float:
    """The sample's mean length in the model's tokens (as truncated at its maximum)."""
    from transformers import AutoTokenizer

    from stages.backends.embedder import max_seq_length, packaged_model_dir

    model_dir = packaged_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    limit = max_seq_length(model_dir)
    lengths = [min(len(ids), limit) for ids in tokenizer(list(sample))["input_ids"]]
    return statistics.fmean(lengths)


class GpuSampler:
    """`nvidia-smi`'s GPU utilisation, sampled while a phase runs (none without it)."""

    def __init__(self, every_s: float = 0.25) -> None:
        self.every_s = every_s
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._smi = shutil.which("nvidia-smi")

    def _run(self) -> None:
        assert self._smi is not None
        query = [self._smi, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
        # The GPU torch calls cuda:0 (nvidia-smi itself ignores CUDA_VISIBLE_DEVICES).
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
        query += ["-i", visible or "0"]
        while not self._stop.wait(self.every_s):
            answer = subprocess.run(query, capture_output=True, text=True, check=False)
            first = answer.stdout.strip().splitlines()[:1]
            if answer.returncode == 0 and first and first[0].strip().isdigit():
                self.samples.append(int(first[0]))

    @contextmanager
    def sampling(self) -> Iterator[None]:
        """Sample for as long as the `with` block runs."""
        if self._smi is not None:
            self._thread.start()
        try:
            yield
        finally:
            self._stop.set()
            if self._thread.is_alive():
                self._thread.join()

    def summary(self) -> str:
        """Mean and max utilisation in percent, or why there is none."""
        if self._smi is None:
            return "n/a (no nvidia-smi)"
        if not self.samples:
            return "n/a (no sample)"
        return f"{statistics.fmean(self.samples):.0f} mean, {max(self.samples)} max"


def backlog(sample: list[str], sizes: Sizes) -> list[ChunkBatch]:
    """`sizes.messages` chunk batches of `sizes.chunks_per_message` texts, bulk lane (an
    import's backlog), cycling through `sample`."""
    batches = []
    per = sizes.chunks_per_message
    for m in range(sizes.messages):
        doc = uuid.uuid4().hex
        chunks = [
            Chunk(chunk_id=f"{doc}:{i}", chunk_index=i, text=sample[(m * per + i) % len(sample)])
            for i in range(per)
        ]
        batches.append(
            ChunkBatch(
                job_id=uuid.uuid4().hex,
                document_id=doc,
                collection="gpu-bench",
                filename=f"backlog-{m:05d}.txt",
                priority=BULK,
                batch_index=0,
                batch_count=1,
                chunks_total=per,
                chunks=chunks,
            )
        )
    return batches


async def _fill(broker: Broker, batches: list[ChunkBatch]) -> None:
    """Publish the backlog onto the embed stage's queue, confirmed, before it starts."""
    for start in range(0, len(batches), 100):
        group = batches[start : start + 100]
        await asyncio.gather(*(broker.publish(b, routing.DOC_CHUNKED) for b in group))


async def _drain(
    settings: Settings,
    batches: list[ChunkBatch],
    start_stage: Callable[[], subprocess.Popen[bytes]],
    sampler: GpuSampler,
    deadline_s: float,
) -> float:
    """Queue the backlog, watch the stage, start it: seconds from its first heartbeat (sent
    as it starts consuming, once its model is loaded: start-up is not throughput) to its
    last output."""
    broker = Broker(settings)
    await broker.connect()
    try:
        await _fill(broker, batches)
        print(
            f"gpu.py: {len(batches)} batches queued; starting the embed stage",
            file=sys.stderr,
            flush=True,
        )
        channel = await broker.consumer_channel(prefetch=1000)
        exchange = await channel.get_exchange(routing.exchange(settings.namespace))
        # A queue of our own on the stage's heartbeats and output keys (one per batch).
        watch = await channel.declare_queue(exclusive=True)
        await watch.bind(exchange, routing.heartbeat_key("embed"))
        for lane in routing.LANES:
            await watch.bind(exchange, routing.lane_key(routing.DOC_EMBEDDED, lane))
        consuming, done = asyncio.Event(), asyncio.Event()
        started = 0.0
        arrived = 0

        async def count(delivery: AbstractIncomingMessage) -> None:
            nonlocal arrived, started
            if delivery.routing_key == routing.heartbeat_key("embed"):
                if not consuming.is_set():
                    started = time.perf_counter()
                    consuming.set()
                return
            arrived += 1
            if arrived == len(batches):
                done.set()

        await watch.consume(count, no_ack=True)
        stage = start_stage()
        loop = asyncio.get_running_loop()
        limit = loop.time() + deadline_s
        while not consuming.is_set():
            if stage.poll() is not None:
                raise RuntimeError(f"the embed stage exited with {stage.returncode}")
            if loop.time() > limit:
                raise TimeoutError("the embed stage did not start consuming")
            await asyncio.sleep(0.05)
        with sampler.sampling():
            await asyncio.wait_for(done.wait(), max(limit - loop.time(), 1.0))
        return time.perf_counter() - started
    finally:
        await broker.close()


def embed_stage(device: str, sample: list[str], sizes: Sizes) -> Row:
    """The real embed stage process (`sluice stage embed`) draining a backlog of
    `sizes.messages` batches from a private RabbitMQ."""
    with tempfile.TemporaryDirectory(prefix="sluice-gpu-") as tmp, PrivateBroker() as node:
        root = Path(tmp)
        env = {
            "SLUICE_AMQP_URL": node.amqp_url,
            "SLUICE_NAMESPACE": f"g{uuid.uuid4().hex[:8]}",
            "SLUICE_DATA_DIR": str(root / "data"),
            "SLUICE_MESSAGE_SECRET": secrets.token_hex(32),
            "SLUICE_EMBED_DEVICE": device,
            # The torch model on either device (on CPU, `auto` would pick the INT8 one).
            "SLUICE_EMBED_BACKEND": "torch",
            "SLUICE_CHUNKS_PER_MESSAGE": str(sizes.chunks_per_message),
            "SLUICE_EMBED_METRICS_PORT": "0",
            "SLUICE_LOG_FORMAT": "text",
            "SLUICE_HOST": "127.0.0.1",
        }
        with mock.patch.dict(os.environ, env):
            settings = Settings()
        batches = backlog(sample, sizes)
        log_path = root / "embed.log"
        sampler = GpuSampler()
        stages: list[subprocess.Popen[bytes]] = []
        with log_path.open("wb") as log:

            def start_stage() -> subprocess.Popen[bytes]:
                stages.append(
                    subprocess.Popen(
                        [*sluice_command(), "stage", "embed"],
                        env={**os.environ, **env},
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
                return stages[-1]

            try:
                seconds = asyncio.run(
                    _drain(settings, batches, start_stage, sampler, sizes.deadline_s)
                )
            except BaseException:
                print(log_path.read_text(errors="replace")[-4000:], file=sys.stderr)
                raise
            finally:
                for stage in stages:
                    _stop(stage)
        on_gpu = on_cuda(device)
        tuning = settings.stage("embed")
        return Row(
            "embed stage, queue backlog",
            "fp16" if on_gpu else "fp32",
            settings.embed_cuda_batch_size if on_gpu else settings.embed_batch_size,
            len(batches) * sizes.chunks_per_message,
            seconds,
            sampler.summary(),
            f"{len(batches)} msgs x {sizes.chunks_per_message} chunks, bulk lane; model call "
            f"{settings.embed_call_chunks} chunks; prefetch {tuning.prefetch}",
        )


def _stop(stage: subprocess.Popen[bytes]) -> None:
    """SIGTERM the stage as an orchestrator would; SIGKILL it if it does not stop in time."""
    stage.send_signal(signal.SIGTERM)
    try:
        stage.wait(timeout=60)
    except subprocess.TimeoutExpired:
        stage.kill()
        stage.wait()


def device_name(device: str) -> str:
    """The device as the table names it: the GPU's model, or `cpu`."""
    if not on_cuda(device):
        return device
    import torch

    return f"{device} ({torch.cuda.get_device_name(device)})"


def table(rows: list[Row], device: str, tokens: float) -> str:
    """The one table this benchmark prints."""
    head = (
        f"GPU benchmark on {device_name(device)} (chunks of {tokens:.0f} tokens on average)\n"
        "| phase | precision | batch | chunks | seconds | chunks/s | GPU util % | notes |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    lines = [
        f"| {r.phase} | {r.precision} | {r.batch} | {r.chunks} | {r.seconds:.3f} | "
        f"{r.chunks_per_s:.1f} | {r.gpu_util} | {r.note} |"
        for r in rows
    ]
    return "\n".join([head, *lines])


def cuda_refusal() -> str | None:
    """Why this machine cannot run the GPU benchmark, or None if it can."""
    import torch

    if torch.version.cuda is None:
        return (
            f"bench/gpu.py: torch {torch.__version__} is a CPU build, so no GPU can be used: "
            "install the CUDA build (`pip install torch==2.13.0` from PyPI), or pass "
            "--device cpu"
        )
    if not torch.cuda.is_available():
        return (
            "bench/gpu.py: no CUDA device is visible (check nvidia-smi and "
            "CUDA_VISIBLE_DEVICES); run it on a machine with a GPU, or pass --device cpu"
        )
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run both phases and print the table; exit 2 without a GPU unless `--device cpu`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and (why := cuda_refusal()) is not None:
        print(why, file=sys.stderr)
        return REFUSED
    sizes = QUICK if args.quick else FULL
    sample = texts(sizes.texts, sizes.words)
    rows = raw_model(args.device, sample, sizes)
    rows.append(
        embed_stage(
            args.device,
            texts(sizes.messages * sizes.chunks_per_message, sizes.words, "gpu-backlog"),
            sizes,
        )
    )
    print(table(rows, args.device, mean_tokens(sample)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
