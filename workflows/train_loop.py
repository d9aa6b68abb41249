"""What runs on the Ray Train workers: the loop shared by the teacher and student stages.

`train_loop_per_worker` builds the stage's objective, restores the checkpoint Ray hands it,
and runs the epochs: mixed precision (`Precision`), the Ray Data batch stream (`BatchStream` with
its collate), DDP wrapping per phase, per-epoch validation PSNR, image strips, and reports with
checkpoints to Ray Train. The driver side (trainer construction, MLflow run) is `workflows.train`.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from lightbsr.checkpoint import save_checkpoint
from lightbsr.objectives import StudentObjective, TeacherObjective
from lightbsr.protocols import Protocol
from lightbsr.schedule import learning_rate, phase_of
from lightbsr.student import Student
from lightbsr.teacher import Teacher
from workflows.config import Config, ConfigError
from workflows.resume import CHECKPOINT_RECORD, fingerprint, read_stream_start
from workflows.tracking import redacted_config

__all__ = ["BatchStream", "Precision", "build_objective", "train_loop_per_worker"]

VALIDATION_IMAGES = 4  # held-out images scored every epoch (the sweep's objective)
VALIDATION_LR_SIDE = 48  # LR centre crop side: cheap enough to run every epoch


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


Objective = TeacherObjective | StudentObjective


def build_objective(cfg: Config, stage: str, teacher_source: dict[str, Any] | None) -> Objective:
    """The stage's model inside its objective; a new student starts from the teacher (G + encoder)."""
    m = cfg.model
    if stage == "teacher":
        teacher = Teacher(m.scale, m.setting, m.n_groups, m.n_blocks, m.queue_size, m.momentum)
        return TeacherObjective(teacher, cfg.loss)
    if teacher_source is None:
        raise ValueError("the student stage needs its teacher's weights")
    config = teacher_source["model_config"]
    teacher = Teacher(
        config["scale"],
        config["setting"],
        config["n_groups"],
        config["n_blocks"],
        config["queue_size"],
        config["momentum"],
    )
    teacher.load_state_dict(teacher_source["state"])
    student = Student(m.scale, m.n_groups, m.n_blocks)
    student.load_from_teacher(teacher)
    return StudentObjective(student, teacher if cfg.loss.distillation else None, cfg.loss)


def _use_sync_batchnorm(model: nn.Module) -> None:
    """SyncBatchNorm in the encoders (query and key); PyTorch supports it on GPUs only."""
    for name in ("encoder", "key_encoder"):
        if hasattr(model, name):
            setattr(model, name, nn.SyncBatchNorm.convert_sync_batchnorm(getattr(model, name)))


def _distributed(objective: nn.Module, phase: int, device: torch.device) -> nn.Module:
    """DDP around the objective; phase 1 leaves the reconstruction path unused."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        objective,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=phase == 1,
    )


@dataclass
class Precision:
    dtype: torch.dtype | None
    scaler: torch.amp.GradScaler

    @classmethod
    def of(cls, name: str, device: torch.device) -> Precision:
        dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
        return cls(dtype, torch.amp.GradScaler(device.type, enabled=name == "fp16" and device.type == "cuda"))

    def autocast(self, device: torch.device):
        return torch.autocast(device.type, dtype=self.dtype, enabled=self.dtype is not None)

    def backward_and_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """Backward and optimiser step, through the loss scaler only when fp16 needs one."""
        if not self.scaler.is_enabled():
            loss.backward()
            optimizer.step()
            return
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()


def _training_collate(float_pixels: bool):
    """Ray Data collate for the loop: the (lr, hr, prior) columns as tensors.

    It runs in the iterator's prefetch thread. On CPU it also turns the uint8 pixels into
    floats in [0, 1] there, off the training thread; on a GPU the pixels travel as uint8
    (a quarter of the bytes) and become floats on the device.
    """
    from ray.data.collate_fn import NumpyBatchCollateFn

    class TrainingCollate(NumpyBatchCollateFn):
        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:  # type: ignore[override]  # Ray: a free TypeVar
            if float_pixels:
                out = {key: torch.from_numpy(batch[key].astype(np.float32)).div_(255) for key in ("lr", "hr")}
            else:
                out = {key: torch.from_numpy(np.array(batch[key], copy=True)) for key in ("lr", "hr")}
            out["prior"] = torch.from_numpy(np.asarray(batch["prior"], dtype=np.float32).copy())
            return out

    return TrainingCollate()


class BatchStream:
    """Float (lr, hr, prior) batches on the device from a Ray Data iterator, timing the waits.

    A finite dataset (an in-memory stand-in) is iterated again when it runs out.
    """

    def __init__(self, shard, batch_size: int, device: torch.device) -> None:
        self.shard, self.batch_size, self.device = shard, batch_size, device
        self.iterator: Iterator | None = None
        self.wait_s = 0.0

    def _batches(self) -> Iterator:
        return iter(
            self.shard.iter_torch_batches(
                batch_size=self.batch_size,
                drop_last=True,
                prefetch_batches=2,
                device=self.device,
                collate_fn=_training_collate(float_pixels=self.device.type == "cpu"),
                pin_memory=self.device.type == "cuda",
            )
        )

    def next(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        start = time.perf_counter()
        if self.iterator is None:
            self.iterator = self._batches()
        try:
            batch = next(self.iterator)
        except StopIteration:
            self.iterator = self._batches()
            batch = next(self.iterator)
        lr, hr = (_as_float_pixels(batch[key]) for key in ("lr", "hr"))  # (B, V, 3, p, p), (B, V, 3, ps, ps)
        self.wait_s += time.perf_counter() - start
        return lr, hr, batch["prior"]  # prior (B, P)


def _as_float_pixels(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.float().div_(255) if pixels.dtype == torch.uint8 else pixels


def validation_protocol(cfg: Config) -> Protocol | None:
    """`tune.protocol`, which must degrade at the model's scale and setting (val_psnr is the sweep's objective).

    A mismatch is a ConfigError naming the protocols that would fit, rather than a silent run
    without val_psnr, and rather than a quietly swapped protocol (a sweep would then optimise
    something other than what its config says). None (no validation) only when lightbsr.protocols
    defines no protocol at all for the model's scale and setting.
    """
    from lightbsr.protocols import PROTOCOLS, get_protocol

    protocol = get_protocol(cfg.tune.protocol)
    model = (cfg.model.scale, cfg.model.setting)
    if (protocol.scale, protocol.setting) == model:
        return protocol
    matching = sorted(n for n, p in PROTOCOLS.items() if (p.scale, p.setting) == model)
    if not matching:
        return None
    raise ConfigError(
        f"tune.protocol: {protocol.name} degrades for x{protocol.scale} setting {protocol.setting} but the model "
        f"is x{cfg.model.scale} setting {cfg.model.setting}, so validation (val_psnr) cannot run; "
        f"set tune.protocol to one of {', '.join(matching)}"
    )


def validation_images(cfg: Config) -> list[tuple[str, bytes]]:
    """(name, encoded bytes) of the first VALIDATION_IMAGES images of `data.eval_images` (a folder or URL)."""
    from lightbsr.images import IMAGE_EXTENSIONS
    from workflows import storage
    from workflows.urls import join

    url, s3 = cfg.data.eval_images, cfg.storage.s3
    names = [n for n in storage.list_files(url, s3) if n.lower().endswith(IMAGE_EXTENSIONS)][:VALIDATION_IMAGES]
    return [(n, storage.read_bytes(join(url, n), s3)) for n in names]


def validation_set(cfg: Config, basis: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor] | None:
    """Fixed held-out pairs: centre crops of the first eval images, degraded by the sweep's protocol."""
    from lightbsr.images import read_rgb

    protocol = validation_protocol(cfg)
    if protocol is None:
        return None
    side = VALIDATION_LR_SIDE * cfg.model.scale
    lrs, hrs, priors = [], [], []
    for index, (name, data) in enumerate(validation_images(cfg)):
        image = torch.from_numpy(read_rgb(data, name=name)).permute(2, 0, 1).float() / 255  # (3, H, W)
        top, left = max(0, (image.shape[1] - side) // 2), max(0, (image.shape[2] - side) // 2)
        crop = image[:, top : top + side, left : left + side]
        if crop.shape[1:] != (side, side):
            continue
        case = protocol.cases[index % len(protocol.cases)]
        hr, lr = protocol.make_pair(crop, case, PurePosixPath(name).name)
        lrs.append(lr)
        hrs.append(hr)
        priors.append(protocol.prior(case, basis))
    if not lrs:
        print(f"[train] no validation: no image of data.eval_images is {side} px or more on each side", flush=True)
        return None
    return {
        "lr": torch.stack(lrs).to(device),
        "hr": torch.stack(hrs).to(device),
        "prior": torch.stack(priors).to(device),
    }


@torch.no_grad()
def validation_psnr(objective: Objective, val: dict[str, torch.Tensor], scale: int) -> float:
    from lightbsr.metrics import psnr

    objective.eval()
    sr = torch.cat(
        [objective.super_resolve(val["lr"][i : i + 1], val["prior"][i : i + 1]) for i in range(len(val["lr"]))]
    )
    objective.train()
    return float(psnr(sr.float().clamp(0, 1), val["hr"], scale).mean())


@torch.no_grad()
def image_strip(objective: Objective, lr: torch.Tensor, hr: torch.Tensor, prior: torch.Tensor) -> np.ndarray:
    """uint8 (sh, 3 sw, 3): LR (nearest-upscaled) | SR | HR of the first item's view 0."""
    objective.eval()
    sr = objective.super_resolve(lr[:1, 0], prior[:1]).float().clamp(0, 1)[0]  # (3, sh, sw)
    objective.train()
    scale = hr.shape[-1] // lr.shape[-1]
    lr_big = lr[0, 0].repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    strip = torch.cat([lr_big, sr, hr[0, 0]], dim=2)  # (3, sh, 3 sw)
    return (strip * 255).round().byte().permute(1, 2, 0).cpu().numpy()


def _broadcast_buffers(model: nn.Module) -> None:
    """Rank 0's BatchNorm statistics to all ranks (plain BatchNorm on CPU keeps per-rank ones)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def replica_divergence(model: nn.Module) -> float:
    """Largest difference between ranks of per-tensor sums of |x| and x (0.0 = replicas equal)."""
    tensors = [t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()]
    stats = torch.stack([torch.stack([t.double().sum(), t.double().abs().sum()]) for t in tensors]).flatten()
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return 0.0
    gathered = [torch.empty_like(stats) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, stats)
    return float(max((g - gathered[0]).abs().max() for g in gathered))


def _restore(checkpoint, model: nn.Module, optimizer, precision: Precision) -> tuple[int, int]:
    """Load a Ray checkpoint into the model, optimiser and RNGs; (completed epochs, iteration)."""
    with checkpoint.as_directory() as folder:
        raw = torch.load(os.path.join(folder, "model.pt"), map_location="cpu", weights_only=True)
    model.load_state_dict(raw["model"])
    state = raw["train_state"]
    optimizer.load_state_dict(state["optimizer"])
    precision.scaler.load_state_dict(state["scaler"])
    _set_rng_state(state["rng"])
    return int(raw["epoch"]), int(raw["iteration"])


class LoopContext:
    """What one worker holds during a stage."""

    def __init__(self, loop: dict[str, Any]) -> None:
        import ray.train
        from ray.train.torch import get_device

        from workflows.config import config_from_dict
        from workflows.tracking import SENDER_ENV, RunLogger

        self.cfg: Config = config_from_dict(loop["config"])
        self.stage: str = loop["stage"]
        self.basis: torch.Tensor = loop["basis"]
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.device = get_device()
        if self.cfg.train.batch_size % self.world:
            raise ConfigError(
                f"train.batch_size ({self.cfg.train.batch_size}) does not divide over the {self.world} workers "
                f"Ray Train started (train.num_workers {self.cfg.train.num_workers})"
            )
        self.local_batch = self.cfg.train.batch_size // self.world  # the global batch is the config's
        self.run_name: str = f"{self.cfg.train.run_name}-{self.stage}"
        run_id = loop["run_id"] if self.rank == 0 else None
        for key, value in SENDER_ENV.items():
            os.environ.setdefault(key, value)
        self.log = RunLogger(loop["tracking_uri"] or "", run_id)

    def print(self, message: str) -> None:
        if self.rank == 0:
            print(f"[train {self.stage}] {message}", flush=True)


def _save_and_report(
    ctx: LoopContext,
    model: nn.Module,
    optimizer,
    precision: Precision,
    epoch: int,
    iteration: int,
    metrics: dict[str, float],
    save: bool,
) -> None:
    """Every rank reports; rank 0 attaches the checkpoint folder on checkpoint epochs."""
    import ray.train

    if not save:
        ray.train.report(metrics)
        return
    _broadcast_buffers(model)
    metrics["replica_divergence"] = replica_divergence(model)
    ctx.log.flush()  # what the checkpoint covers is in MLflow before it (unless tracking is down)
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if ctx.rank == 0:
            train_state = {
                "optimizer": optimizer.state_dict(),
                "scaler": precision.scaler.state_dict(),
                "rng": _rng_state(),
            }
            save_checkpoint(
                folder,
                model,
                role=ctx.stage,
                model_config=ctx.cfg.model.model_dump(),
                pca_basis=ctx.basis,
                epoch=epoch,
                iteration=iteration,
                train_state=train_state,
                config=redacted_config(ctx.cfg),
            )
            record = {"epoch": epoch, "iteration": iteration, "fingerprint": fingerprint(ctx.cfg)}
            Path(folder, CHECKPOINT_RECORD).write_text(json.dumps(record, indent=1))
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=checkpoint)


def _check_stream_start(ctx: LoopContext, completed: int) -> None:
    """The data stream must start right after the epoch restored from the checkpoint."""
    start = read_stream_start(ctx.cfg, ctx.run_name)
    if start != completed:
        raise RuntimeError(
            f"{ctx.run_name}: the data stream starts after epoch {start} but the checkpoint restored epoch "
            f"{completed}; Ray Train restarts the workers and the stream from the latest checkpoint"
        )


def train_loop_per_worker(loop: dict[str, Any]) -> None:
    """The Ray Train worker function shared by both stages; rank 0's MLflow sender is closed on every exit."""
    ctx = LoopContext(loop)
    try:
        _train(ctx, loop)
    finally:
        ctx.log.close()


def _train(ctx: LoopContext, loop: dict[str, Any]) -> None:
    import ray.train

    from workflows.runtime import quiet_logs

    quiet_logs()
    cfg, schedule = ctx.cfg, ctx.cfg.schedule
    _seed_everything(cfg.train.seed)
    objective = build_objective(cfg, ctx.stage, loop["teacher"])
    model = objective.model
    if ctx.world > 1 and ctx.device.type == "cuda":
        _use_sync_batchnorm(model)
    objective.to(ctx.device).train()
    trainable = [p for p in objective.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=schedule.lr, betas=(schedule.beta1, schedule.beta2))
    precision = Precision.of(cfg.train.precision, ctx.device)

    completed, iteration = 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        completed, iteration = _restore(checkpoint, model, optimizer, precision)
        ctx.print(f"restored after epoch {completed}, iteration {iteration}")
        ctx.log.metrics({"resumed_at_iteration": iteration}, step=iteration, replayed_ok=True)
    if loop["check_stream_start"]:
        _check_stream_start(ctx, completed)
    stream = BatchStream(ray.train.get_dataset_shard("train"), ctx.local_batch, ctx.device)
    val = validation_set(cfg, ctx.basis, ctx.device) if ctx.rank == 0 else None
    wrapped: nn.Module = objective
    wrapped_phase = None

    for epoch in range(completed + 1, schedule.epochs + 1):
        phase, lr = phase_of(epoch, schedule), learning_rate(epoch, schedule)
        if ctx.world > 1 and phase != wrapped_phase:
            wrapped = objective  # drop the old DDP (and its hooks) before wrapping again
            wrapped, wrapped_phase = _distributed(objective, phase, ctx.device), phase
        for group in optimizer.param_groups:
            group["lr"] = lr
        sums: dict[str, torch.Tensor] = {}
        started, stream.wait_s = time.perf_counter(), 0.0
        window_start, window_wait, window_steps = started, 0.0, 0
        for _ in range(schedule.iters_per_epoch):
            lr_images, hr_images, prior = stream.next()
            with precision.autocast(ctx.device):
                terms = wrapped(lr_images, hr_images, prior, phase)
            optimizer.zero_grad(set_to_none=True)
            precision.backward_and_step(terms["total"], optimizer)
            iteration += 1
            window_steps += 1
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + value.detach().float()
            if ctx.log.active and iteration % cfg.train.log_every_steps == 0:
                now = time.perf_counter()
                ctx.log.metrics(
                    {
                        **{k: float(v.detach()) for k, v in terms.items()},
                        "lr": lr,
                        "samples_per_s": window_steps * cfg.train.batch_size / (now - window_start),
                        "data_wait_s": (stream.wait_s - window_wait) / window_steps,
                    },
                    step=iteration,
                )
                window_start, window_wait, window_steps = now, stream.wait_s, 0
            if ctx.log.active and iteration % cfg.train.image_every_steps == 0:
                ctx.log.image(
                    image_strip(objective, lr_images, hr_images, prior),
                    f"strips/{ctx.stage}_{iteration:08d}.png",
                    step=iteration,
                )
        elapsed = time.perf_counter() - started
        metrics = {f"loss_{k}": float(v) / schedule.iters_per_epoch for k, v in sums.items()}
        metrics.update(
            epoch=epoch,
            iteration=iteration,
            phase=phase,
            lr=lr,
            epoch_time_s=elapsed,
            samples_per_s=schedule.iters_per_epoch * cfg.train.batch_size / elapsed,
            data_wait_s=stream.wait_s,
            workers=ctx.world,
        )
        if val is not None:
            metrics["val_psnr"] = validation_psnr(objective, val, cfg.model.scale)
        ctx.log.metrics({f"epoch/{k}": v for k, v in metrics.items() if k not in ("epoch", "iteration")}, iteration)
        save = epoch % cfg.train.checkpoint_every_epochs == 0 or epoch == schedule.epochs
        _save_and_report(ctx, model, optimizer, precision, epoch, iteration, metrics, save)
        ctx.print(
            f"epoch {epoch}/{schedule.epochs} it {iteration} phase {phase} lr {lr:.2e} "
            f"loss {metrics['loss_total']:.4f} val_psnr {metrics.get('val_psnr', float('nan')):.2f} "
            f"{metrics['samples_per_s']:.1f} samples/s"
        )
