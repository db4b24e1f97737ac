"""Stage `prepare`: put a WebVid-format CSV (and, for the default data, the videos) in place.

source=synthetic writes the embedded default dataset under data.videos_root.
source=webvid reads the user's CSV (videos stay where data.videos_root points).
Either way, re-crawled videoids keep their last caption; the dropped rows are listed in
data/raw/prepare_report.json.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd

from tasks.config.params import Params
from tasks.config.paths import PREPARE_REPORT
from tasks.preprocessing import synthetic
from tasks.storage.atomic import atomic_path, remove_stale_temporaries, write_json
from tasks.storage.webvid import COLUMNS, dedupe_videoids, read_webvid_csv


def prepare(params: Params) -> dict:
    cfg, data = params.prepare, params.data
    remove_stale_temporaries(Path(data.csv).parent)  # leftovers of a run that was killed mid-write
    if cfg.source == "synthetic":
        raw = _write_synthetic_videos(params)
    else:
        raw = read_webvid_csv(cfg.webvid_csv)
    kept, dropped = dedupe_videoids(raw)
    with atomic_path(data.csv) as tmp:
        kept.loc[:, list(COLUMNS)].to_csv(tmp, index=False)
    report = {
        "source": cfg.source,
        "input_rows": len(raw),
        "rows": len(kept),
        "duplicate_videoid_rows": len(dropped),
        "duplicates": dropped.loc[:, ["videoid", "name"]].to_dict(orient="records"),
    }
    write_json(report, PREPARE_REPORT)
    return report


def _write_synthetic_videos(params: Params) -> pd.DataFrame:
    cfg = params.prepare
    final = Path(params.data.videos_root)
    # Render into a temporary folder and swap it in whole: a crash leaves the old set intact.
    with atomic_path(final) as tmp:
        rows = synthetic.generate(
            tmp,
            num_videos=cfg.num_videos,
            seconds=cfg.seconds,
            fps=cfg.fps,
            height=cfg.height,
            width=cfg.width,
            seed=cfg.seed,
        )
        if final.exists():
            shutil.rmtree(final)
    return pd.DataFrame(rows, columns=list(COLUMNS))


def main(params: Params) -> None:
    report = prepare(params)
    print(
        f"prepare: {report['rows']} videos in {params.data.csv} "
        f"({report['duplicate_videoid_rows']} re-crawled videoid rows dropped, see {PREPARE_REPORT})"
    )
