"""Crash-safe outputs: a folder output is replaced whole or not at all, and a killed build's
staging folder is either removed or taken over, never read as the output."""

import json
import os
import subprocess
import sys

import pytest

from tasks.storage.atomic import TMP_MARK, atomic_folder, reuse_file, write_metrics


def dead_pid() -> int:
    """The pid of a process that has exited (as a killed run's would be)."""
    process = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    return int(process.stdout)


def leftover_staging(final, files: dict[str, str]):
    staging = final.with_name(f"{TMP_MARK}{dead_pid()}-{final.name}")
    staging.mkdir()
    for name, text in files.items():
        (staging / name).write_text(text)
    return staging


def test_a_failed_build_leaves_the_previous_folder_whole(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "a").write_text("old")
    with pytest.raises(RuntimeError), atomic_folder(final) as staging:
        (staging / "a").write_text("new, half done")
        assert (final / "a").read_text() == "old"  # readers still see the previous output
        raise RuntimeError("killed")
    assert [path.name for path in tmp_path.iterdir()] == ["out"] and (final / "a").read_text() == "old"

    with atomic_folder(final) as staging:
        (staging / "b").write_text("new")
    assert sorted(path.name for path in final.iterdir()) == ["b"]  # replaced whole
    assert [path.name for path in tmp_path.iterdir()] == ["out"]


def test_resume_takes_over_a_dead_builds_staging_folder_without_its_half_written_files(tmp_path):
    final = tmp_path / "out"
    leftover = leftover_staging(final, {"done": "complete", f"{TMP_MARK}{dead_pid()}-partial": "half"})
    inode = (leftover / "done").stat().st_ino
    with atomic_folder(final, resume=True) as staging:
        assert sorted(path.name for path in staging.iterdir()) == ["done"]
        (staging / "more").write_text("new")
    assert sorted(path.name for path in final.iterdir()) == ["done", "more"]
    assert (final / "done").stat().st_ino == inode  # kept, not rewritten
    assert not list(tmp_path.glob(f"{TMP_MARK}*"))


def test_without_resume_a_dead_builds_staging_is_removed_and_a_live_ones_is_left_alone(tmp_path):
    final = tmp_path / "out"
    leftover_staging(final, {"done": "complete"})
    live = final.with_name(f"{TMP_MARK}{os.getppid()}-{final.name}")  # a running process's
    live.mkdir()
    with atomic_folder(final) as staging:
        assert not list(staging.iterdir())
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([live.name, "out"])


def test_reuse_file_links_a_file_and_a_folder_and_replaces_a_stale_target(tmp_path):
    previous = tmp_path / "previous"
    (previous / "folder").mkdir(parents=True)
    (previous / "file").write_text("kept")
    (previous / "folder" / "weights").write_text("kept too")
    staging = tmp_path / "staging"
    (staging / "folder").mkdir(parents=True)
    (staging / "file").write_text("stale")
    (staging / "folder" / "old").write_text("stale")
    reuse_file(previous / "file", staging / "file")
    reuse_file(previous / "folder", staging / "folder")
    assert (staging / "file").stat().st_ino == (previous / "file").stat().st_ino
    assert [path.name for path in (staging / "folder").iterdir()] == ["weights"]
    assert (staging / "folder" / "weights").stat().st_ino == (previous / "folder" / "weights").stat().st_ino
    assert not list(staging.glob(f"{TMP_MARK}*"))


def test_a_metrics_file_holds_finite_numbers_only(tmp_path):
    write_metrics({"fvd": 22.7, "kept": 223, "color_unseen": None}, tmp_path / "m.json")
    assert json.loads((tmp_path / "m.json").read_text()) == {"fvd": 22.7, "kept": 223}  # a figure not made this run is left out
    for bad in (float("nan"), float("inf"), True, "22.7", [1]):
        with pytest.raises(ValueError, match=r"m\.json: fvd = .* is not a finite number"):
            write_metrics({"fvd": bad}, tmp_path / "m.json")
    assert json.loads((tmp_path / "m.json").read_text()) == {"fvd": 22.7, "kept": 223}  # a refused write leaves the file as it was
