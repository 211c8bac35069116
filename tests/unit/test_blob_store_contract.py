"""One body of tests for every `BlobStore`: the local directory and the S3 store.

The S3 store runs against the suite's S3 stand-in (moto's server in its own process, where
production has AWS S3, MinIO or Ceph), configured only through the standard AWS variables,
exactly as an operator would configure it.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from pipeline import free_port
from s3 import ACCESS_KEY, SECRET_KEY, S3StandIn

from contracts.errors import SluiceError, Transient
from stages.backends.blobs import LocalBlobStore
from stages.backends.protocols import BlobStore
from stages.backends.s3_blobs import S3BlobStore

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "tenant-a/blobs"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def peek(s3: S3StandIn) -> Any:
    """A plain client of the test's own, to look at the bucket behind the store."""
    env = s3.env()
    return boto3.session.Session().client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_REGION"],
    )


def point_at(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    """Set the standard AWS variables, as production does, and nothing boto3 might prefer."""
    for name in ("AWS_PROFILE", "AWS_DEFAULT_REGION", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    """Each implementation in turn; the S3 one on the stand-in for MinIO/S3, under a prefix."""
    if request.param == "local":
        return LocalBlobStore(tmp_path / "blobs")
    s3: S3StandIn = request.getfixturevalue("s3")
    point_at(request.getfixturevalue("monkeypatch"), s3.env())
    return S3BlobStore.from_url(f"s3://{s3.bucket()}/{PREFIX}/", cache_dir=tmp_path / "cache")


def staged_file(directory: Path, data: bytes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "upload.part"
    path.write_bytes(data)
    return path


def test_put_bytes_returns_the_sha256_and_is_idempotent(store: BlobStore) -> None:
    data = b"the same bytes, twice"
    assert store.put_bytes(data) == sha(data)
    assert store.put_bytes(data) == sha(data)
    assert store.read_bytes(sha(data)) == data


def test_adopt_consumes_the_staged_file(store: BlobStore, tmp_path: Path) -> None:
    data = b"%PDF-1.7 an upload, streamed to a staging file"
    staged = staged_file(tmp_path / "staging", data)
    store.adopt(staged, sha(data))
    assert not staged.exists()
    assert store.read_bytes(sha(data)) == data
    # Adopting a blob that is already stored still consumes the new staging file.
    again = staged_file(tmp_path / "staging", data)
    store.adopt(again, sha(data))
    assert not again.exists()
    assert store.read_bytes(sha(data)) == data


def test_adopt_of_a_large_file_streams_it_in_parts(
    store: BlobStore, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    data = os.urandom(1024 * 1024) * 20  # 20 MiB: above the multipart threshold
    staged = staged_file(tmp_path / "staging", data)
    store.adopt(staged, sha(data))
    assert not staged.exists()
    with store.as_file(sha(data)) as path:
        assert path.stat().st_size == len(data)
        assert sha(path.read_bytes()) == sha(data)
    if isinstance(store, S3BlobStore):
        head = peek(request.getfixturevalue("s3")).head_object(
            Bucket=store.bucket, Key=store.key(sha(data))
        )
        # A multipart upload's ETag ends in "-<number of parts>": 20 MiB in 8 MiB parts is 3.
        assert re.fullmatch(r'"[0-9a-f]{32}-3"', head["ETag"]), head["ETag"]


def test_as_file_yields_a_readable_copy_for_the_block(store: BlobStore) -> None:
    data = b"<html><body>parse me from a path</body></html>"
    digest = store.put_bytes(data)
    with store.as_file(digest) as path:
        assert path.is_file()
        assert path.read_bytes() == data
    if isinstance(store, S3BlobStore):
        assert not path.exists()  # the download was a temporary copy
        assert not any(path.parent.iterdir())
    else:
        assert path.exists()  # the store's own file: nothing was copied
    assert store.exists(digest)


def test_exists_and_delete(store: BlobStore) -> None:
    digest = store.put_bytes(b"short-lived")
    assert store.exists(digest)
    store.delete(digest)
    assert not store.exists(digest)
    store.delete(digest)  # deleting an absent blob is a no-op
    assert not store.exists(sha(b"never stored"))


def test_a_missing_blob_is_transient(store: BlobStore) -> None:
    digest = sha(b"another node is still writing this one")
    with pytest.raises(Transient) as read:
        store.read_bytes(digest)
    assert read.value.code == "blob_missing"
    assert digest in read.value.message
    with pytest.raises(Transient) as opened, store.as_file(digest):
        pass
    assert opened.value.code == "blob_missing"


@pytest.mark.parametrize("digest", ["", "a" * 63, "A" * 64, "../" + "a" * 61, "g" * 64])
def test_a_bad_digest_is_a_value_error(store: BlobStore, digest: str, tmp_path: Path) -> None:
    staged = staged_file(tmp_path / "staging", b"x")
    for call in (
        lambda: store.read_bytes(digest),
        lambda: store.exists(digest),
        lambda: store.delete(digest),
        lambda: store.adopt(staged, digest),
    ):
        with pytest.raises(ValueError, match="sha256"):
            call()
    with pytest.raises(ValueError, match="sha256"), store.as_file(digest):
        pass
    assert staged.exists()  # a refused adopt leaves the file to its owner


def test_notes_are_written_whole_replaced_and_deleted(store: BlobStore) -> None:
    assert store.read_note("ocr-j1-x-0-of-2") is None
    store.put_note("ocr-j1-x-0-of-2", b"one")
    store.put_note("ocr-j1-x-0-of-2", b"two")
    assert store.read_note("ocr-j1-x-0-of-2") == b"two"
    store.delete_note("ocr-j1-x-0-of-2")
    store.delete_note("ocr-j1-x-0-of-2")  # deleting again is harmless
    assert store.read_note("ocr-j1-x-0-of-2") is None


def test_notes_are_deleted_by_the_start_of_their_names(store: BlobStore) -> None:
    for name in ("ocr-j1-a-0-of-2", "ocr-j1-a-whole", "ocr-j12-a-whole", "ocr-j2-a-whole"):
        store.put_note(name, b"x")
    store.delete_notes("ocr-j1-")
    assert [store.read_note(n) for n in ("ocr-j1-a-0-of-2", "ocr-j1-a-whole")] == [None, None]
    assert store.read_note("ocr-j12-a-whole") == store.read_note("ocr-j2-a-whole") == b"x"
    store.delete_notes("ocr-j9-")  # none: harmless


@pytest.mark.parametrize("name", ["", "../escape", "a/b", "UPPER", "a..b", "x" * 201])
def test_a_note_name_is_never_a_path(store: BlobStore, name: str) -> None:
    with pytest.raises(ValueError):
        store.put_note(name, b"x")
    with pytest.raises(ValueError):
        store.read_note(name)


def test_ping(store: BlobStore) -> None:
    store.ping()


def test_s3_objects_land_under_the_prefix(s3: S3StandIn, tmp_path: Path) -> None:
    """The prefix in SLUICE_BLOB_STORE_URL is where every object goes (the stand-in's view)."""
    bucket = s3.bucket()
    with pytest.MonkeyPatch.context() as monkeypatch:
        point_at(monkeypatch, s3.env())
        store = S3BlobStore.from_url(f"s3://{bucket}/{PREFIX}", cache_dir=tmp_path)
        first = store.put_bytes(b"one")
        staged = staged_file(tmp_path / "staging", b"two")
        store.adopt(staged, sha(b"two"))
        bare = S3BlobStore.from_url(f"s3://{bucket}", cache_dir=tmp_path)
        third = bare.put_bytes(b"three")
    listed = peek(s3).list_objects_v2(Bucket=bucket)
    keys = sorted(item["Key"] for item in listed["Contents"])
    second = sha(b"two")
    expected = [f"{PREFIX}/{first[:2]}/{first}", f"{PREFIX}/{second[:2]}/{second}"]
    assert keys == sorted([*expected, f"{third[:2]}/{third}"])  # no prefix: at the root


@pytest.mark.parametrize("url", ["s3://", "s3:///prefix", "s3://bucket/p?x=1", "file:///tmp"])
def test_s3_url_without_a_bucket_is_a_usage_error(url: str, tmp_path: Path) -> None:
    with pytest.raises(SluiceError) as raised:
        S3BlobStore.from_url(url, cache_dir=tmp_path)
    assert raised.value.code == "usage_error"


def test_s3_unreachable_endpoint_is_transient_and_names_the_bucket(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    point_at(
        monkeypatch,
        {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": "us-east-1",
        },
    )
    store = S3BlobStore.from_url("s3://sluice-offline/blobs", cache_dir=tmp_path)
    staged = staged_file(tmp_path / "staging", b"kept for a retry")
    for call in (
        store.ping,
        lambda: store.read_bytes(sha(b"x")),
        lambda: store.put_bytes(b"x"),
        lambda: store.adopt(staged, sha(b"kept for a retry")),
    ):
        with pytest.raises(Transient) as raised:
            call()
        assert raised.value.code == "blob_store_unavailable"
        assert "sluice-offline" in raised.value.message
        assert endpoint in raised.value.message
        assert "AWS_ENDPOINT_URL" in raised.value.message
        assert SECRET_KEY not in raised.value.message
    assert staged.exists()


def test_s3_missing_bucket_or_credentials_say_what_to_fix(
    s3: S3StandIn, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    point_at(monkeypatch, s3.env())
    missing = S3BlobStore.from_url("s3://sluice-no-such-bucket/x", cache_dir=tmp_path)
    with pytest.raises(Transient) as raised:
        missing.ping()
    assert raised.value.code == "blob_store_unavailable"
    assert "sluice-no-such-bucket" in raised.value.message
    assert "Create the bucket" in raised.value.message
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    anonymous = S3BlobStore.from_url(f"s3://{s3.bucket()}", cache_dir=tmp_path)
    with pytest.raises(Transient) as raised:
        anonymous.read_bytes(sha(b"x"))
    assert raised.value.code == "blob_store_unavailable"
    assert "AWS_ACCESS_KEY_ID" in raised.value.message


PEAK_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from stages.backends.s3_blobs import S3BlobStore

    def status_kib(field):
        status = Path("/proc/self/status").read_text()
        return int(status.split(field + ":")[1].split()[0])

    store = S3BlobStore.from_url(sys.argv[1], cache_dir=Path(sys.argv[2]))
    store.ping()  # imports, connections and credentials are paid for before measuring
    # Start-up (botocore parsing its service models) peaks above where the process then
    # sits: reset the peak to the current RSS so the reading after is the adopt's own.
    # VmHWM, not getrusage's ru_maxrss: after fork + exec the latter also remembers the
    # parent's (pytest's) size. Without clear_refs the peak is compared with the RSS now,
    # which can only overstate the growth.
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    before = status_kib("VmRSS")
    store.adopt(Path(sys.argv[3]), sys.argv[4])
    print(before // 1024, status_kib("VmHWM") // 1024)
    """
)


@pytest.fixture
def big_file(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A 200 MiB staged file, written in 1 MiB pieces so the test process stays small too."""
    path = tmp_path / "big.part"
    digest = hashlib.sha256()
    piece = os.urandom(1024 * 1024)
    with path.open("wb") as out:
        for i in range(200):
            block = i.to_bytes(4, "big") + piece[4:]
            digest.update(block)
            out.write(block)
    yield path, digest.hexdigest()
    path.unlink(missing_ok=True)


def test_s3_adopt_of_200_mib_keeps_peak_memory_flat(
    s3: S3StandIn, tmp_path: Path, big_file: tuple[Path, str]
) -> None:
    """Adopting streams from disk: the adopting process's peak RSS grows by well under 50 MiB."""
    path, digest = big_file
    bucket = s3.bucket()
    done = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, f"s3://{bucket}/b", str(tmp_path), str(path), digest],
        env={**os.environ, **s3.env()},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    before, peak = (int(word) for word in done.stdout.split()[-2:])
    print(f"adopting 200 MiB: RSS {before} MiB before, peak {peak} MiB during")
    assert peak - before < 50
    assert not path.exists()
    head = peek(s3).head_object(Bucket=bucket, Key=f"b/{digest[:2]}/{digest}")
    assert head["ContentLength"] == 200 * 1024 * 1024
