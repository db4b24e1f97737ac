"""Image-text datasets in the formats LAION subsets ship, for the paper's joint image-video
training (section 3.1: LAION image-text pairs beside WebVid's videos).

`data.images` names a file or a folder holding either, or both:
- img2dataset's WebDataset shards: NNNNN.tar with `{key}.jpg|png|webp`, `{key}.txt` (the
  caption) and `{key}.json` (url, status, ...) per sample; an NNNNN.parquet beside a tar is
  img2dataset's per-shard metadata and is read only for its `status` column.
- Parquet tables whose rows point at images on disk: a caption column (`TEXT`, LAION's name, or
  `caption`/`text`), optionally `url`/`URL` and img2dataset's `status`/`error_message`, and where
  the image lies: a `path` column (relative to the Parquet's folder), or a `key` column with the
  image at `{parquet stem}/{key}.{ext}` (img2dataset's `--output_format files` layout).

Every record is addressed by (source, member): the shard or Parquet file relative to the
`data.images` root, and the tar member or the image file (relative to the same root). Paths stay
relative, so filter's outputs are the same bytes in any checkout.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from tasks.storage.object_store import files_under, is_file, is_uri
from tasks.storage.video_io import VideoError, path_under

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
CAPTION_COLUMNS = ("TEXT", "caption", "text")  # LAION's metadata, img2dataset's output, plain tables
URL_COLUMNS = ("url", "URL")
RECORD_COLUMNS = ["key", "source", "member", "caption", "url", "status", "error_message"]


class ImageTextFormatError(ValueError):
    """A source that is not one of the formats above (the whole file, not one record)."""


def source_files(root: str | Path) -> list[str]:
    """The tar and Parquet files of `root` (a file, or a folder searched recursively), relative to
    the root's folder, sorted; a Parquet beside a same-stem tar is the tar's metadata, not a source.
    A root in object storage (a URI) may hold WebDataset shards only (see bucket_sources)."""
    if is_uri(root):
        return bucket_sources(str(root))
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(
            f"data.images {root}: not found. Point it at an image-text set (img2dataset WebDataset .tar shards, or a Parquet "
            "with a caption column and image paths), or set data.images '' and train_unet.image_share 0 to train on videos only"
        )
    if root.is_file():
        if root.suffix not in (".tar", ".parquet"):
            raise ImageTextFormatError(f"data.images {root}: a {root.suffix or 'suffix-less'} file; expected a .tar (WebDataset) or a .parquet")
        return [root.name]
    everything = [path for path in root.rglob("*") if path.is_file() and not path.name.startswith(".")]
    if not everything:
        return []  # an empty folder: no images (how a DVC pipeline, which needs a path, trains on videos alone)
    files = sorted(str(path.relative_to(root)) for path in everything if path.suffix in (".tar", ".parquet"))
    tars = {name[: -len(".tar")] for name in files if name.endswith(".tar")}
    sources = [name for name in files if not (name.endswith(".parquet") and name[: -len(".parquet")] in tars)]
    if not sources:
        raise ImageTextFormatError(f"data.images {root}: no .tar or .parquet file in it; expected img2dataset's output folder")
    return sources


def bucket_sources(root: str) -> list[str]:
    """source_files of a root in object storage, where the filter's and decode's Ray tasks fetch
    each shard, with its metadata Parquet, whole. Parquet tables that point at image files are
    refused: each image would be an object of its own to find and fetch, which img2dataset's
    WebDataset output (its default) avoids."""
    if is_file(root):
        if not root.endswith(".tar"):
            raise ImageTextFormatError(f"data.images {root}: in object storage, data.images must be WebDataset .tar shards (a .tar, or a folder of them)")
        return [root.rsplit("/", 1)[1]]
    everything = [name for name in files_under(root) if not Path(name).name.startswith(".")]
    tars = sorted(name for name in everything if name.endswith(".tar"))
    tables = [name for name in everything if name.endswith(".parquet") and f"{name[: -len('.parquet')]}.tar" not in tars]
    if tables:
        raise ImageTextFormatError(
            f"data.images {root}: {tables[0]} (and {len(tables) - 1} more) is a Parquet table pointing at image files; in object "
            "storage data.images must be WebDataset .tar shards (img2dataset --output_format webdataset), or point data.images at a local folder")
    if everything and not tars:
        raise ImageTextFormatError(f"data.images {root}: no .tar in it; expected img2dataset's WebDataset output")
    return tars


def images_folder(root: str | Path) -> str:
    """The folder `root`'s sources are named relative to (root_folder), for a path or a URI."""
    if is_uri(root):
        return str(root).rsplit("/", 1)[0] if is_file(str(root)) else str(root)
    return str(root_folder(root))


def source_with_metadata(source: str) -> list[str]:
    """The files one source is read from: itself, and a tar's metadata Parquet beside it."""
    return [source, f"{source[: -len('.tar')]}.parquet"] if source.endswith(".tar") else [source]


def root_folder(root: str | Path) -> Path:
    """The folder record paths are relative to: `root` itself, or a single file's folder."""
    root = Path(root)
    return root.parent if root.is_file() else root


def list_records(root: str | Path, source: str) -> pd.DataFrame:
    """One row per sample of one source file (RECORD_COLUMNS); a sample with no image has
    member '' and one with no caption file has caption None, for the filter to reject by name."""
    folder = root_folder(root)
    path = path_under(folder, source)
    records = _tar_records(folder, source, path) if source.endswith(".tar") else _parquet_records(folder, source, path)
    return pd.DataFrame.from_records(records, columns=RECORD_COLUMNS)


def _tar_records(folder: Path, source: str, path: Path) -> list[dict]:
    samples: dict[str, dict] = {}
    try:
        with tarfile.open(path, "r:*") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                # WebDataset's rule: the key is the name up to the first dot of its last part
                directory, base = os.path.split(member.name)
                stem, _, extension = base.partition(".")
                sample = samples.setdefault(os.path.join(directory, stem), {"image": "", "caption": None, "meta": {}})
                extension = "." + extension.lower()
                if extension in IMAGE_EXTENSIONS:
                    sample["image"] = member.name
                elif extension == ".txt":
                    sample["caption"] = archive.extractfile(member).read().decode("utf-8", errors="replace")
                elif extension == ".json":
                    try:
                        sample["meta"] = json.loads(archive.extractfile(member).read())
                    except ValueError:
                        sample["meta"] = {}
    except (tarfile.TarError, OSError) as error:
        raise ImageTextFormatError(f"data.images {source}: not a readable tar ({type(error).__name__}: {error}); re-download or remove the shard") from None
    statuses = _shard_statuses(path.with_suffix(".parquet"))
    records = []
    for key, sample in samples.items():
        meta = sample["meta"] if isinstance(sample["meta"], dict) else {}
        status = statuses.get(os.path.basename(key), (meta.get("status") or "success", meta.get("error_message") or ""))
        records.append({"key": key, "source": source, "member": sample["image"], "caption": sample["caption"],
                        "url": str(meta.get("url") or ""), "status": str(status[0]), "error_message": str(status[1] or "")})
    return records


def _shard_statuses(metadata: Path) -> dict[str, tuple[str, str]]:
    """img2dataset's per-shard Parquet: key -> (status, error_message); {} when absent."""
    if not metadata.is_file():
        return {}
    table = pq.read_table(metadata)
    if "key" not in table.column_names or "status" not in table.column_names:
        return {}
    errors = table.column("error_message").to_pylist() if "error_message" in table.column_names else [""] * table.num_rows
    return {str(key): (str(status), str(error or "")) for key, status, error in zip(table.column("key").to_pylist(), table.column("status").to_pylist(), errors)}


def _parquet_records(folder: Path, source: str, path: Path) -> list[dict]:
    try:
        frame = pq.read_table(path).to_pandas()
    except Exception as error:
        raise ImageTextFormatError(f"data.images {source}: not a readable Parquet ({type(error).__name__}: {error})") from None
    caption_column = next((name for name in CAPTION_COLUMNS if name in frame), None)
    if caption_column is None:
        raise ImageTextFormatError(f"data.images {source}: no caption column (one of {', '.join(CAPTION_COLUMNS)}); its columns are {', '.join(map(str, frame.columns))}")
    if "path" not in frame and "key" not in frame:
        raise ImageTextFormatError(
            f"data.images {source}: rows name no image (no `path` or `key` column). A LAION metadata Parquet (URL, TEXT) lists "
            "images to download: fetch them with img2dataset (--output_format webdataset or files) and point data.images at its output"
        )
    url_column = next((name for name in URL_COLUMNS if name in frame), None)
    shard_folder = Path(source).with_suffix("")  # img2dataset files layout: 00000.parquet beside 00000/
    records = []
    for position, row in enumerate(frame.to_dict(orient="records")):
        key = str(row["key"]) if "key" in row else f"{shard_folder}/{position:09d}"
        if "path" in row and row["path"]:
            member = os.path.normpath(os.path.join(os.path.dirname(source), str(row["path"])))
        else:
            member = next((str(shard_folder / f"{row['key']}{extension}") for extension in IMAGE_EXTENSIONS
                           if (folder / shard_folder / f"{row['key']}{extension}").is_file()), "")
        caption = row[caption_column]
        records.append({"key": key, "source": source, "member": member,
                        "caption": None if caption is None or (isinstance(caption, float) and np.isnan(caption)) else str(caption),
                        "url": str(row[url_column] or "") if url_column else "", "status": str(row.get("status") or "success"),
                        "error_message": str(row.get("error_message") or "")})
    return records


class SourceReader:
    """The encoded images of one source file, read in any order: a tar is opened once (its index
    is read once), not once per image; a Parquet's images are files under the root."""

    def __init__(self, root: str | Path, source: str) -> None:
        self.folder, self.source = root_folder(root), source
        self.archive = tarfile.open(path_under(self.folder, source), "r:*") if source.endswith(".tar") else None

    def __enter__(self) -> SourceReader:
        return self

    def __exit__(self, *exc) -> None:
        if self.archive is not None:
            self.archive.close()

    def read(self, member: str) -> bytes:
        where = f"{self.source}:{member}"
        try:
            if self.archive is not None:
                return self.archive.extractfile(member).read()
            return path_under(self.folder, member).read_bytes()
        except VideoError:
            raise
        except (KeyError, FileNotFoundError) as error:
            raise VideoError("missing_file", f"{where}: {type(error).__name__}") from None
        except (tarfile.TarError, OSError) as error:
            raise VideoError("unreadable", f"{where}: {type(error).__name__}: {error}") from None


def decode_image(data: bytes, where: str) -> np.ndarray:
    """Encoded bytes -> (h, w, 3) uint8 RGB; a truncated or foreign file is `undecodable`."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decodes every byte: a truncated JPEG fails here, not at open
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise VideoError("undecodable", f"{where}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}") from None


def content_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class ImageSample:
    """One sample to write into a WebDataset shard."""

    key: str
    image: bytes  # encoded (JPEG, PNG)
    extension: str  # ".jpg"
    caption: str | None  # None: no .txt member
    url: str = ""


def write_webdataset_shard(path: Path, samples: list[ImageSample]) -> pd.DataFrame:
    """One img2dataset-style shard: `path` (.tar, {key}.jpg/.txt/.json per sample) and its
    metadata Parquet beside it; reproducible bytes (fixed mtimes, owners and order). Returns the
    metadata rows."""
    rows = []
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as archive:
        for sample in samples:
            meta = {"key": sample.key, "url": sample.url, "caption": sample.caption, "status": "success", "error_message": None}
            members = [(sample.extension, sample.image), (".json", json.dumps(meta, sort_keys=True).encode())]
            if sample.caption is not None:
                members.insert(1, (".txt", sample.caption.encode()))
            for extension, data in members:
                info = tarfile.TarInfo(sample.key + extension)
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                archive.addfile(info, io.BytesIO(data))
            rows.append({**meta, "sha256": content_sha256(sample.image)})
    metadata = pd.DataFrame.from_records(rows, columns=["key", "url", "caption", "status", "error_message", "sha256"])
    metadata.to_parquet(path.with_suffix(".parquet"), index=False)
    return metadata
