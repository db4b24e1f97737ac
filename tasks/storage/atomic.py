"""Crash-safe writes: every output is written under a temporary name in its own folder, then
renamed. A rename within one filesystem is atomic, so a crash leaves either the old file or the
complete new one, never a half-written file that a later stage (or DVC) would read."""

from __future__ import annotations

import contextlib
import ctypes
import json
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
def atomic_folder(final: str | Path) -> Iterator[Path]:
    """Yield an empty staging folder beside `final`; it replaces `final` whole if the block
    succeeds. A staging folder a killed run left for the same output is removed first."""
    final = Path(final)
    remove_stale_temporaries(final.parent, names=(final.name,))
    with atomic_path(final) as staging:
        staging.mkdir()
        yield staging


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


def remove_stale_temporaries(folder: str | Path, names: tuple[str, ...] = ()) -> None:
    """Delete leftovers of a crashed run (named by `atomic_path`) before a rerun: only those whose
    writer is no longer running, and, when `names` is given, only temporaries of those outputs (a
    folder the user owns, such as the one holding their CSV, keeps everything else)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for leftover in folder.glob(f"{TMP_MARK}*"):
        pid, _, final_name = leftover.name.removeprefix(TMP_MARK).partition("-")
        if not pid.isdigit() or (names and final_name not in names) or process_alive(int(pid)):
            continue
        shutil.rmtree(leftover) if leftover.is_dir() and not leftover.is_symlink() else leftover.unlink()


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (signal 0 checks without signalling)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True
