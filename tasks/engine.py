"""The training engine: one short loop for every model (UNet, TCM-VAE decoder, ControlNet).

Ray Train's `TorchTrainer` runs `train_loop` on each worker; inside, an `accelerate.Accelerator`
does device placement, data parallelism over Ray's gloo/NCCL process group (`strategy`: DDP, or
FSDP2 sharding weights, gradients and optimizer state) and bf16 autocast on GPU (fp32 on CPU).
Each worker reads its own shard of the dataset (`get_dataset_shard`). What is specific to a model
lives in a `Recipe`: how to build it, its loss for a batch, what to do after each optimizer step,
how to export it and how to draw samples.

Under FSDP no rank holds whole weights, so whatever needs them (checkpoints, EMA export, samples,
the exported model) gathers them on every rank at once (`full_state_dict`), and rank 0 rebuilds a
plain copy of the model from them. DDP takes the same path, so both strategies are one loop.

Fault tolerance: every `checkpoint_every` steps rank 0 writes a checkpoint (safetensors weights,
optimizer and scheduler state, step, RNG states, data position) that every worker reports with
`ray.train.report`; when a worker dies, Ray Train restarts the group from the latest one
(`FailureConfig`), and a new run with the same name in the same storage resumes from it too.

MLflow (rank 0 only): the driver creates the run (params, tags); rank 0 logs per-step metrics to
it, buffered and flushed right after each checkpoint is reported, so a resumed run never logs a
step twice and its history stays one continuous line. At the end the driver tags the run with
the latest checkpoint's and the exported weights' paths and sha256s (the files stay on disk).
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
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from ray import cloudpickle
from ray.train import Checkpoint, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.tensor import DTensor, distribute_tensor

from model.weights import file_sha256
from tasks.lineage import experiment_id, tracking_uri
from tasks.ray_runtime import ensure_ray


class Recipe(Protocol):
    """What the engine needs to know about one model. Must pickle (it travels to the workers)."""

    # True when some steps leave parameters out of the graph (the UNet's image steps skip its
    # temporal layers); DDP must then look for unused parameters each step
    skips_parameters: bool

    # class names of the blocks FSDP shards as one unit each (their weights are gathered for their
    # own forward and backward only); what lies outside them forms the root unit
    fsdp_blocks: tuple[str, ...]

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


def train_loop(train_loop_config: dict[str, bytes]) -> None:
    """Runs on every Ray Train worker."""
    config = cloudpickle.loads(train_loop_config["pickled"])
    recipe: Recipe = config["recipe"]
    setup: Setup = config["setup"]
    cfg = setup.train
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    if not cfg.use_gpu:
        torch.set_num_threads(config["threads_per_worker"])
    accelerator = make_accelerator(cfg, recipe)

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = recipe.build()
    # frozen parts (an encoder, LPIPS) are in no group
    optimizer = torch.optim.AdamW([{"params": params} for params in recipe.parameter_groups(model).values()], lr=cfg.lr, weight_decay=cfg.weight_decay)
    # linear warmup, then constant (the paper's schedule); stepped by us once per optimizer step
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(1, cfg.warmup_steps)))
    state = TrainState()
    # Ray's latest checkpoint, or a newer complete one on disk: a checkpoint persisted just before a
    # crash (of the driver, or of this worker group) may never have reached Ray's records; checked
    # on every (re)start of the group (its metrics are recovered below, whether flushed or not)
    checkpoint = newest_checkpoint(ray.train.get_checkpoint(), latest_complete_checkpoint(Path(config["run_folder"])))
    if checkpoint:
        with checkpoint.as_directory() as folder:
            restored = load_checkpoint(Path(folder), model, state)  # whole weights, before sharding
    model, optimizer = accelerator.prepare(model, optimizer)
    # FSDP replaced the parameters by sharded ones: the groups (clipped apart) are taken again
    groups = recipe.parameter_groups(accelerator.unwrap_model(model))
    ema = ExponentialAverage(accelerator.unwrap_model(model), cfg.ema_decay) if cfg.ema_decay else None
    if checkpoint:
        # not strict: AdamW has no state yet for parameters no step has reached (an unused adapter)
        set_optimizer_state_dict(model, optimizer.optimizer, restored["optimizer"], options=StateDictOptions(full_state_dict=True, strict=False))
        scheduler.load_state_dict(restored["scheduler"])
        if ema is not None and restored["ema"] is not None:
            ema.load_full(restored["ema"])
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
        grad_norms = {name: float(whole(accelerator.clip_grad_norm_(params, cfg.grad_clip))) for name, params in groups.items()}
        optimizer.step()
        scheduler.step()
        state.step += 1
        recipe.after_optimizer_step(accelerator.unwrap_model(model))
        if ema is not None:
            ema.update(accelerator.unwrap_model(model))

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
        if cfg.sample_every and state.step % cfg.sample_every == 0 and state.step < cfg.steps:
            log_samples(logger, recipe, inference_copy(accelerator, recipe, model, ema), state.step)
    # the final samples and export; also when a resumed run finds its last checkpoint already
    # final (a crash before the export)
    plain = inference_copy(accelerator, recipe, model, ema)
    log_samples(logger, recipe, plain, state.step)
    if accelerator.is_main_process:
        recipe.export(plain, Path(setup.output_dir))


def log_samples(logger: MetricBuffer | None, recipe: Recipe, plain: nn.Module | None, step: int) -> None:
    """Rank 0 draws the recipe's samples from the plain copy and logs them as MLflow artifacts."""
    if logger is None:
        return
    with tempfile.TemporaryDirectory() as folder:
        for path in recipe.samples(plain, step, Path(folder)):
            logger.client.log_artifact(logger.run_id, str(path), artifact_path=f"samples/step_{step:07d}")


def make_accelerator(cfg, recipe: Recipe):
    """DDP or FSDP2 (`cfg.strategy`) over Ray's process group; bf16 autocast on GPU, fp32 on CPU."""
    from accelerate import Accelerator, DistributedDataParallelKwargs, FullyShardedDataParallelPlugin
    from accelerate.utils import DistributedType

    ddp = DistributedDataParallelKwargs(find_unused_parameters=recipe.skips_parameters)
    fsdp = None
    if cfg.strategy == "fsdp":
        fsdp = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=list(recipe.fsdp_blocks))
    accelerator = Accelerator(cpu=not cfg.use_gpu, mixed_precision="bf16" if cfg.use_gpu else "no", fsdp_plugin=fsdp, kwargs_handlers=[ddp])
    if fsdp is not None and accelerator.num_processes > 1 and accelerator.distributed_type != DistributedType.FSDP:
        # Accelerate switches FSDP on for accelerators only, while torch's FSDP2 shards over gloo on
        # CPU too (how the tests run this path on 2 CPU workers); one worker has nothing to shard
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = fsdp
    return accelerator


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor as a whole: FSDP's sharded parameters (and norms over them) are DTensors."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def gather_whole(tensors: dict[str, torch.Tensor], keep: bool) -> dict[str, torch.Tensor] | None:
    """Each tensor whole, on the CPU, on the ranks where `keep` (else None). Sharded tensors are
    all-gathered one at a time (so no rank holds more than one whole tensor it does not keep), and
    every rank must call this, in step."""
    gathered = {}
    for name, tensor in tensors.items():
        tensor = whole(tensor)
        if keep:
            gathered[name] = tensor.detach().cpu().contiguous()
    return gathered if keep else None


def full_state_dict(module: nn.Module, keep: bool, overrides: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor] | None:
    """The module's whole state dict (see gather_whole); `overrides` replace entries (the EMA's
    parameters)."""
    return gather_whole({**module.state_dict(), **(overrides or {})}, keep)


class ExponentialAverage:
    """EMA of the trainable parameters, exported instead of them when ema_decay > 0. Each copy
    lives in its parameter's own layout (a rank's shard under FSDP), so updates need no
    communication; buffers and frozen weights are taken from the model when the EMA is read."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.names = [name for name, param in model.named_parameters() if param.requires_grad]
        self.shadows = [param.detach().clone() for param in model.parameters() if param.requires_grad]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        current = [param.detach() for param in model.parameters() if param.requires_grad]
        torch._foreach_lerp_(self.shadows, current, 1.0 - self.decay)

    def by_name(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.shadows))

    @torch.no_grad()
    def load_full(self, weights: dict[str, torch.Tensor]) -> None:
        """Whole EMA weights from a checkpoint, cut to this rank's shards where sharded."""
        for name, shadow in self.by_name().items():
            value = weights[name].to(device=shadow.device, dtype=shadow.dtype)
            if isinstance(shadow, DTensor):
                value = distribute_tensor(value, shadow.device_mesh, shadow.placements)
            shadow.copy_(value)


def inference_copy(accelerator, recipe: Recipe, model: nn.Module, ema: ExponentialAverage | None) -> nn.Module | None:
    """On rank 0, a plain (unsharded, unwrapped) copy of the model with the weights to sample
    and export (the EMA's, when kept); None on the other ranks, which only help gather."""
    weights = full_state_dict(accelerator.unwrap_model(model), accelerator.is_main_process, ema.by_name() if ema else None)
    if weights is None:
        return None
    with torch.random.fork_rng(devices=[]):  # building initialises weights: leave training's RNG stream alone
        plain = recipe.build()
    plain.load_state_dict(weights)
    return plain.to(accelerator.device).train(accelerator.unwrap_model(model).training)


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
    """The checkpoint folder with the highest step whose files are all present and readable,
    tried newest first: only the newest are opened, and only their headers."""
    def step_of(folder: Path) -> int:
        try:
            return json.loads((folder / "state.json").read_text())["step"]
        except (OSError, ValueError, KeyError):
            return -1

    for folder in sorted(run_folder.glob("checkpoint_*"), key=step_of, reverse=True):
        if step_of(folder) < 0:
            break
        try:
            with safe_open(str(folder / "model.safetensors"), framework="pt"):  # checks the header against the file size
                pass
            torch.load(folder / "trainer.pt", map_location="cpu", weights_only=True, mmap=True)  # reads the zip's directory at the end
            (folder / "metrics.json").read_text()
        except Exception:  # a copy cut short by a crash: not a checkpoint
            continue
        return str(folder)
    return None


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
    state.__dict__.update(json.loads((folder / "state.json").read_text()))
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
        # Pickled by us: Ray Train's controller unpickles the config it is given, and the recipe's
        # class would make it import the model code (14 s of the controller's start, measured for
        # the UNet's) before it starts any worker; only the workers need it
        train_loop_config={"pickled": cloudpickle.dumps({
            "recipe": recipe,
            "setup": Setup(train=cfg, output_dir=str(output_dir.resolve()), tracking_uri=uri, mlflow_run_id=run_id),
            "threads_per_worker": threads_per_worker,
            "run_folder": str(storage / run_name),
        })},
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
    checkpoint = result.checkpoint
    if checkpoint:
        record_files(client, run_id, "checkpoint", Path(checkpoint.path))
    record_files(client, run_id, "weights", output_dir.resolve(), "*.safetensors")
    client.set_terminated(run_id, status="FINISHED")
    return {"mlflow_run_id": run_id, "checkpoint": checkpoint.path if checkpoint else None, "metrics": result.metrics or {}}


def record_files(client: MlflowClient, run_id: str, name: str, folder: Path, pattern: str = "*") -> None:
    """Tags `{name}.path` and `{name}.sha256.{file}` for the files in `folder` matching `pattern`:
    MLflow records where the large files are and what they hold; the files stay on disk and in DVC."""
    files = sorted(path for path in folder.glob(pattern) if path.is_file())
    tags = {f"{name}.path": str(folder), **{f"{name}.sha256.{path.name}": file_sha256(path) for path in files}}
    client.log_batch(run_id, tags=[RunTag(key, value) for key, value in tags.items()])

