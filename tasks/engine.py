"""The training engine: one short loop for every model (UNet, TCM-VAE decoder, ControlNet).

Ray Train's `TorchTrainer` runs `train_loop` on each worker; inside, an `accelerate.Accelerator`
does device placement, DDP (over Ray's gloo/NCCL process group) and bf16 autocast on GPU (fp32
on CPU). Each worker reads its own shard of the dataset (`get_dataset_shard`). What is specific
to a model lives in a `Recipe`: how to build it, its loss for a batch, what to do after each
optimizer step, how to export it and how to draw samples.

Fault tolerance: every `checkpoint_every` steps rank 0 writes a checkpoint (safetensors weights,
optimizer and scheduler state, step, RNG states, data position) that every worker reports with
`ray.train.report`; when a worker dies, Ray Train restarts the group from the latest one
(`FailureConfig`), and a new run with the same name in the same storage resumes from it too.

MLflow (rank 0 only): the driver creates the run (params, tags); rank 0 logs per-step metrics to
it, buffered and flushed right after each checkpoint is reported, so a resumed run never logs a
step twice and its history stays one continuous line.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import mlflow.exceptions
import numpy as np
import ray
import ray.train
import torch
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from ray.train import Checkpoint, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from safetensors.torch import load_file, save_file
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from tasks.lineage import experiment_id, tracking_uri
from tasks.ray_runtime import ensure_ray


class Recipe(Protocol):
    """What the engine needs to know about one model. Must pickle (it travels to the workers)."""

    # True when some steps leave parameters out of the graph (the UNet's image steps skip its
    # temporal layers); DDP must then look for unused parameters each step
    skips_parameters: bool

    def build(self) -> nn.Module: ...

    # the loss to minimise, or a dict with it under "loss" and detached parts to log beside it
    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], step: int, generator: torch.Generator) -> torch.Tensor | dict[str, torch.Tensor]: ...

    # named groups of trainable parameters; each is clipped on its own (a GAN's discriminator must
    # not eat the generator's share of the clipping budget), all in one AdamW
    def parameter_groups(self, model: nn.Module) -> dict[str, list[nn.Parameter]]: ...

    def after_optimizer_step(self, model: nn.Module) -> None: ...

    def export(self, model: nn.Module, folder: Path) -> None: ...

    def samples(self, model: nn.Module, step: int, folder: Path) -> list[Path]: ...


@dataclass(frozen=True)
class Setup:
    """Where a run lives and what it reports to (everything here is plain data for the workers)."""

    train: Any  # a training params section: steps, batch_size, lr, checkpoint_every, num_workers, use_gpu, ...
    output_dir: str  # absolute: the exported model
    tracking_uri: str
    mlflow_run_id: str


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batches_in_epoch: int = 0  # the data position within the epoch
    skipped_steps: int = 0  # non-finite losses so far
    bad_in_a_row: int = 0


def train_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    from accelerate import Accelerator, DistributedDataParallelKwargs

    recipe: Recipe = config["recipe"]
    setup: Setup = config["setup"]
    cfg = setup.train
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    if not cfg.use_gpu:
        torch.set_num_threads(config["threads_per_worker"])
    ddp = DistributedDataParallelKwargs(find_unused_parameters=recipe.skips_parameters)
    accelerator = Accelerator(cpu=not cfg.use_gpu, mixed_precision="bf16" if cfg.use_gpu else "no", kwargs_handlers=[ddp])

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = recipe.build()
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True) if cfg.ema_decay else None
    groups = recipe.parameter_groups(model)  # frozen parts (an encoder, LPIPS) are in no group
    optimizer = torch.optim.AdamW([{"params": params} for params in groups.values()], lr=cfg.lr, weight_decay=cfg.weight_decay)
    # linear warmup, then constant (the paper's schedule); stepped by us once per optimizer step
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(1, cfg.warmup_steps)))
    state = TrainState()
    # Ray's latest checkpoint, or a newer complete one on disk: a checkpoint persisted just before a
    # crash (of the driver, or of this worker group) may never have reached Ray's records; checked
    # on every (re)start of the group (its metrics are recovered below, whether flushed or not)
    checkpoint = newest_checkpoint(ray.train.get_checkpoint(), latest_complete_checkpoint(Path(config["run_folder"])))
    if checkpoint:
        with checkpoint.as_directory() as folder:
            restored = load_checkpoint(Path(folder), model, ema, state)
    model, optimizer = accelerator.prepare(model, optimizer)
    if ema is not None:
        ema.to(accelerator.device)
    if checkpoint:
        optimizer.load_state_dict(restored["optimizer"])
        scheduler.load_state_dict(restored["scheduler"])
        restore_rng(restored["rng"][min(rank, len(restored["rng"]) - 1)])

    batches = iterate_batches(ray.train.get_dataset_shard("train"), cfg, state, rank, accelerator.device)
    logger = MetricBuffer(setup) if accelerator.is_main_process else None
    if logger and checkpoint:  # the resumed checkpoint's steps, if the crash came before their flush
        logger.recover(restored["metrics"])
    while state.step < cfg.steps:
        started = time.perf_counter()
        waited, losses, parts = 0.0, [], {}
        optimizer.zero_grad(set_to_none=True)
        for micro in range(cfg.grad_accum):
            wait_start = time.perf_counter()
            batch = next(batches)
            waited += time.perf_counter() - wait_start
            # one generator per (seed, rank, step, micro): noise and timesteps are reproducible after a resume
            generator = torch.Generator(accelerator.device).manual_seed(hash_seed(cfg.seed, rank, state.step, micro))
            sync = contextlib.nullcontext() if micro == cfg.grad_accum - 1 else accelerator.no_sync(model)
            with sync, accelerator.autocast():
                loss = recipe.loss(model, batch, state.step, generator)
            if isinstance(loss, dict):  # rank 0 logs its own parts (averaged over micro-steps)
                for name, value in loss.items():
                    if name != "loss":
                        parts[f"loss/{name}"] = parts.get(f"loss/{name}", 0.0) + float(value) / cfg.grad_accum
                loss = loss["loss"]
            loss = loss / cfg.grad_accum
            if not all_finite(accelerator, loss):  # every rank takes the same branch
                break
            accelerator.backward(loss)
            losses.append(loss.detach() * cfg.grad_accum)
        if len(losses) < cfg.grad_accum:
            state.skipped_steps += 1
            state.bad_in_a_row += 1
            if state.bad_in_a_row > cfg.max_bad_steps:
                raise FloatingPointError(f"{state.bad_in_a_row} non-finite losses in a row at step {state.step}: lower the learning rate or check the data (max_bad_steps={cfg.max_bad_steps})")
            continue
        state.bad_in_a_row = 0
        grad_norms = {name: float(accelerator.clip_grad_norm_(params, cfg.grad_clip)) for name, params in groups.items()}
        optimizer.step()
        scheduler.step()
        state.step += 1
        recipe.after_optimizer_step(accelerator.unwrap_model(model))
        if ema is not None:
            ema.update_parameters(accelerator.unwrap_model(model))

        loss_mean = accelerator.reduce(torch.stack(losses).mean(), reduction="mean").item()
        seconds = time.perf_counter() - started
        if logger:
            logger.add(state.step, {
                "loss": loss_mean, "lr": scheduler.get_last_lr()[0], **group_metrics("grad_norm", grad_norms),
                "samples_per_s": cfg.batch_size * cfg.grad_accum * world / seconds,
                "data_wait_share": waited / seconds, "skipped_steps": state.skipped_steps, **parts,
            })
        if state.step % cfg.checkpoint_every == 0 or state.step == cfg.steps:
            report_checkpoint(accelerator, model, ema, optimizer, scheduler, state, world, {"loss": loss_mean}, logger.pending if logger else [])
            if logger:
                logger.flush()
        if logger and ((cfg.sample_every and state.step % cfg.sample_every == 0) or state.step == cfg.steps):
            with tempfile.TemporaryDirectory() as folder:
                for path in recipe.samples(inference_model(accelerator, model, ema), state.step, Path(folder)):
                    logger.client.log_artifact(setup.mlflow_run_id, str(path), artifact_path=f"samples/step_{state.step:07d}")
    if accelerator.is_main_process:
        recipe.export(inference_model(accelerator, model, ema), Path(setup.output_dir))


def group_metrics(prefix: str, values: dict[str, float]) -> dict[str, float]:
    """{'decoder': 1.0, 'discriminator': 2.0} -> grad_norm (the first group's), grad_norm/discriminator."""
    names = list(values)
    return {prefix if name == names[0] else f"{prefix}/{name}": value for name, value in values.items()}


def newest_checkpoint(reported: Checkpoint | None, found: str | None) -> Checkpoint | None:
    """Ray Train's latest checkpoint, or the newest complete one on disk when that is newer."""
    if not found:
        return reported
    if reported:
        with reported.as_directory() as folder:
            if json.loads(Path(folder, "state.json").read_text())["step"] >= json.loads(Path(found, "state.json").read_text())["step"]:
                return reported
    return Checkpoint.from_directory(found)


def latest_complete_checkpoint(run_folder: Path) -> str | None:
    """The checkpoint folder with the highest step whose files are all present and readable."""
    best, best_step = None, -1
    for folder in run_folder.glob("checkpoint_*"):
        try:
            step = json.loads((folder / "state.json").read_text())["step"]
            load_file(str(folder / "model.safetensors"), device="cpu")
            torch.load(folder / "trainer.pt", map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # a copy cut short by a crash: not a checkpoint
            continue
        if step > best_step:
            best, best_step = str(folder), step
    return best


def inference_model(accelerator, model: nn.Module, ema: AveragedModel | None) -> nn.Module:
    return ema.module if ema is not None else accelerator.unwrap_model(model)


def iterate_batches(shard, cfg, state: TrainState, rank: int, device: torch.device):
    """Endless batches from this worker's shard, epoch after epoch, each epoch reshuffled with its
    own seed; after a resume the batches of the interrupted epoch already consumed are skipped."""
    while True:
        seen = 0
        iterator = shard.iter_torch_batches(
            batch_size=cfg.batch_size, drop_last=True, device=device,
            local_shuffle_buffer_size=cfg.shuffle_buffer, local_shuffle_seed=hash_seed(cfg.seed, rank, state.epoch),
        )
        for index, batch in enumerate(iterator):
            seen += 1
            if index < state.batches_in_epoch:
                continue
            state.batches_in_epoch = index + 1
            yield batch
        if seen == 0:
            raise ValueError(f"a worker's data shard has fewer than batch_size={cfg.batch_size} rows: lower batch_size or num_workers, or cache more clips")
        state.epoch += 1
        state.batches_in_epoch = 0


def hash_seed(*parts: int) -> int:
    return random.Random("/".join(map(str, parts))).getrandbits(62)


def all_finite(accelerator, loss: torch.Tensor) -> bool:
    finite = torch.isfinite(loss.detach()).float().reshape(1)
    return bool(accelerator.reduce(finite, reduction="sum").item() == accelerator.num_processes)


def report_checkpoint(accelerator, model, ema, optimizer, scheduler, state: TrainState, world: int, metrics: dict[str, float], pending: list[Metric]) -> None:
    """Rank 0 writes the checkpoint folder; every rank reports (Ray Train needs all of them)."""
    rng = [rng_state()]
    if world > 1:  # every rank's RNG state, so each resumes its own stream
        rng = [None] * world
        torch.distributed.all_gather_object(rng, rng_state())
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if accelerator.is_main_process:
            weights = {name: tensor.detach().cpu().contiguous() for name, tensor in accelerator.unwrap_model(model).state_dict().items()}
            save_file(weights, os.path.join(folder, "model.safetensors"))
            if ema is not None:
                save_file({name: tensor.detach().cpu().contiguous() for name, tensor in ema.module.state_dict().items()}, os.path.join(folder, "ema.safetensors"))
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng}, os.path.join(folder, "trainer.pt"))
            Path(folder, "state.json").write_text(json.dumps(state.__dict__))
            # the per-step metrics this checkpoint covers and MLflow may not have yet (flushed next)
            Path(folder, "metrics.json").write_text(json.dumps([[m.key, m.value, m.timestamp, m.step] for m in pending]))
            checkpoint = Checkpoint.from_directory(folder)
        ray.train.report({**metrics, "step": state.step}, checkpoint=checkpoint)


def load_checkpoint(folder: Path, model: nn.Module, ema: AveragedModel | None, state: TrainState) -> dict[str, Any]:
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    if ema is not None and (folder / "ema.safetensors").exists():
        ema.module.load_state_dict(load_file(str(folder / "ema.safetensors")))
    state.__dict__.update(json.loads((folder / "state.json").read_text()))
    restored = torch.load(folder / "trainer.pt", map_location="cpu", weights_only=True)
    restored["metrics"] = json.loads((folder / "metrics.json").read_text()) if (folder / "metrics.json").exists() else []
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


class MetricBuffer:
    """Rank 0's per-step metrics: held until the checkpoint that covers them is reported."""

    def __init__(self, setup: Setup) -> None:
        self.client = MlflowClient(setup.tracking_uri)
        self.run_id = setup.mlflow_run_id
        self.pending: list[Metric] = []

    def add(self, step: int, values: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        for key, value in values.items():
            self.pending.append(Metric(key, float(value), now, step))

    def recover(self, saved: list[list]) -> None:
        """Log a resumed checkpoint's metrics that MLflow lacks: the crash may have come after the
        checkpoint was persisted but before its flush. Exactly once either way."""
        logged = {m.step for m in self.client.get_metric_history(self.run_id, "loss")}
        self.pending = [Metric(key, value, timestamp, step) for key, value, timestamp, step in saved if step not in logged]
        self.flush()

    def flush(self) -> None:
        for start in range(0, len(self.pending), 1000):  # MLflow's batch limit
            self.client.log_batch(self.run_id, metrics=self.pending[start:start + 1000])
        self.pending = []


def history_summary(run_id: str) -> dict[str, float]:
    """From the run's whole MLflow history (all attempts): first and last 10% loss averages and
    the mean throughput figures (step 1, which pays the warm-up, left out)."""
    client = MlflowClient(tracking_uri())

    def values(key: str) -> list[float]:
        return [metric.value for metric in sorted(client.get_metric_history(run_id, key), key=lambda metric: metric.step)]

    losses = values("loss")
    out: dict[str, float] = {}
    if losses:
        tenth = max(1, len(losses) // 10)
        out.update(loss_first_10pct=float(np.mean(losses[:tenth])), loss_last_10pct=float(np.mean(losses[-tenth:])), logged_steps=len(losses))
    for key in ("samples_per_s", "data_wait_share"):
        series = values(key)
        if series:
            out[f"mean_{key}"] = float(np.mean(series[1:] or series))
    skipped = values("skipped_steps")
    out["skipped_steps"] = int(skipped[-1]) if skipped else 0
    return out


def mlflow_run(uri: str, run_name: str, marker: Path, params: dict[str, Any], tags: dict[str, str]) -> str:
    """The MLflow run of this training run: reused when `marker` holds its id (a resumed run)."""
    client = MlflowClient(uri)
    if marker.exists():
        run_id = marker.read_text().strip()
        try:
            client.update_run(run_id, status="RUNNING")
            return run_id
        except mlflow.exceptions.MlflowException:  # the run lived in another tracking store: start a new one
            pass
    run = client.create_run(experiment_id(client, uri), run_name=run_name, tags=tags)
    items = sorted(params.items())
    for start in range(0, len(items), 100):  # MLflow's params-per-batch limit
        client.log_batch(run.info.run_id, params=[Param(key, str(value)[:6000]) for key, value in items[start:start + 100]])
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(run.info.run_id)
    return run.info.run_id


def fit(recipe: Recipe, cfg: Any, dataset: ray.data.Dataset, *, run_name: str, storage: Path, output_dir: Path, params: dict[str, Any], tags: dict[str, str]) -> dict[str, Any]:
    """Train `recipe` on `dataset` with Ray Train; returns the final reported metrics and the
    MLflow run id. A second call with the same run_name and storage resumes that run."""
    ensure_ray()
    storage = storage.resolve()
    uri = tracking_uri()
    run_id = mlflow_run(uri, run_name, storage / run_name / "mlflow_run_id", params, tags)
    cluster_cpus = int(ray.cluster_resources().get("CPU", 1))
    # Ray's CPU request leaves a core free so Ray Data's read tasks can be scheduled; torch's threads
    # use every core, since reading cached shards takes little (1-2% of step time measured): on
    # 2 cores, 2 threads made a TCM-VAE step 1.8x faster than 1
    cpus_per_worker = 1.0 if cfg.use_gpu else max(0.5, min(4.0, (cluster_cpus - 1) / cfg.num_workers))
    threads_per_worker = max(1, min(4, cluster_cpus // cfg.num_workers))
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "recipe": recipe,
            "setup": Setup(train=cfg, output_dir=str(output_dir.resolve()), tracking_uri=uri, mlflow_run_id=run_id),
            "threads_per_worker": threads_per_worker,
            "run_folder": str(storage / run_name),
        },
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker={"CPU": cpus_per_worker} if not cfg.use_gpu else None),
        run_config=RunConfig(name=run_name, storage_path=str(storage), failure_config=FailureConfig(max_failures=cfg.max_failures)),
        datasets={"train": dataset},
    )
    client = MlflowClient(uri)
    try:
        result = trainer.fit()
    except Exception:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    checkpoint = result.checkpoint
    return {"mlflow_run_id": run_id, "checkpoint": checkpoint.path if checkpoint else None, "metrics": result.metrics or {}}

