"""Crash-safe writes: every output is written under a temporary name in its own folder, then
renamed. A rename within one filesystem is atomic, so a crash leaves either the old file or the
complete new one, never a half-written file that a later stage (or DVC) would read."""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

TMP_MARK = ".tmp-"


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it to `final` only if the block succeeds.

    The block may make a file or a folder there. A folder replaces an existing folder in one
    step (Linux's renameat2 exchange), so readers see the whole old folder or the whole new one."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{TMP_MARK}{os.getpid()}-{final.name}")
    try:
        yield tmp
        if tmp.is_dir() and final.is_dir() and not final.is_symlink():
            swap_folders(tmp, final)  # the old folder is now at tmp, removed below
        else:
            os.replace(tmp, final)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_folder(final: str | Path, resume: bool = False) -> Iterator[Path]:
    """Yield a staging folder beside `final`; it replaces `final` whole if the block succeeds, so
    until then readers see the previous output, complete.

    A staging folder that a killed run left for the same output is removed first, or, with
    `resume`, taken over as this run's staging folder (its complete files are kept; what its
    writer left half-written is removed), so a crash costs only the work in flight."""
    final = Path(final)
    leftovers = sorted(stale_temporaries(final.parent, names=(final.name,)), key=lambda path: path.stat().st_mtime)
    adopted = leftovers.pop() if resume and leftovers and leftovers[-1].is_dir() else None
    for leftover in leftovers:
        remove_path(leftover)
    with atomic_path(final) as staging:
        if adopted is not None:
            os.rename(adopted, staging)
            remove_stale_temporaries(staging)
        else:
            staging.mkdir()
        yield staging


def reuse_file(previous: Path, target: Path) -> None:
    """Put a complete file (or folder) of the previous output into a staging folder without
    rewriting it: a hard link where the filesystem allows (outputs are only ever replaced by
    rename, never written in place, so two names for one file are safe), a copy otherwise."""
    with atomic_path(target) as tmp:
        if previous.is_dir():
            shutil.copytree(previous, tmp, copy_function=_link_or_copy)
        else:
            _link_or_copy(previous, tmp)


def _link_or_copy(source: str | Path, target: str | Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def swap_folders(new: Path, final: Path) -> None:
    """Exchange two folders in one step (renameat2 RENAME_EXCHANGE: Linux >= 3.15 on ext4, xfs,
    btrfs, tmpfs). Where the kernel or filesystem cannot (NFS, macOS), the old folder is deleted
    before the rename: for that moment the output is missing, never half-written."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    at_fdcwd, rename_exchange = -100, 2
    if renameat2 is not None and renameat2(at_fdcwd, os.fsencode(new), at_fdcwd, os.fsencode(final), rename_exchange) == 0:
        return
    shutil.rmtree(final)
    os.replace(new, final)
    new.mkdir()  # atomic_path removes the temporary name, as after an exchange


def write_parquet(frame: pd.DataFrame, final: str | Path) -> None:
    with atomic_path(final) as tmp:
        frame.to_parquet(tmp, index=False)


def write_npy(array: np.ndarray, final: str | Path) -> None:
    with atomic_path(final) as tmp:
        with open(tmp, "wb") as handle:  # np.save on a handle keeps the temporary name as is (no .npy added)
            np.save(handle, array)


def save_safetensors(tensors: dict, final: str | Path) -> None:
    from safetensors.torch import save_file

    with atomic_path(final) as tmp:
        save_file(tensors, str(tmp))


def write_json(payload: Any, final: str | Path) -> None:
    with atomic_path(final) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def write_metrics(figures: dict[str, float | None], final: str | Path) -> None:
    """A DVC metrics file: a few headline numbers under flat keys. A figure this run did not make
    (None) is left out; any other value that is not a finite number is refused, loudly (JSON has
    no NaN, and DVC would show it as text)."""
    numbers = {}
    for key, value in figures.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{final}: {key} = {value!r} is not a finite number")
        numbers[key] = value
    write_json(numbers, final)


def remove_stale_temporaries(folder: str | Path, names: tuple[str, ...] = ()) -> None:
    """Delete leftovers of a crashed run (named by `atomic_path`) before a rerun: only those whose
    writer is no longer running, and, when `names` is given, only temporaries of those outputs (a
    folder the user owns, such as the one holding their CSV, keeps everything else)."""
    for leftover in stale_temporaries(folder, names):
        remove_path(leftover)


def stale_temporaries(folder: str | Path, names: tuple[str, ...] = ()) -> list[Path]:
    """Temporaries in `folder` (of the outputs `names`, or of any) whose writer is dead."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = []
    for leftover in folder.glob(f"{TMP_MARK}*"):
        pid, _, final_name = leftover.name.removeprefix(TMP_MARK).partition("-")
        if pid.isdigit() and (not names or final_name in names) and not process_alive(int(pid)):
            stale.append(leftover)
    return stale


def remove_path(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (signal 0 checks without signalling)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True
