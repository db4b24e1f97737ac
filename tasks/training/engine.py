"""The training loop: one short loop for every model (UNet, TCM-VAE decoder, ControlNet).

Ray Train's `TorchTrainer` runs `train_loop` on each worker (launch.py starts it); inside, an
`accelerate.Accelerator` does device placement, data parallelism over Ray's gloo/NCCL process
group (`strategy`: DDP, or FSDP2 sharding weights, gradients and optimizer state) and bf16
autocast on GPU (fp32 on CPU). Each worker reads its own shard of every dataset the recipe's
streams name (`get_dataset_shard`): the UNet's clips and images, the other models' clips. What is specific to a model lives in a `Recipe` (unet.py, decoder.py,
controlnet.py): how to build it, its loss for a batch, what to do after each optimizer step, how
to export it and how to draw samples.

Beside this file: weights.py gathers whole weights under FSDP and keeps the EMA; checkpoints.py
writes and restores checkpoints and RNG state every `checkpoint_every` steps, so a killed worker
group (Ray Train's `FailureConfig`) or a rerun with the same run name resumes exactly; tracking.py
logs rank 0's per-step metrics to MLflow, flushed right after each checkpoint is reported, so a
resumed run never logs a step twice.
"""

from __future__ import annotations

import contextlib
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import ray
import ray.train
import torch
from ray import cloudpickle
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

from tasks.storage.atomic import atomic_folder
from tasks.training.checkpoints import (
    TrainState, latest_complete_checkpoint, load_checkpoint, local_folder, newest_checkpoint, report_checkpoint, restore_rng,
)
from tasks.training.tracking import PROGRESS_TAG, MetricBuffer, Progress, group_metrics, record_worker_node
from tasks.training.weights import ExponentialAverage, inference_copy, whole


class Recipe(Protocol):
    """What the engine needs to know about one model. Must pickle (it travels to the workers)."""

    # True when a synced backward leaves parameters out of the graph; DDP must then look for
    # unused parameters each step
    skips_parameters: bool

    # class names of the blocks FSDP shards as one unit each (their weights are gathered for their
    # own forward and backward only); what lies outside them forms the root unit
    fsdp_blocks: tuple[str, ...]

    def build(self) -> nn.Module: ...

    # The datasets each micro-step reads, in order: name -> (rows per worker, weight of its loss
    # in the step's). The last one's backward syncs the gradients; the others' run under no_sync
    # (their gradients wait on the workers and are averaged with it), so a stream may leave
    # parameters out of its graph (the UNet's images skip the temporal layers) without costing an
    # all-reduce of its own. One stream, "train", for every model but the jointly trained UNet.
    def streams(self) -> dict[str, tuple[int, float]]: ...

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


def train_loop(train_loop_config: dict[str, bytes]) -> None:
    """Runs on every Ray Train worker."""
    config = cloudpickle.loads(train_loop_config["pickled"])
    recipe: Recipe = config["recipe"]
    setup: Setup = config["setup"]
    cfg = setup.train
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    # where this worker runs, as the data stages record theirs (ray.nodes.<stage>): on a cluster the
    # run shows which nodes trained it; a restarted group overwrites it with the new placement
    record_worker_node(setup, rank, ray.get_runtime_context().get_node_id())
    if not cfg.use_gpu:
        torch.set_num_threads(config["threads_per_worker"])
    accelerator = make_accelerator(cfg, recipe)

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = recipe.build()
    # frozen parts (an encoder, LPIPS) are in no group
    optimizer = make_optimizer(recipe.parameter_groups(model).values(), cfg.lr, cfg.weight_decay)
    # linear warmup, then constant (the paper's schedule); stepped by us once per optimizer step
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(1, cfg.warmup_steps)))
    state = TrainState()
    # Ray's latest checkpoint, or a newer complete one in the run folder: a checkpoint persisted just before a
    # crash (of the driver, or of this worker group) may never have reached Ray's records; checked
    # on every (re)start of the group (its metrics are recovered below, whether flushed or not)
    checkpoint = newest_checkpoint(ray.train.get_checkpoint(), latest_complete_checkpoint(config["run_folder"]))
    if checkpoint:
        with local_folder(checkpoint) as folder:
            restored = load_checkpoint(folder, model, state)  # whole weights, before sharding
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

    streams = recipe.streams()
    batches = {name: iterate_batches(ray.train.get_dataset_shard(name), name, rows, cfg, state, rank, accelerator.device) for name, (rows, _) in streams.items()}
    logger = MetricBuffer(setup) if accelerator.is_main_process else None
    if logger:  # the resumed checkpoint's steps, if the crash came before their flush; and what MLflow already has
        logger.recover(restored["metrics"] if checkpoint else [])
    progress = Progress(run_label(config["run_folder"]), cfg.steps) if logger else None
    while state.step < cfg.steps:
        started = time.perf_counter()
        waited, losses, parts, finite = 0.0, [], {}, True
        optimizer.zero_grad(set_to_none=True)
        for micro in range(cfg.grad_accum):
            for position, (name, (_, weight)) in enumerate(streams.items()):
                wait_start = time.perf_counter()
                batch = next(batches[name])
                waited += time.perf_counter() - wait_start
                # one generator per (seed, rank, step, micro, stream): noise and timesteps are reproducible after a resume
                generator = torch.Generator(accelerator.device).manual_seed(hash_seed(cfg.seed, rank, state.step, micro, *([] if name == "train" else [name])))
                last = micro == cfg.grad_accum - 1 and position == len(streams) - 1
                # forward and backward inside it: FSDP2 reads the flag at backward, DDP at forward
                with contextlib.nullcontext() if last else hold_gradient_sync(accelerator, model):
                    with accelerator.autocast():
                        loss = recipe.loss(model, batch, state.step, generator)
                    if isinstance(loss, dict):  # rank 0 logs its own parts (averaged over micro-steps)
                        for part, value in loss.items():
                            if part != "loss":
                                parts[f"loss/{part}"] = parts.get(f"loss/{part}", 0.0) + float(value) / cfg.grad_accum
                        loss = loss["loss"]
                    if len(streams) > 1:  # each stream's own loss, and the rows it gave the step (all workers)
                        parts[f"loss/{name}"] = parts.get(f"loss/{name}", 0.0) + float(loss.detach()) / cfg.grad_accum
                        parts[f"rows/{name}"] = parts.get(f"rows/{name}", 0) + len(next(iter(batch.values()))) * world
                    loss = loss * (weight / cfg.grad_accum)
                    # A non-finite loss anywhere skips the whole step on every rank (the check is
                    # collective). Its backward still runs: a synced forward must be followed by
                    # its backward, or DDP's next step finds the last reduction unfinished; the
                    # step's gradients are dropped unused.
                    finite = all_finite(accelerator, loss) and finite
                    accelerator.backward(loss)
                losses.append(loss.detach() * cfg.grad_accum)
        if not finite:
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

        # the weighted loss the step minimised (each stream's own under loss/{name} when several)
        loss_mean = accelerator.reduce(torch.stack(losses).sum() / cfg.grad_accum, reduction="mean").item()
        seconds = time.perf_counter() - started
        samples_per_s = cfg.global_batch / seconds  # every stream's rows, all workers
        if logger:
            logger.add(state.step, {
                "loss": loss_mean, "lr": scheduler.get_last_lr()[0], **group_metrics("grad_norm", grad_norms),
                "samples_per_s": samples_per_s, "data_wait_share": waited / seconds, "skipped_steps": state.skipped_steps, **parts,
            })
        if progress and progress.due(state.step):
            logger.flush()  # the MLflow curves advance with the progress line, not a checkpoint interval behind
            logger.client.set_tag(logger.run_id, PROGRESS_TAG, progress.line(state.step, loss_mean, samples_per_s))
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
        export_atomically(recipe, plain, Path(setup.output_dir))


def make_optimizer(groups, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """One AdamW over the parameter groups (iterables of parameters). Fused: one kernel updates
    every tensor, where the default loops over them; the smoke UNet has 950 parameter tensors,
    and its optimizer step took 86 ms looped against 10 ms fused (1 CPU thread)."""
    return torch.optim.AdamW([{"params": list(params)} for params in groups], lr=lr, weight_decay=weight_decay, fused=True)


def run_label(run_folder: str) -> str:
    """train_decoder-image_decoder_finetuned-smoke-0123abcd -> train_decoder-image_decoder_finetuned."""
    return "-".join(Path(run_folder).name.split("-")[:-2]) or Path(run_folder).name


def export_atomically(recipe: Recipe, plain: nn.Module, output_dir: Path) -> None:
    """The recipe's export, written beside the previous one and swapped in whole: a reader (or a
    crash mid-export) sees the previous complete model or the new one, never half of each."""
    with atomic_folder(output_dir) as staging:
        recipe.export(plain, staging)


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


def iterate_batches(shard, stream: str, rows: int, cfg, state: TrainState, rank: int, device: torch.device):
    """Endless batches of `rows` from this worker's shard of one stream, epoch after epoch, each
    epoch reshuffled with its own seed; after a resume the batches of the interrupted epoch
    already consumed are skipped (state.positions[stream] = [epoch, batches in the epoch])."""
    position = state.positions.setdefault(stream, [0, 0])
    while True:
        seen = 0
        epoch, done = position
        iterator = shard.iter_torch_batches(
            batch_size=rows, drop_last=True, device=device, local_shuffle_buffer_size=cfg.shuffle_buffer,
            local_shuffle_seed=hash_seed(cfg.seed, rank, epoch, *([] if stream == "train" else [stream])),
        )
        for index, batch in enumerate(iterator):
            seen += 1
            if index < done:
                continue
            position[1] = index + 1
            yield batch
        if seen == 0:
            raise ValueError(f"a worker's shard of the {stream!r} data has fewer than {rows} rows (its batch size): lower the batch size or num_workers, or cache more")
        position[:] = [epoch + 1, 0]


def hold_gradient_sync(accelerator, model):
    """Gradients stay on the worker until a later backward: DDP's own no_sync where the model is
    wrapped in DDP (Accelerate's is a no-op with one process, yet Ray Train's group of one still
    wraps it, and an image batch leaves parameters unused), Accelerate's for FSDP2."""
    return model.no_sync() if hasattr(model, "no_sync") else accelerator.no_sync(model)


def hash_seed(*parts: int) -> int:
    return random.Random("/".join(map(str, parts))).getrandbits(62)


def all_finite(accelerator, loss: torch.Tensor) -> bool:
    finite = torch.isfinite(loss.detach()).float().reshape(1)
    return bool(accelerator.reduce(finite, reduction="sum").item() == accelerator.num_processes)


