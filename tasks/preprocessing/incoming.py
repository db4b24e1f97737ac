"""New training data for scheduled retraining: rows of an incoming WebVid CSV joined to the one
the prepare stage reads (prepare.webvid_csv)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from tasks.storage.atomic import atomic_path
from tasks.storage.webvid import COLUMNS, read_webvid_csv


def append_new_rows(new_csv: str | Path, target: str | Path) -> int:
    """Rows of new_csv whose (videoid, caption) target lacks, appended to target; returns how many."""
    incoming = read_webvid_csv(new_csv)  # a clear error for a file that is not a WebVid CSV
    current = read_webvid_csv(target) if Path(target).is_file() else pd.DataFrame(columns=list(COLUMNS))
    seen = set(zip(current["videoid"].astype(str), current["name"].astype(str)))
    fresh = incoming[[(str(v), str(n)) not in seen for v, n in zip(incoming["videoid"], incoming["name"])]]
    if len(fresh):
        with atomic_path(target) as tmp:
            pd.concat([current, fresh], ignore_index=True).loc[:, list(COLUMNS)].to_csv(tmp, index=False)
    return len(fresh)
