"""WebVid-format CSVs: reading with clear errors, ISO-8601 durations, re-crawled videoids."""

from __future__ import annotations

import csv
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
        ragged = rows_of_another_width(path)
        # index_col=False: pandas would otherwise take a row's surplus leading fields as an index
        # and shift every column of the file (an unquoted comma in the first row's caption)
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, index_col=False)
    except Exception as error:
        raise CsvError(f"{path}: not a readable CSV ({type(error).__name__}: {error})") from None
    if ragged:
        shown = ", ".join(f"line {line} has {width}" for line, width in ragged[:5]) + (", ..." if len(ragged) > 5 else "")
        raise CsvError(f"{path}: {len(ragged)} row(s) do not have the header's {len(frame.columns)} fields ({shown}); "
                       "quote fields that contain commas (\"a, b\")")
    missing = [column for column in COLUMNS if column not in frame.columns]
    if missing:
        raise CsvError(
            f"{path}: missing column(s) {', '.join(missing)}; a WebVid CSV has the header {','.join(COLUMNS)}"
        )
    return frame


def rows_of_another_width(path: Path) -> list[tuple[int, int]]:
    """(line, fields) of every record whose field count differs from the header's (blank lines
    aside); quoted fields may hold commas and newlines."""
    with open(path, newline="", encoding="utf-8", errors="replace") as handle:
        reader = csv.reader(handle)
        header = next(reader, [])
        return [(reader.line_num, len(record)) for record in reader if record and len(record) != len(header)]


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
