"""The pre-training loop: AdamW + cosine schedule with warm-up, bf16 autocast on GPUs, gradient
accumulation and clipping, JSONL logging with a progress bar, atomic checkpoints, exact resume,
graceful SIGINT/SIGTERM, NaN/inf detection, and DDP under ``torchrun``.

Contract with the model (any ``nn.Module`` that follows it can be trained):

* ``model(batch)`` (or ``model(batch, alpha=a)`` when ``forward`` takes ``alpha``) returns a dict with a
  scalar ``"loss"`` (the weighted total that is back-propagated) and optionally more scalar entries
  whose names start with ``"loss_"`` (logged). The loss must be a mean over the local batch so that DDP's
  gradient averaging reproduces the single-process gradient of the global batch.
* Momentum encoders and queues are the model's business: GK-MVLP updates them inside ``forward`` in
  training mode. A model whose ``momentum_in_forward`` attribute is ``False`` instead gets
  ``model.momentum_update()`` called by the trainer after each optimiser step. Queues must be buffers
  (they are saved with the ``state_dict``); ``torch.Generator`` attributes of any sub-module are saved
  and restored with the other RNG states, so they must exist once the model is on its device (the
  trainer restores a state into the generator that is there, of the same device type, and makes none).
* Caches are the model's business too: the trainer steps a plain ``torch.optim.AdamW`` (fused where
  this torch has it) and tells the model nothing else. GK-MVLP drops its knowledge-book cache through
  an optimizer step hook of its own.

Contract with the loader: an iterable of batch dicts with ``len()`` (batches per epoch). When it has
``set_epoch(epoch)`` the trainer calls it before each epoch; for an exact resume the order of an epoch
must depend only on the loader's seed and the epoch (not on the global RNG). On resume the trainer
restores the data position: ``loader.set_position(epoch, batch)`` when the loader has it (the next
``iter()`` starts at that batch slot of that epoch without reading the earlier ones; the slot is the
loader's ``position`` after the last batch used, which also counts batches it dropped as unreadable),
else ``set_epoch(epoch)`` and skipping the batches of the epoch already consumed.

Schedule, with ``s`` the number of completed optimiser steps, ``W`` warm-up steps and ``T`` total steps::

    lr(s) = lr * (s + 1) / W                                            for s < W
    lr(s) = lr * (m + (1 - m) * (1 + cos(pi * (s - W) / (T - W))) / 2)    otherwise (m = min_lr_ratio)

The ITC soft-target weight ``alpha`` is the model's own schedule (GK-MVLP: ALBEF's ramp,
``loss.alpha_warmup_steps``); ``TrainConfig.alpha`` set passes that constant as ``model(batch, alpha=a)``.

Checkpoint files are ``torch.save`` dicts written to ``<name>.tmp-<pid>`` in the same folder, flushed
and fsync-ed, then ``os.replace``-d onto ``<name>``: a crash never leaves a torn checkpoint.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import math
import os
import random
import resource
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional

import numpy as np
import torch

from . import launch as D

__all__ = ["TrainConfig", "Trainer", "TrainResult", "NonFiniteLossError", "save_checkpoint_atomic",
           "load_checkpoint", "cosine_with_warmup", "CHECKPOINT_NAME", "LOG_NAME"]

CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "train_log.jsonl"


class NonFiniteLossError(RuntimeError):
    """Raised when a loss is NaN or inf; the last good checkpoint on disk is left untouched."""


@dataclass
class TrainConfig:
    """Hyper-parameters of the loop (all serialisable; stored in every checkpoint)."""

    steps: int = 1000              #: optimiser steps in total
    lr: float = 1e-4
    weight_decay: float = 0.02
    betas: tuple = (0.9, 0.999)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.01
    grad_accum: int = 1            #: micro-batches per optimiser step
    clip_grad: float = 5.0         #: max global gradient norm; <= 0 disables clipping
    amp: str = "auto"              #: "auto" (bf16 on CUDA, off on CPU), "bf16", "off"
    alpha: Optional[float] = None  #: ITC soft-target weight passed as ``alpha=`` (None: the model's own schedule)
    log_every: int = 10
    ckpt_every: int = 0            #: also write a checkpoint every K steps (0: only at the end / on stop)
    seed: int = 0
    progress: bool = True          #: tqdm progress bar on rank 0

    def validate(self) -> "TrainConfig":
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.amp not in ("auto", "bf16", "off"):
            raise ValueError(f"amp must be 'auto', 'bf16' or 'off', got {self.amp!r}")
        if self.log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {self.log_every}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        return self


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` returns. ``history`` holds one record per optimiser step of this run
    (``step``, ``lr``, ``loss`` and each ``loss_*`` averaged over ranks and micro-batches)."""

    status: str                    #: "completed" or "interrupted"
    step: int
    checkpoint: Optional[str]
    history: List[Dict[str, float]] = field(default_factory=list)


class cosine_with_warmup:  # noqa: N801 - a callable object so LambdaLR can save it
    """Multiplier for ``LambdaLR``; see the module docstring for the formula."""

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float):
        self.warmup_steps, self.total_steps, self.min_ratio = int(warmup_steps), int(total_steps), float(min_ratio)

    def __call__(self, s: int) -> float:
        if s < self.warmup_steps:
            return (s + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        prog = min(1.0, (s - self.warmup_steps) / span)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * prog))


# ------------------------------------------------------------------------------------------ checkpoints
def save_checkpoint_atomic(obj: Any, path: str) -> str:
    """``torch.save(obj)`` to a temporary file next to ``path``, fsync, then rename onto ``path``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename durable too
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return path


def load_checkpoint(path: str, map_location: Any = "cpu") -> Dict[str, Any]:
    """Read a trainer checkpoint written by :func:`save_checkpoint_atomic` (trusted files only: it holds
    optimiser and RNG states, so it is unpickled with ``weights_only=False``)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ck = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(ck, dict) or ck.get("format") != "gkcore-train-v1":
        raise ValueError(f"{path} is not a gkcore training checkpoint")
    return ck


def _generators(model: torch.nn.Module) -> Dict[str, torch.Generator]:
    out = {}
    for mname, mod in model.named_modules():
        for k, v in vars(mod).items():
            if isinstance(v, torch.Generator):
                out[f"{mname}.{k}" if mname else k] = v
    return out


def _rng_state(model: torch.nn.Module) -> Dict[str, Any]:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
          "generators": {k: {"device": g.device.type, "state": g.get_state()} for k, g in _generators(model).items()}}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(model: torch.nn.Module, st: Dict[str, Any]) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"].cpu())
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in st["cuda"]])
    gens = _generators(model)
    for k, saved in st.get("generators", {}).items():
        g = gens.get(k)
        if g is None or g.device.type != saved["device"]:
            print(f"warning: the checkpoint's generator {k} ({saved['device']}) has no counterpart on the model's "
                  f"device: not restored", file=sys.stderr)
            continue
        g.set_state(saved["state"].cpu())


def _to_device(batch: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) and v.device != device else v)
            for k, v in batch.items()}


def _batch_size(batch: Dict[str, Any]) -> int:
    for k in ("image", "input_ids"):
        v = batch.get(k)
        if isinstance(v, torch.Tensor):
            return int(v.shape[0])
    for v in batch.values():
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return int(v.shape[0])
    return 0


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


# ------------------------------------------------------------------------------------------ trainer
class Trainer:
    """Train ``model`` on ``loader`` with ``config``; write logs and checkpoints under ``out`` (rank 0).

    Args:
        model: an ``nn.Module`` following the contract of the module docstring (unwrapped; the trainer
            moves it to the device and wraps it in DDP when ``torchrun`` started several processes).
        loader: iterable of batch dicts with ``len()``; already sharded for this rank.
        config: :class:`TrainConfig`.
        out: output folder (``checkpoint.pt``, ``train_log.jsonl``).
        dist_info: from :func:`gkcore.engine.launch.init_from_env` (default: single process on
            ``device``).
        device: used when ``dist_info`` is None.
        model_meta: JSON-able facts stored in checkpoints so ``gkcore eval`` can rebuild the model (e.g.
            ``{"preset": "gk_mvlp_tiny", "overrides": {...}}``).
        callbacks: ``fn(trainer, record)`` called on every rank after each optimiser step.
    """

    def __init__(self, model: torch.nn.Module, loader, config: TrainConfig, out: str, *,
                 dist_info: Optional[D.DistInfo] = None, device: str = "auto",
                 model_meta: Optional[Dict[str, Any]] = None,
                 callbacks: Optional[List[Callable[["Trainer", Dict[str, float]], None]]] = None):
        self.config = config.validate()
        self.info = dist_info or D.DistInfo(device=D.resolve_device(device))
        self.device = self.info.device
        self.out = os.fspath(out)
        self.loader = loader
        self.model_meta = dict(model_meta or {})
        self.callbacks = list(callbacks or [])
        self.module = model.to(self.device)
        try:
            self.steps_per_epoch = len(loader)
        except TypeError:
            raise ValueError("loader must define len() (batches per epoch)") from None
        if self.steps_per_epoch < 1:
            raise ValueError("loader yields no batch (dataset smaller than one batch?)")
        self.model = D.wrap_model(self.module, self.info)
        self.optimizer = self._make_optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, cosine_with_warmup(config.warmup_steps, config.steps, config.min_lr_ratio))
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.data_slot: Optional[int] = None  # the loader's batch slot after the last batch (its ``position``)
        self._stop = False
        self.stop_signal: Optional[int] = None  #: the signal number that asked for the stop, if any
        self._iter: Optional[Iterator] = None
        self._takes_alpha = "alpha" in inspect.signature(self.module.forward).parameters
        self._amp = self.device.type == "cuda" and config.amp in ("auto", "bf16") or config.amp == "bf16"
        if self.info.is_main:
            os.makedirs(self.out, exist_ok=True)

    # ---------------------------------------------------------------- set-up helpers
    def _make_optimizer(self) -> torch.optim.Optimizer:
        """AdamW; the fused implementation where this torch has it for the device (about 3x faster
        than the for-each one on CPUs, bandwidth-bound for a 50 M-parameter model)."""
        c = self.config
        try:
            return torch.optim.AdamW(self._param_groups(), lr=c.lr, betas=tuple(c.betas), fused=True)
        except (RuntimeError, TypeError, ValueError):
            return torch.optim.AdamW(self._param_groups(), lr=c.lr, betas=tuple(c.betas))

    def _param_groups(self):
        """AdamW groups: weight decay on matrices only (not biases, norms, temperatures); each parameter's
        lr is the base lr times the model's ``lr_scales()`` entry for the longest matching name prefix
        (1 where none matches; a model without ``lr_scales`` trains everything at the base lr)."""
        scales = dict(self.module.lr_scales()) if hasattr(self.module, "lr_scales") else {}
        for prefix, sc in scales.items():
            if not (isinstance(sc, (int, float)) and math.isfinite(sc) and sc > 0):
                raise ValueError(f"lr scale for {prefix!r} must be a positive number, got {sc!r}")
        by_len = sorted(scales, key=len, reverse=True)
        groups: Dict[Any, Dict[str, Any]] = {}
        for name, p in self.module.named_parameters():
            if not p.requires_grad:
                continue
            low = name.lower()
            decay = not (p.ndim < 2 or "temp" in low or "logit_scale" in low or "norm" in low or "bias" in low)
            scale = next((float(scales[k]) for k in by_len if name == k or name.startswith(k + ".")), 1.0)
            g = groups.setdefault((scale, decay), {"params": [], "weight_decay": self.config.weight_decay if decay
                                                   else 0.0, "lr": self.config.lr * scale, "lr_scale": scale})
            g["params"].append(p)
        if not groups:
            raise ValueError("model has no trainable parameter")
        return [groups[k] for k in sorted(groups, key=lambda k: (-k[0], not k[1]))]

    @property
    def checkpoint_path(self) -> str:
        return os.path.join(self.out, CHECKPOINT_NAME)

    @property
    def log_path(self) -> str:
        return os.path.join(self.out, LOG_NAME)

    def request_stop(self) -> None:
        """Ask the loop to write a checkpoint and return after the current optimiser step."""
        self._stop = True

    # ---------------------------------------------------------------- data position
    def _start_epoch(self) -> None:
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(self.epoch)
        self._iter = iter(self.loader)

    def _next_batch(self) -> Dict[str, Any]:
        if self._iter is None:
            self._start_epoch()
        while True:
            if self.batch_in_epoch >= self.steps_per_epoch:
                self.epoch += 1
                self.batch_in_epoch = 0
                self._start_epoch()
            try:
                b = next(self._iter)
            except StopIteration:  # the loader yielded fewer batches than len(): next epoch
                self.batch_in_epoch = self.steps_per_epoch
                continue
            self.batch_in_epoch += 1
            pos = getattr(self.loader, "position", None)  # batch slot: counts batches the loader dropped
            self.data_slot = int(pos[1]) if pos is not None and int(pos[0]) == self.epoch else None
            return b

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to continue exactly (RNG states of every rank, gathered to all)."""
        rng = _rng_state(self.module)
        if self.info.distributed:
            allr: List[Any] = [None] * self.info.world_size
            torch.distributed.all_gather_object(allr, rng)
        else:
            allr = [rng]
        return {
            "format": "gkcore-train-v1",
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "data_slot": self.data_slot if self.batch_in_epoch else 0,
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": allr,
            "world_size": self.info.world_size,
            "config": dataclasses.asdict(self.config),
            "model_meta": self.model_meta,
            "time": time.time(),
        }

    def save(self) -> Optional[str]:
        """Write the checkpoint (collective: call on every rank; only rank 0 writes)."""
        st = self.state_dict()
        path = None
        if self.info.is_main:
            path = save_checkpoint_atomic(st, self.checkpoint_path)
        D.barrier()
        return path

    def load(self, path: str) -> None:
        """Restore model, optimiser, scheduler, step, data position and RNG states from ``path``."""
        ck = load_checkpoint(path, map_location="cpu")
        self.module.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        self.step, self.epoch = int(ck["step"]), int(ck["epoch"])
        consumed = int(ck["batch_in_epoch"])
        # position the data iterator: same epoch, skip the batches already consumed (a loader with
        # ``set_position(epoch, batch)`` jumps there without reading them)
        self.batch_in_epoch = 0
        if hasattr(self.loader, "set_position"):
            slot = ck.get("data_slot")
            self.data_slot = consumed if slot is None else int(slot)
            self.loader.set_position(self.epoch, self.data_slot)
            self._iter = iter(self.loader)
            self.batch_in_epoch = consumed
        else:
            self._start_epoch()
            for _ in range(consumed):
                next(self._iter)
                self.batch_in_epoch += 1
        rngs = ck["rng"]
        if len(rngs) != self.info.world_size:
            print(f"warning: checkpoint written with {len(rngs)} processes, resuming with "
                  f"{self.info.world_size}: RNG streams of rank 0 reused", file=sys.stderr)
        _set_rng_state(self.module, rngs[self.info.rank if self.info.rank < len(rngs) else 0])
        if self.info.is_main and os.path.isfile(self.log_path):  # drop log lines past the checkpoint
            with open(self.log_path) as f:
                keep = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= self.step]
            with open(self.log_path, "w") as f:
                f.writelines(keep)

    # ---------------------------------------------------------------- the loop
    def _forward(self, batch):
        a = self.config.alpha
        kw = {"alpha": a} if (self._takes_alpha and a is not None) else {}
        ctx = (torch.autocast(device_type=self.device.type, dtype=torch.bfloat16) if self._amp
               else contextlib.nullcontext())
        with ctx:
            out = self.model(batch, **kw)
        if not isinstance(out, dict) or "loss" not in out:
            raise TypeError("model(batch) must return a dict with a 'loss' entry")
        return out

    def _train_step(self) -> Dict[str, float]:
        c = self.config
        comps: Dict[str, torch.Tensor] = {}
        n_images = 0
        for micro in range(c.grad_accum):
            batch = _to_device(self._next_batch(), self.device)
            n_images += _batch_size(batch)
            last = micro == c.grad_accum - 1
            sync = contextlib.nullcontext() if (last or not self.info.distributed) else self.model.no_sync()
            with sync:
                out = self._forward(batch)
                loss = out["loss"]
                bad = not bool(torch.isfinite(loss.detach()).all())
                if D.any_flag(bad, self.device):
                    vals = {k: float(v.detach().float().mean()) for k, v in out.items()
                            if isinstance(v, torch.Tensor) and k.startswith("loss")}
                    raise NonFiniteLossError(
                        f"non-finite loss at step {self.step + 1} (micro-batch {micro + 1}/{c.grad_accum}, "
                        f"epoch {self.epoch}, batch {self.batch_in_epoch}): "
                        + ", ".join(f"{k}={v:.4g}" for k, v in vals.items())
                        + f". Training stopped; the last good checkpoint ({self.checkpoint_path}) is intact. "
                          "Lower --lr, raise --warmup or check the data.")
                (loss / c.grad_accum).backward()
            for k, v in out.items():
                if (k == "loss" or k.startswith("loss_")) and isinstance(v, torch.Tensor) and v.numel() == 1:
                    comps[k] = comps.get(k, 0.0) + v.detach().float() / c.grad_accum
        gnorm = None
        if c.clip_grad and c.clip_grad > 0:
            gnorm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), c.clip_grad)
            if not math.isfinite(float(gnorm)):  # finite loss but inf/NaN gradients: do not step
                self.optimizer.zero_grad(set_to_none=True)
                raise NonFiniteLossError(
                    f"non-finite gradient norm at step {self.step + 1} (loss "
                    f"{float(comps['loss']):.4g}). Training stopped; the last good checkpoint "
                    f"({self.checkpoint_path}) is intact. Lower --lr, raise --warmup or use --amp off.")
        g0 = self.optimizer.param_groups[0]
        lr = g0["lr"] / g0.get("lr_scale", 1.0)  # the base lr (groups run at base lr x their scale)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if getattr(self.module, "momentum_in_forward", True) is False and hasattr(self.module, "momentum_update"):
            self.module.momentum_update()
        self.step += 1
        keys = sorted(comps)
        vec = D.all_reduce_mean(torch.stack([comps[k] for k in keys]).to(self.device))
        rec = {"step": self.step, "epoch": self.epoch, "lr": lr}
        if c.alpha is not None:
            rec["alpha"] = c.alpha
        elif isinstance(out.get("alpha"), torch.Tensor) and out["alpha"].numel() == 1:
            rec["alpha"] = float(out["alpha"])  # the model's own ramp
        rec.update({k: float(v) for k, v in zip(keys, vec.tolist())})
        if gnorm is not None:
            rec["grad_norm"] = float(gnorm)
        rec["_images"] = n_images * self.info.world_size
        return rec

    def fit(self, resume: Optional[str] = None) -> TrainResult:
        """Run until ``config.steps`` optimiser steps are done or a stop is requested (signal or
        :meth:`request_stop`). Raises :class:`NonFiniteLossError` on a NaN/inf loss."""
        c = self.config
        if resume:
            self.load(resume)
        self.module.train()
        history: List[Dict[str, float]] = []
        handlers = self._install_signals()
        bar = None
        if self.info.is_main and c.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=c.steps, initial=self.step, desc="pretrain", dynamic_ncols=True, file=sys.stderr)
        status = "completed"
        t_last, img_last = time.perf_counter(), 0
        ips_ema = None
        logf = open(self.log_path, "a") if self.info.is_main else None
        try:
            while self.step < c.steps:
                t_step = time.perf_counter()
                rec = self._train_step()
                n_img = rec.pop("_images")
                img_last += n_img
                dt_step = time.perf_counter() - t_step
                if dt_step > 0:
                    ips = n_img / dt_step
                    ips_ema = ips if ips_ema is None else 0.9 * ips_ema + 0.1 * ips
                history.append(rec)
                if self.step % c.log_every == 0 or self.step == c.steps:
                    dt = time.perf_counter() - t_last
                    rec["images_per_s"] = img_last / dt if dt > 0 else float("nan")
                    rec["memory_mb"] = _memory_mb(self.device)
                    t_last, img_last = time.perf_counter(), 0
                    if logf:
                        logf.write(json.dumps(rec) + "\n")
                        logf.flush()
                if bar is not None:
                    bar.update(1)
                    post = {k[5:] if k.startswith("loss_") else k: f"{v:.3f}" for k, v in rec.items()
                            if k == "loss" or k.startswith("loss_")}
                    post["img/s"] = f"{ips_ema:.1f}" if ips_ema is not None else "-"
                    post["mem"] = f"{_memory_mb(self.device):.0f}MB"
                    post["lr"] = f"{rec['lr']:.1e}"
                    bar.set_postfix(post, refresh=False)
                for cb in self.callbacks:
                    cb(self, rec)
                stop = D.any_flag(self._stop, self.device)
                if stop and self.step < c.steps:
                    status = "interrupted"
                    break
                if c.ckpt_every and self.step % c.ckpt_every == 0 and self.step < c.steps:
                    self.save()
            path = self.save()
            if status == "interrupted" and self.info.is_main:
                print(f"\nstopped at step {self.step}; checkpoint written to {path}; continue with --resume {path}",
                      file=sys.stderr)
        finally:
            self._restore_signals(handlers)
            if bar is not None:
                bar.close()
            if logf:
                logf.close()
        return TrainResult(status, self.step, self.checkpoint_path if self.info.is_main else None, history)

    # ---------------------------------------------------------------- signals
    def _install_signals(self):
        if threading.current_thread() is not threading.main_thread():
            return {}
        old = {}

        def handler(signum, frame):
            if self._stop and signum == signal.SIGINT:  # second Ctrl-C: give up at once
                raise KeyboardInterrupt
            self._stop = True
            self.stop_signal = int(signum)
            if self.info.is_main:
                print(f"\nreceived {signal.Signals(signum).name}: finishing the step and writing a checkpoint "
                      "(Ctrl-C again to abort)", file=sys.stderr)

        for s in (signal.SIGINT, signal.SIGTERM):
            old[s] = signal.signal(s, handler)
        return old

    @staticmethod
    def _restore_signals(old):
        for s, h in old.items():
            signal.signal(s, h)


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)
