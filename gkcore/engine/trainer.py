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

Checkpoints (the file format, atomic writes, SHA-256 digests, the fall-back to the previous checkpoint,
the RNG states) are :mod:`gkcore.engine.checkpoint`; its public names are importable from here too. The
output folder is :mod:`gkcore.engine.outdir`: while it runs, :meth:`Trainer.fit` holds an exclusive lock on
it (a second run on it fails at once) and first removes ``*.tmp-<pid>`` files of processes that are gone.
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
from . import outdir
from .checkpoint import _TRAILER_LEN  # noqa: F401 - re-exported (tests cut a checkpoint's trailer)
from .checkpoint import (CHECKPOINT_NAME, CheckpointError, _rng_state, _set_rng_state, check_fits,
                         load_checkpoint, load_with_fallback, previous_checkpoint, save_checkpoint_atomic)

__all__ = ["TrainConfig", "Trainer", "TrainResult", "NonFiniteLossError", "CheckpointError", "DataError",
           "save_checkpoint_atomic", "load_checkpoint", "previous_checkpoint", "cosine_with_warmup",
           "CHECKPOINT_NAME", "LOG_NAME"]

LOG_NAME = "train_log.jsonl"


class NonFiniteLossError(RuntimeError):
    """Raised when a loss or a gradient is NaN or inf; checkpoints on disk are left untouched."""


class DataError(ValueError):
    """The data yields nothing to train on (every sample left out)."""


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

    def problems(self) -> List[tuple]:
        """``[(field, what it must be)]`` for every field with a bad value (empty when all are fine)."""
        def num(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        def integer(v):
            return isinstance(v, int) and not isinstance(v, bool)

        out = []
        rules = [
            ("steps", integer(self.steps) and self.steps >= 1, "an int >= 1"),
            ("lr", num(self.lr) and math.isfinite(self.lr) and self.lr > 0, "a finite number > 0"),
            ("weight_decay", num(self.weight_decay) and math.isfinite(self.weight_decay) and self.weight_decay >= 0,
             "a finite number >= 0"),
            ("betas", isinstance(self.betas, (tuple, list)) and len(self.betas) == 2
             and all(num(b) and 0.0 <= b < 1.0 for b in self.betas), "two numbers in [0, 1)"),
            ("warmup_steps", integer(self.warmup_steps) and self.warmup_steps >= 0, "an int >= 0"),
            ("min_lr_ratio", num(self.min_lr_ratio) and 0.0 <= self.min_lr_ratio <= 1.0, "a number in [0, 1]"),
            ("grad_accum", integer(self.grad_accum) and self.grad_accum >= 1, "an int >= 1"),
            # <= 0 turns clipping off (the non-finite gradient check stays on); NaN / inf would hide it
            ("clip_grad", num(self.clip_grad) and math.isfinite(self.clip_grad), "a finite number (<= 0: no clipping)"),
            ("amp", self.amp in ("auto", "bf16", "off"), "'auto', 'bf16' or 'off'"),
            ("alpha", self.alpha is None or (num(self.alpha) and 0.0 <= self.alpha <= 1.0), "None or a number in [0, 1]"),
            ("log_every", integer(self.log_every) and self.log_every >= 1, "an int >= 1"),
            ("ckpt_every", integer(self.ckpt_every) and self.ckpt_every >= 0, "an int >= 0 (0: only at the end)"),
            ("seed", integer(self.seed), "an int"),
        ]
        for name, ok, want in rules:
            if not ok:
                out.append((name, f"must be {want}, got {getattr(self, name)!r}"))
        return out

    def validate(self) -> "TrainConfig":
        """Raise ``ValueError`` naming the first field with a bad value (see :meth:`problems`)."""
        bad = self.problems()
        if bad:
            raise ValueError(f"{bad[0][0]} {bad[0][1]}")
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
        self.last_checkpoint: Optional[tuple] = None  #: (path, step) of the checkpoint last written or loaded
        self.notes: List[str] = []  #: what :meth:`load` / :meth:`fit` reported (fallbacks, cleaned files)
        self._batches_this_epoch = 0
        self._iter: Optional[Iterator] = None
        self._takes_alpha = "alpha" in inspect.signature(self.module.forward).parameters
        self._amp = self.device.type == "cuda" and config.amp in ("auto", "bf16") or config.amp == "bf16"
        if self.info.is_main:
            outdir.check_writable(self.out)  # a read-only or misnamed --out fails here, naming it

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
                self._batches_this_epoch = 0
                self._start_epoch()
            try:
                b = next(self._iter)
            except StopIteration:  # the loader yielded fewer batches than len(): next epoch
                if self._batches_this_epoch == 0 and self.batch_in_epoch == 0:
                    counts = self._data_counts()
                    why = ", ".join(f"{k}: {v}" for k, v in counts.get("rejected", {}).items())
                    raise DataError(f"the data yielded no batch in epoch {self.epoch}: every sample was left out"
                                    + (f" ({why})" if why else "")) from None
                self.batch_in_epoch = self.steps_per_epoch
                continue
            self.batch_in_epoch += 1
            self._batches_this_epoch += 1
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
            "data_counts": self.loader.state_counts() if hasattr(self.loader, "state_counts") else None,
            "time": time.time(),
        }

    def _data_counts(self) -> Dict[str, Dict[str, int]]:
        return self.loader.counts() if hasattr(self.loader, "counts") else {}

    def save(self) -> Optional[str]:
        """Write the checkpoint (collective: call on every rank; only rank 0 writes)."""
        st = self.state_dict()
        st["format"] = "gkcore-train-v2"
        path = None
        if self.info.is_main:
            # keep the file on disk as the previous checkpoint only when this run wrote or verified it
            # (not a damaged one it fell back from, nor one of an unrelated earlier run)
            known = self.last_checkpoint is not None and self.last_checkpoint[0] == self.checkpoint_path
            path = save_checkpoint_atomic(st, self.checkpoint_path, keep_previous=known)
            self.last_checkpoint = (path, self.step)
        D.barrier()
        return path

    def _note(self, msg: str) -> None:
        self.notes.append(msg)
        if self.info.is_main:
            print(f"note: {msg}", file=sys.stderr)

    def load(self, path: str) -> None:
        """Restore model, optimiser, scheduler, step, data position and RNG states from ``path`` (or from
        its previous checkpoint when ``path`` is damaged; see :func:`checkpoint.load_with_fallback`)."""
        ck, path = load_with_fallback(path, self._note)
        check_fits(self.module, self.model_meta, ck, path)
        try:
            self.optimizer.load_state_dict(ck["optimizer"])
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"checkpoint {path}: its optimiser state does not fit this model ({e})") from None
        self.scheduler.load_state_dict(ck["scheduler"])
        self.last_checkpoint = (path, int(ck["step"]))
        if ck.get("data_counts") and hasattr(self.loader, "restore_counts"):
            self.loader.restore_counts(ck["data_counts"])
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
                keep = [ln for ln in f if _log_step(ln) is not None and _log_step(ln) <= self.step]
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
                        + f". Training stopped; {self._checkpoint_state()}. "
                          "Lower --lr, raise --warmup or check the data.")
                (loss / c.grad_accum).backward()
            for k, v in out.items():
                if (k == "loss" or k.startswith("loss_")) and isinstance(v, torch.Tensor) and v.numel() == 1:
                    comps[k] = comps.get(k, 0.0) + v.detach().float() / c.grad_accum
        # the norm is computed even without clipping (clip_grad <= 0): a NaN/inf gradient always stops
        gnorm = torch.nn.utils.clip_grad_norm_(self.module.parameters(),
                                               c.clip_grad if c.clip_grad > 0 else float("inf"))
        if not math.isfinite(float(gnorm)):  # finite loss but inf/NaN gradients: do not step
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(
                f"non-finite gradient norm at step {self.step + 1} (loss "
                f"{float(comps['loss']):.4g}). Training stopped; {self._checkpoint_state()}. "
                "Lower --lr, raise --warmup or use --amp off.")
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
        rec["grad_norm"] = float(gnorm)
        rec["_images"] = n_images * self.info.world_size
        return rec

    def _checkpoint_state(self) -> str:
        if self.last_checkpoint is None:
            return f"no checkpoint has been written in {self.out} by this run"
        path, step = self.last_checkpoint
        return f"the last good checkpoint, {path} (step {step}), is unchanged"

    def fit(self, resume: Optional[str] = None) -> TrainResult:
        """Run until ``config.steps`` optimiser steps are done or a stop is requested (signal or
        :meth:`request_stop`). Holds the output folder's lock meanwhile (:class:`outdir.OutputLockedError`
        when another process holds it). Raises :class:`NonFiniteLossError` on a NaN/inf loss or gradient,
        :class:`CheckpointError` for a ``resume`` checkpoint that cannot be used or whose step is past
        ``config.steps``, :class:`DataError` when the data yields nothing."""
        with (outdir.lock_output(self.out) if self.info.is_main else contextlib.nullcontext()):
            if self.info.is_main:
                for f, pid in outdir.clean_stale_temporaries(self.out):
                    self._note(f"removed {f}, left by process {pid} (no longer running) in the middle of a write")
            return self._fit(resume)

    def _fit(self, resume: Optional[str]) -> TrainResult:
        c = self.config
        if resume:
            self.load(resume)
            if self.step > c.steps:
                raise CheckpointError(f"checkpoint {self.last_checkpoint[0]} is at step {self.step}, past the "
                                      f"{c.steps} steps asked for: nothing to do (ask for more steps to go on)")
            if self.step == c.steps:
                self._note(f"nothing to do: checkpoint {self.last_checkpoint[0]} is already at step {self.step} "
                           f"of {c.steps}")
                return TrainResult("completed", self.step, self.last_checkpoint[0], [])
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
        logged_counts = self._data_counts() if resume else {}

        def log_counts():  # the data accounting, whenever it changed (written to the log, rank 0)
            nonlocal logged_counts
            counts = self._data_counts()
            if logf and counts != logged_counts and any(counts.values()):
                logf.write(json.dumps({"step": self.step, "epoch": self.epoch, "data": counts}) + "\n")
                logf.flush()
            logged_counts = counts

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
                    log_counts()
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
            log_counts()
            path = self.save()
            if self.info.is_main:
                summary = format_data_counts(self._data_counts())
                if summary:
                    print(f"data: {summary}", file=sys.stderr)
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


def _log_step(line: str) -> Optional[int]:
    """The step of a log line, or None for a blank or torn one (a run killed mid-write)."""
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError, TypeError):
        return None


def format_data_counts(counts: Dict[str, Dict[str, int]]) -> str:
    """One line, e.g. ``3 samples left out (bad label value: 1, unreadable image: 2); repaired: swapped box
    in 1 sample``, or '' when nothing was left out or repaired."""
    parts = []
    rej = (counts or {}).get("rejected") or {}
    if rej:
        n = sum(rej.values())
        parts.append(f"{n} sample{'s' if n != 1 else ''} left out (" + ", ".join(f"{k}: {v}" for k, v in rej.items())
                     + ")")
    rep = (counts or {}).get("repaired") or {}
    if rep:
        parts.append("repaired: " + ", ".join(f"{k} in {v} sample{'s' if v != 1 else ''}" for k, v in rep.items()))
    return "; ".join(parts)


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)
