"""WebVid-format CSVs: reading with clear errors, ISO-8601 durations, re-crawled videoids."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

COLUMNS = ("videoid", "contentUrl", "duration", "page_dir", "name")
_ISO_DURATION = re.compile(r"^P(?:(\d+)D)?T?(?:(\d+)H)?(?:(\d+)M)?(?:(\d+(?:\.\d+)?)S)?$")


class CsvError(ValueError):
    pass


def read_webvid_csv(path: str | Path) -> pd.DataFrame:
    """All columns as strings (videoids like '00123' must keep their zeros), in file order."""
    path = Path(path)
    if not path.exists():
        raise CsvError(f"{path}: WebVid CSV not found (set data.csv, or run the prepare stage first)")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as error:
        raise CsvError(f"{path}: not a readable CSV ({type(error).__name__}: {error})") from None
    missing = [column for column in COLUMNS if column not in frame.columns]
    if missing:
        raise CsvError(
            f"{path}: missing column(s) {', '.join(missing)}; a WebVid CSV has the header {','.join(COLUMNS)}"
        )
    return frame


def parse_iso_duration(text: str) -> float:
    """'PT00H00M15S' -> 15.0 seconds; raises ValueError on anything else."""
    match = _ISO_DURATION.match(str(text).strip())
    if not match or not any(match.groups()):
        raise ValueError(f"not an ISO-8601 duration: {text!r} (expected e.g. PT00H00M15S)")
    days, hours, minutes, seconds = (float(group) if group else 0.0 for group in match.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def dedupe_videoids(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Keep the last row of each videoid (the newest crawl's caption); return (kept, dropped)."""
    last = ~frame.duplicated(subset="videoid", keep="last")
    return frame[last].reset_index(drop=True), frame[~last].reset_index(drop=True)
