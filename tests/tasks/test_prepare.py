import hashlib
import itertools
import json
import os

import numpy as np
import pandas as pd
import pytest

from eval.caption_probe import DIRECTIONS, PALETTE, SHAPES, parse_caption, probe
from tasks.config.params import load_params
from tasks.config.paths import PREPARE_REPORT
from tasks.preprocessing.synthetic import generate, iso_duration, never_drawn, render
from tasks.stages import prepare as prepare_stage
from tasks.storage.video_io import probe_video
from tasks.storage.webvid import COLUMNS, CsvError, parse_iso_duration, read_webvid_csv


def digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*.mp4"))}


def test_synthetic_set_is_deterministic_real_h264(tmp_path):
    rows_a = generate(tmp_path / "a", num_videos=5, seconds=1.0, fps=12, height=48, width=64, seed=3)
    rows_b = generate(tmp_path / "b", num_videos=5, seconds=1.0, fps=12, height=48, width=64, seed=3)
    assert rows_a == rows_b and digest(tmp_path / "a") == digest(tmp_path / "b")
    rows_c = generate(tmp_path / "c", num_videos=5, seconds=1.0, fps=12, height=48, width=64, seed=4)
    assert digest(tmp_path / "c")["000/synth00000.mp4"] != digest(tmp_path / "a")["000/synth00000.mp4"]
    assert [row["name"] for row in rows_c] != [row["name"] for row in rows_a]
    probe = probe_video(tmp_path / "a" / "000" / "synth00000.mp4")
    assert (probe.codec, probe.num_frames, probe.fps, probe.height, probe.width) == ("h264", 12, 12.0, 48, 64)
    assert rows_a[0]["name"].startswith("a ") and " moves " in rows_a[0]["name"]


@pytest.mark.parametrize("text, seconds", [("PT00H00M15S", 15), ("PT1H2M3S", 3723), ("PT12.5S", 12.5), ("P1DT0H0M1S", 86401)])
def test_iso_durations(text, seconds):
    assert parse_iso_duration(text) == seconds


def test_iso_duration_round_trip_and_rejects_garbage():
    assert parse_iso_duration(iso_duration(75.2)) == 75
    with pytest.raises(ValueError, match="ISO-8601"):
        parse_iso_duration("15 seconds")


def test_prepare_webvid_keeps_the_last_caption_of_a_recrawled_videoid(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pd.DataFrame(
        [
            {"videoid": "0007", "contentUrl": "u", "duration": "PT00H00M10S", "page_dir": "p", "name": "old caption"},
            {"videoid": "0008", "contentUrl": "u", "duration": "PT00H00M10S", "page_dir": "p", "name": "another video"},
            {"videoid": "0007", "contentUrl": "u", "duration": "PT00H00M10S", "page_dir": "p", "name": "new caption"},
        ]
    ).to_csv("mine.csv", index=False)
    (tmp_path / "params.yaml").write_text("prepare:\n  source: webvid\n  webvid_csv: mine.csv\n")
    summary = prepare_stage.prepare(load_params("params.yaml"))
    written = read_webvid_csv("data/raw/webvid.csv")
    assert written["videoid"].tolist() == ["0008", "0007"]  # ids stay strings with their zeros
    assert written.set_index("videoid").loc["0007", "name"] == "new caption"
    assert summary["duplicates"] == [{"videoid": "0007", "name": "old caption"}]
    assert json.loads((tmp_path / PREPARE_REPORT).read_text())["duplicate_videoid_rows"] == 1


def test_prepare_synthetic_writes_csv_and_videos(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("prepare:\n  num_videos: 6\n  seconds: 1.0\n")
    summary = prepare_stage.prepare(load_params("params.yaml"))
    frame = read_webvid_csv("data/raw/webvid.csv")
    assert list(frame.columns) == list(COLUMNS)
    assert summary == {**summary, "input_rows": 8, "rows": 7, "duplicate_videoid_rows": 1}  # +copy, +re-crawl
    assert all((tmp_path / "data/raw/videos" / r.page_dir / f"{r.videoid}.mp4").is_file() for r in frame.itertuples())
    assert not list((tmp_path / "data").rglob(".tmp-*"))


def test_malformed_csv_names_the_missing_column(tmp_path):
    (tmp_path / "bad.csv").write_text("videoid,name\n1,a caption\n")
    with pytest.raises(CsvError, match="missing column\\(s\\) contentUrl, duration, page_dir"):
        read_webvid_csv(tmp_path / "bad.csv")
    with pytest.raises(CsvError, match="run the prepare stage"):
        read_webvid_csv(tmp_path / "absent.csv")


def test_an_unquoted_comma_is_named_by_its_line_not_read_as_a_shifted_file(tmp_path):
    """pandas took the first row's surplus field as an index and shifted every column; now the
    row is named, and a quoted comma still reads."""
    header = ",".join(COLUMNS)
    (tmp_path / "ragged.csv").write_text(f"{header}\n1,https://x/1.mp4,PT00H00M05S,p,a red, round ball\n2,https://x/2.mp4,PT00H00M05S,p,fine\n")
    with pytest.raises(CsvError, match=r"1 row\(s\) do not have the header's 5 fields \(line 2 has 6\); quote fields"):
        read_webvid_csv(tmp_path / "ragged.csv")
    (tmp_path / "quoted.csv").write_text(f'{header}\n1,https://x/1.mp4,PT00H00M05S,p,"a red, round ball"\n')
    frame = read_webvid_csv(tmp_path / "quoted.csv")
    assert frame.loc[0, "name"] == "a red, round ball" and frame.loc[0, "videoid"] == "1"


def test_prepare_clears_leftovers_of_a_killed_run_and_nothing_else(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data/raw").mkdir(parents=True)
    dead_pid = 2**22 + 17  # above Linux's pid_max: no process has it
    (tmp_path / f"data/raw/.tmp-{dead_pid}-webvid.csv").write_text("half a csv")
    (tmp_path / f"data/raw/.tmp-{dead_pid}-videos").mkdir()
    (tmp_path / "data/raw/.tmp-notes").write_text("the user's, not a temporary of ours")
    (tmp_path / f"data/raw/.tmp-{os.getppid()}-webvid.csv").write_text("a live writer's (another process)")
    (tmp_path / "params.yaml").write_text("prepare:\n  num_videos: 2\n  seconds: 1.0\n")
    prepare_stage.prepare(load_params("params.yaml"))
    assert {path.name for path in (tmp_path / "data").rglob(".tmp-*")} == {".tmp-notes", f".tmp-{os.getppid()}-webvid.csv"}


def test_prepare_refuses_to_replace_a_folder_of_videos_it_did_not_write(tmp_path, monkeypatch):
    """It used to rmtree data.videos_root and fill it with the synthetic set, exit 0."""
    monkeypatch.chdir(tmp_path)
    mine = tmp_path / "my_videos"
    (mine / "holiday").mkdir(parents=True)
    (mine / "holiday/beach.mp4").write_bytes(b"precious")
    (tmp_path / "params.yaml").write_text("prepare:\n  num_videos: 2\n  seconds: 1.0\n")
    with pytest.raises(ValueError, match=r"data.videos_root my_videos: holds files prepare did not write"):
        prepare_stage.prepare(load_params("params.yaml", ["data.videos_root=my_videos"]))
    assert (mine / "holiday/beach.mp4").read_bytes() == b"precious" and not (tmp_path / "data/raw/webvid.csv").exists()
    # its own folder (the marker) it replaces, twice in a row, with the same videos
    prepare_stage.prepare(load_params("params.yaml"))
    first = digest(tmp_path / "data/raw/videos")
    prepare_stage.prepare(load_params("params.yaml"))
    assert digest(tmp_path / "data/raw/videos") == first and (tmp_path / "data/raw/videos" / prepare_stage.SYNTHETIC_MARKER).is_file()


def test_prepare_renders_the_embedded_set_only_into_a_local_folder(tmp_path, monkeypatch):
    """A bucket is where a team's videos are read from (source=webvid), not where prepare renders:
    it says so before writing anything, not after a local folder named `s3:` appeared."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("prepare:\n  num_videos: 2\n  seconds: 1.0\n")
    with pytest.raises(ValueError, match=r"data.videos_root s3://team/videos: prepare.source=synthetic renders the embedded set into a local folder"):
        prepare_stage.prepare(load_params("params.yaml", ["data.videos_root=s3://team/videos"]))
    assert not any(tmp_path.rglob("s3*")) and not (tmp_path / "data/raw/webvid.csv").exists()


def test_prepare_never_writes_over_the_users_csv(tmp_path, monkeypatch):
    """With data.csv = prepare.webvid_csv it used to rewrite the user's CSV, rows and columns dropped."""
    monkeypatch.chdir(tmp_path)
    original = ",".join(COLUMNS) + ",extra\n1,u,PT00H00M05S,p,a caption,x\n1,u,PT00H00M05S,p,again,y\n"
    (tmp_path / "mine.csv").write_text(original)
    (tmp_path / "params.yaml").write_text("prepare:\n  source: webvid\n  webvid_csv: ./mine.csv\ndata:\n  csv: mine.csv\n")
    with pytest.raises(ValueError, match="data.csv and prepare.webvid_csv are the same file"):
        prepare_stage.prepare(load_params("params.yaml"))
    assert (tmp_path / "mine.csv").read_text() == original


def test_the_demo_set_leaves_combinations_unseen_but_shows_every_word_with_every_other():
    """A quarter of colour x shape x direction is never drawn (evaluate's unseen prompts), while
    every pair of words still occurs together, so an unseen prompt is new only as a whole."""
    scenes = [parse_caption(render(16, 16, 2, np.random.default_rng([0, k]), static=False, cut_at=None)[1]) for k in range(600)]
    drawn = {(scene["color"], scene["shape"], scene["direction"]) for scene in scenes}
    held_out = {combination for combination in itertools.product(PALETTE, SHAPES, DIRECTIONS) if never_drawn(*combination)}
    assert len(held_out) == len(PALETTE) * len(SHAPES) and not drawn & held_out
    assert drawn == set(itertools.product(PALETTE, SHAPES, DIRECTIONS)) - held_out  # all the others do occur
    sizes = {"color": len(PALETTE), "shape": len(SHAPES), "direction": len(DIRECTIONS)}
    for first, second in itertools.combinations(sizes, 2):
        assert len({(scene[first], scene[second]) for scene in scenes}) == sizes[first] * sizes[second], (first, second)


def test_where_a_demo_shape_travels_is_not_told_by_its_direction_alone():
    """Shapes moving the same way keep to lanes across the frame that differ from video to video, so
    a control map says where the shape is, which the caption does not (train_controlnet's check)."""
    lanes: dict[str, list[float]] = {direction: [] for direction in DIRECTIONS}
    for k in range(120):
        frames, caption = render(64, 64, 8, np.random.default_rng([0, k]), static=False, cut_at=None)
        direction = parse_caption(caption)["direction"]
        across = 0 if DIRECTIONS[direction][0] == 0 else 1  # horizontal travel: the lane is y
        lanes[direction].append(float(np.nanmean(probe(frames).track[:, across])))
    for direction, seen in lanes.items():
        assert len(seen) >= 10 and np.std(seen) > 3.0, (direction, np.round(seen, 1))  # px on a 64 px frame


def test_prepare_drops_a_malformed_row_by_its_line_and_keeps_the_rest(tmp_path, monkeypatch):
    """One unquoted comma used to cost the whole file (or, in the first row, shift every column)."""
    monkeypatch.chdir(tmp_path)
    header = ",".join(COLUMNS)
    (tmp_path / "mine.csv").write_text(f"\ufeff{header}\n1,https://x/1.mp4,PT00H00M05S,p,fine\n2,https://x/2.mp4,PT00H00M05S,p,a red, round ball\n"
                                       f'3,https://x/3.mp4,PT00H00M05S,p,"spans\ntwo lines"\n')
    (tmp_path / "params.yaml").write_text("prepare:\n  source: webvid\n  webvid_csv: mine.csv\n")
    report = prepare_stage.prepare(load_params("params.yaml"))
    assert (report["input_rows"], report["rows"], report["malformed"]) == (3, 2, [{"line": 3, "fields": 6}])
    written = read_webvid_csv("data/raw/webvid.csv")
    assert written["videoid"].tolist() == ["1", "3"] and written.loc[1, "name"] == "spans\ntwo lines"
