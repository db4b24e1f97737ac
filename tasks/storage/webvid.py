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
    """All columns as strings (videoids like '00123' must keep their zeros), in file order. A row
    whose field count differs from the header's is an error naming its line (see read_webvid_rows
    to set such rows aside instead)."""
    frame, malformed = read_webvid_rows(path)
    if len(malformed):
        shown = ", ".join(f"line {row.line} has {row.fields}" for row in malformed.head(5).itertuples()) + (", ..." if len(malformed) > 5 else "")
        raise CsvError(f"{path}: {len(malformed)} row(s) do not have the header's {len(frame.columns)} fields ({shown}); "
                       "quote fields that contain commas (\"a, b\")")
    return frame


def read_webvid_rows(path: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One pass of the csv module over the file: (rows, malformed), where malformed lists each
    record whose field count differs from the header's (line, fields, text), so one bad row costs
    that row, not the file. Nothing is inferred: every value is the string written (no index
    column, no NA conversion); quoted fields may hold commas and newlines; blank lines are skipped;
    a UTF-8 byte-order mark is dropped."""
    path = Path(path)
    if not path.is_file():
        raise CsvError(f"{path}: WebVid CSV not found (set data.csv, or run the prepare stage first)")
    records, malformed, line = [], [], 0
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = next(reader, [])
            for record in reader:
                line = reader.line_num  # the record's last line (quoted fields may span lines)
                if not record:
                    continue
                if len(record) == len(header):
                    records.append(record)
                else:
                    malformed.append({"line": line, "fields": len(record), "text": ",".join(record)[:200]})
    except UnicodeDecodeError as error:
        raise CsvError(f"{path}: not UTF-8 text ({error.reason} after line {line}); save it as UTF-8") from None
    except csv.Error as error:
        raise CsvError(f"{path}: not a readable CSV (after line {line}: {error})") from None
    missing = [column for column in COLUMNS if column not in header]
    if missing:
        raise CsvError(f"{path}: missing column(s) {', '.join(missing)}; a WebVid CSV has the header {','.join(COLUMNS)}")
    if len(set(header)) != len(header):
        raise CsvError(f"{path}: the header names a column twice ({','.join(header)})")
    return pd.DataFrame(records, columns=header, dtype=str), pd.DataFrame(malformed, columns=["line", "fields", "text"])


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
