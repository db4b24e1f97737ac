"""Folders that may live in object storage: a local path, or a URI such as `s3://bucket/prefix`.

Ray Train's run folders (checkpoints) are the first such folder: on a cluster every node must read
them, so they go to a bucket, named by VERSVIDEO_RUN_STORAGE; the demo keeps them under
models/runs. Everything here goes through pyarrow's filesystem layer, the one Ray Train itself
writes checkpoints with, so the two agree on what a location is. The standard AWS variables
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, AWS_ENDPOINT_URL for S3-compatible
stores) select the account and endpoint; nothing here names one.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

from tasks.config.paths import RUNS

RUN_STORAGE_VARIABLE = "VERSVIDEO_RUN_STORAGE"
REACHABLE_TIMEOUT_S = 10.0


class StorageError(RuntimeError):
    """A storage location that cannot be used, with what to do about it."""


def run_storage() -> str:
    """Where the training stages keep Ray Train's run folders: VERSVIDEO_RUN_STORAGE, else models/runs."""
    return os.environ.get(RUN_STORAGE_VARIABLE) or str(RUNS)


def is_uri(location: str | Path) -> bool:
    return "://" in str(location)


def absolute(location: str | Path) -> str:
    """A URI as it is; a local path made absolute (Ray Train's workers run in other directories)."""
    return str(location) if is_uri(location) else str(Path(location).resolve())


def join(location: str, *parts: str) -> str:
    return "/".join([location.rstrip("/"), *parts])


def filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem holding `location`, and the path inside it."""
    if not is_uri(location):
        return pafs.LocalFileSystem(), absolute(location)
    try:
        return pafs.FileSystem.from_uri(location)
    except (OSError, ValueError) as error:
        raise StorageError(f"cannot open {location}: {error}") from error


def endpoint_description() -> str:
    return f"endpoint {os.environ['AWS_ENDPOINT_URL']} (AWS_ENDPOINT_URL)" if os.environ.get("AWS_ENDPOINT_URL") else "AWS's default S3 endpoint (AWS_ENDPOINT_URL not set)"


def require_reachable(location: str) -> None:
    """Fail in seconds, naming the endpoint and the bucket, when an s3:// location cannot be used:
    pyarrow and Ray retry an unreachable endpoint for minutes before saying anything. Local paths
    and other schemes pass (their errors already name the path)."""
    parsed = urlparse(location)
    if parsed.scheme != "s3":
        return
    import boto3
    import botocore.config
    import botocore.exceptions

    client = boto3.client("s3", config=botocore.config.Config(connect_timeout=REACHABLE_TIMEOUT_S, read_timeout=REACHABLE_TIMEOUT_S, retries={"max_attempts": 1}))
    try:
        client.head_bucket(Bucket=parsed.netloc)
    except botocore.exceptions.ClientError as error:
        code = error.response.get("Error", {}).get("Code", "")
        why = {"404": "does not exist", "NoSuchBucket": "does not exist", "403": "refuses these credentials"}.get(code, f"answered {code}")
        raise StorageError(f"{location}: bucket {parsed.netloc!r} {why} at {endpoint_description()}; create it or fix "
                           f"{RUN_STORAGE_VARIABLE} / the AWS_* variables") from error
    except (botocore.exceptions.BotoCoreError, OSError) as error:
        raise StorageError(f"{location}: {endpoint_description()} cannot be reached ({error}); start the object store or "
                           f"set AWS_ENDPOINT_URL to one that answers") from error


def read_text(location: str) -> str | None:
    """The text of the file at `location`, or None when there is none."""
    if not is_file(location):
        return None
    fs, path = filesystem(location)
    with fs.open_input_stream(path) as stream:
        return stream.read().decode()


def write_text(location: str, text: str) -> None:
    write_bytes(location, text.encode())


def write_bytes(location: str, data: bytes) -> None:
    """Whole or not at all: an object store's PUT is atomic; a local file is written beside and renamed."""
    fs, path = filesystem(location)
    if is_uri(location):
        with fs.open_output_stream(path) as stream:
            stream.write(data)
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    staged = Path(f"{path}.tmp-{os.getpid()}")
    staged.write_bytes(data)
    staged.replace(path)


def is_file(location: str) -> bool:
    fs, path = filesystem(location)
    return fs.get_file_info(path).type == pafs.FileType.File


def subfolders(location: str, prefix: str) -> list[str]:
    """The locations of the folders directly under `location` whose names start with `prefix`."""
    fs, path = filesystem(location)
    found = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return [join(location, info.base_name) for info in found if info.type == pafs.FileType.Directory and info.base_name.startswith(prefix)]


def file_names(location: str, pattern: str = "*") -> list[str]:
    """The names of the files directly in the folder `location` matching `pattern`, sorted."""
    fs, path = filesystem(location)
    found = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(info.base_name for info in found if info.type == pafs.FileType.File and fnmatch.fnmatch(info.base_name, pattern))


def sha256(location: str) -> str:
    fs, path = filesystem(location)
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def files_under(location: str) -> list[str]:
    """The files under the folder `location`, recursively, as paths relative to it, sorted."""
    fs, path = filesystem(location)
    found = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    base = path.rstrip("/") + "/"
    return sorted(info.path.removeprefix(base) for info in found if info.type == pafs.FileType.File)


def stays_inside(relative: str) -> bool:
    """Whether `relative` names something under its root: not absolute, no `..` leaving it."""
    normal = os.path.normpath(relative)
    return not os.path.isabs(relative) and normal != ".." and not normal.startswith(f"..{os.sep}")


@contextlib.contextmanager
def local_folder(root: str, relatives: Iterable[str]) -> Iterator[str]:
    """A local folder to read the files `relatives` (relative to `root`) from, with the local
    code every stage already has: `root` itself when it is a local path; for a URI (raw videos in
    a bucket, read by Ray tasks on any node), a temporary folder holding a copy of each of them
    that exists, removed on exit. A missing object is left missing and one that would leave the
    root is not fetched, so the reader rejects it exactly as it rejects a local one, and names it
    relative to the root in the same words: the stage's outputs are the same bytes either way."""
    if not is_uri(root):
        yield absolute(root)
        return
    folder = tempfile.mkdtemp(prefix="versvideo-fetched-")
    try:
        fs, base = filesystem(root)
        for relative in relatives:
            if not stays_inside(relative):
                continue
            source = f"{base.rstrip('/')}/{Path(os.path.normpath(relative)).as_posix()}"
            if fs.get_file_info(source).type != pafs.FileType.File:
                continue
            target = Path(folder) / os.path.normpath(relative)
            target.parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(source) as stream, open(target, "wb") as file:
                shutil.copyfileobj(stream, file, 1 << 20)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
