"""Stage `prepare`: put a WebVid-format CSV (and, for the default data, the videos) in place.

source=synthetic writes the embedded default dataset under data.videos_root and its image-text
set (img2dataset's WebDataset shards) under data.images, each with a marker file that says so: a
folder without it (a user's own videos or images) is never replaced.
source=webvid reads the user's CSV (videos stay where data.videos_root points, images where
data.images does); data.csv must be another file, so the user's CSV is never rewritten.
Either way, re-crawled videoids keep their last caption, and a row whose field count differs from
the header's (an unquoted comma) is dropped; both are listed, with line numbers for the latter, in
data/raw/prepare_report.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from tasks.config.params import Params
from tasks.config.paths import PREPARE_REPORT
from tasks.preprocessing import synthetic
from tasks.storage.atomic import atomic_folder, atomic_path, remove_stale_temporaries, write_json
from tasks.storage.object_store import is_uri
from tasks.storage.webvid import COLUMNS, dedupe_videoids, read_webvid_rows

SYNTHETIC_MARKER = ".versvideo-synthetic.json"  # in data.videos_root or data.images: prepare wrote this folder, and may replace it


def prepare(params: Params) -> dict:
    cfg, data = params.prepare, params.data
    csv = Path(data.csv)
    if cfg.source == "webvid" and csv.resolve() == Path(cfg.webvid_csv).resolve():
        raise ValueError(f"data.csv and prepare.webvid_csv are the same file ({csv}); prepare writes data.csv, "
                         "so it would rewrite your CSV: set data.csv to another path, e.g. data/raw/webvid.csv")
    # leftovers of a run that was killed mid-write; nothing else in the user's folders is touched
    remove_stale_temporaries(csv.parent, names=(csv.name,))
    malformed = pd.DataFrame(columns=["line", "fields", "text"])
    if cfg.source == "synthetic":
        raw = _write_synthetic_videos(params)
        images = _write_synthetic_images(params) if data.images else 0
    else:
        raw, malformed = read_webvid_rows(cfg.webvid_csv)  # a row of the wrong width costs that row, not the file
        images = None  # the user's, read by filter
    kept, dropped = dedupe_videoids(raw)
    with atomic_path(data.csv) as tmp:
        kept.loc[:, list(COLUMNS)].to_csv(tmp, index=False)
    report = {
        "source": cfg.source,
        "input_rows": len(raw) + len(malformed),
        "malformed_rows": len(malformed),
        "malformed": malformed.loc[:, ["line", "fields"]].to_dict(orient="records"),
        "rows": len(kept),
        "duplicate_videoid_rows": len(dropped),
        "duplicates": dropped.loc[:, ["videoid", "name"]].to_dict(orient="records"),
        "synthetic_images": images,
    }
    write_json(report, PREPARE_REPORT)
    return report


def _write_synthetic_videos(params: Params) -> pd.DataFrame:
    cfg = params.prepare
    refuse_foreign_folder(params.data.videos_root, "data.videos_root")
    final = Path(params.data.videos_root)
    # Render into a temporary folder and swap it in whole: a crash leaves the old set intact.
    with atomic_folder(final) as tmp:
        rows = synthetic.generate(tmp, num_videos=cfg.num_videos, seconds=cfg.seconds, fps=cfg.fps, height=cfg.height, width=cfg.width, seed=cfg.seed)
        (tmp / SYNTHETIC_MARKER).write_text(json.dumps({"written_by": "versvideo stage prepare", "source": "synthetic", "videos": len(rows)}) + "\n")
    return pd.DataFrame(rows, columns=list(COLUMNS))


def _write_synthetic_images(params: Params) -> int:
    cfg = params.prepare
    refuse_foreign_folder(params.data.images, "data.images")
    final = Path(params.data.images)
    with atomic_folder(final) as tmp:
        count = synthetic.generate_images(tmp, num_images=cfg.num_images, height=cfg.height, width=cfg.width, seed=cfg.seed)
        (tmp / SYNTHETIC_MARKER).write_text(json.dumps({"written_by": "versvideo stage prepare", "source": "synthetic", "images": count}) + "\n")
    return count


def refuse_foreign_folder(location: str, key: str) -> None:
    """prepare.source=synthetic replaces the folder `key` names: only an empty one, or one it wrote itself."""
    if is_uri(location):
        raise ValueError(f"{key} {location}: prepare.source=synthetic renders the embedded set into a local folder; point {key} at one. "
                         "To read the embedded set from object storage, copy the rendered folder there and rerun with prepare.source=webvid, "
                         "prepare.webvid_csv the rendered CSV and data.csv another path")
    folder = Path(location)
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise ValueError(f"{key} {folder}: is a link or a file, not a folder prepare wrote; point it at a new folder")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / SYNTHETIC_MARKER).is_file():
        raise ValueError(
            f"{key} {folder}: holds files prepare did not write (no {SYNTHETIC_MARKER} in it), and "
            f"prepare.source=synthetic would replace them. Point {key} at a new or empty folder (or delete this "
            "one if an older version of prepare wrote it), or set prepare.source=webvid with prepare.webvid_csv to train on your own data"
        )


def main(params: Params) -> None:
    report = prepare(params)
    print(
        f"prepare: {report['rows']} videos in {params.data.csv} "
        f"({report['duplicate_videoid_rows']} re-crawled videoid rows and {report['malformed_rows']} malformed rows dropped, see {PREPARE_REPORT})"
        + (f"; {report['synthetic_images']} image-text pairs in {params.data.images}" if report["synthetic_images"] else "")
    )
