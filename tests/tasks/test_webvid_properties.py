"""Property test of the WebVid CSV reader: any single byte edit of a valid file is read as the
original rows (but the edited ones), set aside by line, or refused with a CsvError, never read
as a file of shifted columns (pandas used to take surplus fields of the first row as an index)."""

import csv
import io

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tasks.storage.webvid import COLUMNS, CsvError, read_webvid_rows

ROWS = [
    [f"{k:05d}", f"https://x/{k:05d}.mp4", f"PT00H00M{10 + k:02d}S", f"page{k % 3}", caption]
    for k, caption in enumerate(["a red ball rolls", "a dog, running", "waves", "a city at night, \"neon\"", "leaves\nfalling", "a cat", "snow"])
]


def valid_csv() -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    writer.writerows(ROWS)
    return buffer.getvalue().encode()


edits = st.tuples(st.sampled_from(["insert", "delete", "replace"]), st.integers(min_value=0), st.sampled_from(list(b',"\n\r;x\x00\t ')))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(edits, min_size=1, max_size=2))
def test_a_byte_edit_never_shifts_the_rows_it_did_not_touch(tmp_path, chosen):
    data = bytearray(valid_csv())
    header_end = data.index(b"\n")
    for kind, where, byte in chosen:  # edits past the header (a header edit may rename a column: refused below)
        at = header_end + 1 + where % (len(data) - header_end)
        if kind == "insert":
            data[at:at] = bytes([byte])
        elif kind == "delete" and at < len(data):
            del data[at]
        elif at < len(data):
            data[at] = byte
    path = tmp_path / "edited.csv"
    path.write_bytes(bytes(data))
    try:
        rows, malformed = read_webvid_rows(path)
    except CsvError:
        return  # refused with a message: nothing silent
    originals = {tuple(row) for row in ROWS}
    read = [tuple(row) for row in rows.loc[:, list(COLUMNS)].itertuples(index=False)]
    changed = [row for row in read if row not in originals]
    # each edit touches one record, or merges / splits two: every other row reads exactly as written
    assert len(changed) <= 2 * len(chosen), f"{len(changed)} rows read differently after {len(chosen)} byte edit(s): {changed}"
    assert len(read) + len(malformed) >= len(ROWS) - 2 * len(chosen)
