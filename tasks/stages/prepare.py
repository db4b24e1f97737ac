"""Stage `prepare`: put a WebVid-format CSV (and, for the default data, the videos) in place.

source=synthetic writes the embedded default dataset under data.videos_root, and a marker file
there that says so: a folder without it (a user's own videos) is never replaced.
source=webvid reads the user's CSV (videos stay where data.videos_root points); data.csv must be
another file, so the user's CSV is never rewritten.
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
from tasks.storage.webvid import COLUMNS, dedupe_videoids, read_webvid_rows

SYNTHETIC_MARKER = ".versvideo-synthetic.json"  # in data.videos_root: prepare wrote this folder, and may replace it


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
    else:
        raw, malformed = read_webvid_rows(cfg.webvid_csv)  # a row of the wrong width costs that row, not the file
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
    }
    write_json(report, PREPARE_REPORT)
    return report


def _write_synthetic_videos(params: Params) -> pd.DataFrame:
    cfg = params.prepare
    final = Path(params.data.videos_root)
    refuse_foreign_folder(final)
    # Render into a temporary folder and swap it in whole: a crash leaves the old set intact.
    with atomic_folder(final) as tmp:
        rows = synthetic.generate(tmp, num_videos=cfg.num_videos, seconds=cfg.seconds, fps=cfg.fps, height=cfg.height, width=cfg.width, seed=cfg.seed)
        (tmp / SYNTHETIC_MARKER).write_text(json.dumps({"written_by": "versvideo stage prepare", "source": "synthetic", "videos": len(rows)}) + "\n")
    return pd.DataFrame(rows, columns=list(COLUMNS))


def refuse_foreign_folder(videos_root: Path) -> None:
    """prepare.source=synthetic replaces data.videos_root: only an empty folder, or one it wrote itself."""
    if videos_root.is_symlink() or (videos_root.exists() and not videos_root.is_dir()):
        raise ValueError(f"data.videos_root {videos_root}: is a link or a file, not a folder prepare wrote; point it at a new folder")
    if videos_root.is_dir() and any(videos_root.iterdir()) and not (videos_root / SYNTHETIC_MARKER).is_file():
        raise ValueError(
            f"data.videos_root {videos_root}: holds files prepare did not write (no {SYNTHETIC_MARKER} in it), and "
            "prepare.source=synthetic would replace them. Point data.videos_root at a new or empty folder (or delete this "
            "one if an older version of prepare wrote it), or set prepare.source=webvid with prepare.webvid_csv to train on the videos there"
        )


def main(params: Params) -> None:
    report = prepare(params)
    print(
        f"prepare: {report['rows']} videos in {params.data.csv} "
        f"({report['duplicate_videoid_rows']} re-crawled videoid rows and {report['malformed_rows']} malformed rows dropped, see {PREPARE_REPORT})"
    )
