"""Checkpoints and RNG state: what a worker group writes every `checkpoint_every` steps and reads
back after a crash, so that a resumed run continues the uninterrupted one exactly.

A checkpoint folder holds model.safetensors (whole weights), ema.safetensors (when kept),
trainer.pt (AdamW and scheduler state, every rank's RNG states; `torch.load(weights_only=True)`
reads it), state.json (step and data position) and metrics.json (the per-step metrics it covers
that MLflow may not have yet).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs
import ray
import ray.train
import torch
from mlflow.entities import Metric
from ray.train import Checkpoint
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

from tasks.storage import object_store
from tasks.training.weights import ExponentialAverage, full_state_dict, gather_whole


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    # each data stream's position: [epoch, batches read in the epoch] (engine.iterate_batches)
    positions: dict[str, list[int]] = field(default_factory=dict)
    skipped_steps: int = 0  # non-finite losses so far
    bad_in_a_row: int = 0


CHECKPOINT_FILES = ("model.safetensors", "trainer.pt", "metrics.json", "state.json")  # ema.safetensors only when kept


def checkpoint_step(checkpoint: Checkpoint) -> int:
    """The step a checkpoint holds, read from its state.json alone (wherever it lives)."""
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/state.json") as stream:
        return json.loads(stream.read())["step"]


def newest_checkpoint(reported: Checkpoint | None, found: Checkpoint | None) -> Checkpoint | None:
    """Ray Train's latest checkpoint, or the newest complete one in the run folder when that is newer."""
    if not found:
        return reported
    if reported and checkpoint_step(reported) >= checkpoint_step(found):
        return reported
    return found


def latest_complete_checkpoint(run_folder: str) -> Checkpoint | None:
    """The checkpoint folder of `run_folder` (a local path or an object-store URI) with the highest
    step whose files are all present and readable, tried newest first: only the newest are
    opened, and only their headers. In object storage, a file is a single PUT that lands whole or
    not at all, so a copy cut short by a crash lacks files rather than holding a truncated one."""
    def step_of(folder: str) -> int:
        try:
            return json.loads(object_store.read_text(object_store.join(folder, "state.json")) or "")["step"]
        except (OSError, ValueError, KeyError):
            return -1

    steps = {folder: step_of(folder) for folder in object_store.subfolders(run_folder, "checkpoint_")}  # one read each (a GET in a bucket)
    for folder in sorted(steps, key=steps.__getitem__, reverse=True):
        if steps[folder] < 0:
            break
        fs, path = object_store.filesystem(folder)
        if object_store.is_uri(folder):
            if set(CHECKPOINT_FILES) <= set(object_store.file_names(folder)):
                return Checkpoint(path, filesystem=fs)
            continue
        try:
            with safe_open(f"{path}/model.safetensors", framework="pt"):  # checks the header against the file size
                pass
            torch.load(f"{path}/trainer.pt", map_location="cpu", weights_only=True, mmap=True)  # reads the zip's directory at the end
            Path(path, "metrics.json").read_text()
        except Exception:  # a copy cut short by a crash: not a checkpoint
            continue
        return Checkpoint(path, filesystem=fs)
    return None


@contextlib.contextmanager
def local_folder(checkpoint: Checkpoint) -> Iterator[Path]:
    """The checkpoint's files in a local folder: the folder itself on a local disk, else this
    process's own download, removed afterwards. Not Ray's `as_directory`: it shares one download
    per node between the processes holding the same Checkpoint object, and a rank that arrives
    after the first download has finished downloads again over the files another rank is reading
    (two FSDP ranks resuming from S3 read a torn trainer.pt)."""
    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        yield Path(checkpoint.path)
        return
    with tempfile.TemporaryDirectory(prefix="versvideo-checkpoint-") as folder:
        checkpoint.to_directory(folder)
        yield Path(folder)


def report_checkpoint(accelerator, model, ema: ExponentialAverage | None, optimizer, scheduler, state: TrainState, world: int, metrics: dict[str, float], pending: list[Metric]) -> None:
    """Every rank gathers (FSDP) and reports (Ray Train needs all of them); rank 0 writes the folder."""
    rng = [rng_state()]
    if world > 1:  # every rank's RNG state, so each resumes its own stream
        rng = [None] * world
        torch.distributed.all_gather_object(rng, rng_state())
    keep = accelerator.is_main_process
    unwrapped = accelerator.unwrap_model(model)
    weights = full_state_dict(unwrapped, keep)
    ema_weights = gather_whole(ema.by_name(), keep) if ema is not None else None  # its parameters only: the rest is in weights
    # keyed by parameter name and whole on rank 0, whatever the sharding
    optimizer_state = get_optimizer_state_dict(model, optimizer.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if keep:
            save_file(weights, os.path.join(folder, "model.safetensors"))
            if ema_weights is not None:
                save_file(ema_weights, os.path.join(folder, "ema.safetensors"))
            torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "rng": rng}, os.path.join(folder, "trainer.pt"))
            Path(folder, "state.json").write_text(json.dumps(state.__dict__))
            # the per-step metrics this checkpoint covers and MLflow may not have yet (flushed next)
            Path(folder, "metrics.json").write_text(json.dumps([[m.key, m.value, m.timestamp, m.step] for m in pending]))
            checkpoint = Checkpoint.from_directory(folder)
        ray.train.report({**metrics, "step": state.step}, checkpoint=checkpoint)


def load_checkpoint(folder: Path, model: nn.Module, state: TrainState) -> dict[str, Any]:
    """Whole weights into the (not yet sharded) model; the rest is returned for after `prepare`."""
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    saved = json.loads((folder / "state.json").read_text())
    if "epoch" in saved:  # a checkpoint from before the data streams: its one position is the "train" stream's
        saved["positions"] = {"train": [saved.pop("epoch"), saved.pop("batches_in_epoch")]}
    state.__dict__.update(saved)
    restored = torch.load(folder / "trainer.pt", map_location="cpu", weights_only=True)
    restored["ema"] = load_file(str(folder / "ema.safetensors")) if (folder / "ema.safetensors").exists() else None
    restored["metrics"] = json.loads((folder / "metrics.json").read_text())
    return restored


def rng_state() -> dict[str, Any]:
    """RNG states as tensors and plain containers (so torch.load(weights_only=True) reads them)."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
            "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]], "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore_rng(saved: dict[str, Any]) -> None:
    torch.set_rng_state(saved["torch"])
    kind, keys, position, has_gauss, cached = saved["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    version, internal, gauss_next = saved["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if saved["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda"])
