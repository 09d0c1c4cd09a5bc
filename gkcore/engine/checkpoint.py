"""Training checkpoints: the file format, the atomic write, the digest check on reading, the fall-back
to the previous checkpoint, the model-fit check, and the RNG states a checkpoint carries for an exact
resume. :class:`gkcore.engine.trainer.Trainer` decides what goes in a checkpoint and when it is written.

Checkpoint files are ``torch.save`` dicts followed by a trailer holding the SHA-256 digest and length
of what precedes it; they are written to ``<name>.tmp-<pid>`` in the same folder, flushed and fsync-ed,
then ``os.replace``-d onto ``<name>``, after the checkpoint it replaces became ``<stem>.prev<ext>``: a crash
never leaves a torn checkpoint, and :func:`load_checkpoint` refuses a file whose bytes changed since
(:class:`CheckpointError`, naming the file). :func:`load_with_fallback` (used by :meth:`Trainer.load`) then
falls back to the previous checkpoint, saying so. Temporaries left by a process that died mid-write are
removed by :func:`gkcore.engine.outdir.clean_stale_temporaries`.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import random
import sys
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

__all__ = ["CheckpointError", "save_checkpoint_atomic", "load_checkpoint", "previous_checkpoint",
           "load_with_fallback", "check_fits", "CHECKPOINT_NAME"]

CHECKPOINT_NAME = "checkpoint.pt"
_FORMATS = ("gkcore-train-v1", "gkcore-train-v2")  # v2: written with a digest trailer
_TRAILER_MAGIC = b"\nGKCORE-SHA256:"
_TRAILER_LEN = len(_TRAILER_MAGIC) + 64 + 1 + 20 + 1  # magic, hex digest, ":", 20-digit length, "\n"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, damaged (digest mismatch, truncated), not a gkcore
    training checkpoint, or written for another model. The message names the file."""


def previous_checkpoint(path: str) -> str:
    """Where the checkpoint that ``path`` replaced is kept: ``checkpoint.pt`` -> ``checkpoint.prev.pt``."""
    root, ext = os.path.splitext(os.fspath(path))
    return f"{root}.prev{ext or '.pt'}"


class _HashingWriter:
    """A write-only file wrapper that hashes and counts what goes through it (for ``torch.save``)."""

    def __init__(self, f):
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def write(self, b):
        self.h.update(b)
        self.n += len(b)
        return self.f.write(b)

    def flush(self):
        self.f.flush()


def save_checkpoint_atomic(obj: Any, path: str, keep_previous: bool = True) -> str:
    """``torch.save(obj)`` plus a digest trailer to a temporary file next to ``path``, fsync, keep the
    checkpoint it replaces as :func:`previous_checkpoint` (``keep_previous``), then rename onto ``path``.
    A failed write (disk full, read-only) raises ``OSError`` naming ``path`` and leaves the files that
    were there unchanged."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        os.makedirs(folder, exist_ok=True)
        with open(tmp, "wb") as f:
            w = _HashingWriter(f)
            torch.save(obj, w)
            f.write(_TRAILER_MAGIC + w.h.hexdigest().encode() + b":" + b"%020d" % w.n + b"\n")
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and os.path.isfile(path):
            prev = previous_checkpoint(path)
            try:  # a second name for the current file, so that ``path`` exists at every moment
                link = f"{prev}.tmp-{os.getpid()}"
                with contextlib.suppress(FileNotFoundError):
                    os.remove(link)
                os.link(path, link)
                os.replace(link, prev)
            except OSError:  # no hard links on this file system: rename (``load`` handles the gap)
                os.replace(path, prev)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError) and not isinstance(e, FileNotFoundError):
            raise OSError(e.errno, f"cannot write checkpoint {path}: {e.strerror or e}; the checkpoint files "
                                   "that were there are unchanged", path) from e
        raise
    with contextlib.suppress(OSError):  # make the rename durable too
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return path


def _verify(path: str) -> bool:
    """Check the digest trailer of ``path``: True when verified, False for a file without a trailer (an
    older gkcore's checkpoint); raise :class:`CheckpointError` when the digest or the length differs."""
    size = os.path.getsize(path)
    if size < _TRAILER_LEN:
        return False
    with open(path, "rb") as f:
        f.seek(size - _TRAILER_LEN)
        tr = f.read(_TRAILER_LEN)
        if not tr.startswith(_TRAILER_MAGIC):
            return False
        try:
            digest, n = tr[len(_TRAILER_MAGIC):].rstrip(b"\n").split(b":")
            n = int(n)
        except ValueError:
            raise CheckpointError(f"checkpoint {path} is damaged: its digest trailer is unreadable") from None
        if n != size - _TRAILER_LEN:
            raise CheckpointError(f"checkpoint {path} is damaged: {size - _TRAILER_LEN} bytes before the digest, "
                                  f"{n} were written")
        f.seek(0)
        h = hashlib.sha256()
        left = n
        while left:
            chunk = f.read(min(left, 1 << 22))
            if not chunk:
                raise CheckpointError(f"checkpoint {path} is damaged: truncated")
            h.update(chunk)
            left -= len(chunk)
    if h.hexdigest().encode() != digest:
        raise CheckpointError(f"checkpoint {path} is damaged: its SHA-256 digest differs from the one written "
                              "with it (the file changed after it was written)")
    return True


def load_checkpoint(path: str, map_location: Any = "cpu") -> Dict[str, Any]:
    """Read a trainer checkpoint written by :func:`save_checkpoint_atomic`, after checking its digest
    (trusted files only: it holds optimiser and RNG states, so it is unpickled with
    ``weights_only=False``). Raises :class:`CheckpointError` (a ``ValueError``) naming the file when it is
    missing, damaged or not a gkcore training checkpoint."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(16)
    if path.endswith(".safetensors") or head[8:10] == b"{\"":
        raise CheckpointError(f"{path} is a safetensors weights file, not a training checkpoint: resume from the "
                              f"run's {CHECKPOINT_NAME}")
    verified = _verify(path)
    try:
        ck = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 - torch raises several types for a foreign or torn file
        what = "damaged (truncated?)" if head.startswith(b"PK") else "not a gkcore training checkpoint"
        first = (str(e).splitlines() or [""])[0][:200]
        raise CheckpointError(f"checkpoint {path} is {what}: {type(e).__name__}: {first}") from None
    if not isinstance(ck, dict) or ck.get("format") not in _FORMATS:
        raise CheckpointError(f"{path} is not a gkcore training checkpoint")
    if not verified and ck.get("format") != "gkcore-train-v1":
        raise CheckpointError(f"checkpoint {path} is damaged: its digest trailer is missing")
    return ck


def load_with_fallback(path: str, note: Callable[[str], None]) -> tuple:
    """(checkpoint dict, path read): ``path``, or its previous checkpoint when ``path`` is damaged or
    missing (saying so through ``note``); :class:`CheckpointError` naming both when neither can be
    used."""
    prev = previous_checkpoint(path)
    try:
        return load_checkpoint(path, map_location="cpu"), path
    except CheckpointError as e:
        if not os.path.isfile(prev):
            raise
        first = str(e)
    try:
        ck = load_checkpoint(prev, map_location="cpu")
    except CheckpointError as e2:
        raise CheckpointError(f"{first}; the previous checkpoint cannot be used either: {e2}") from None
    note(f"{first}; resuming from the previous checkpoint {prev} (step {int(ck['step'])}) instead")
    return ck, prev


def check_fits(module: torch.nn.Module, model_meta: Optional[Dict[str, Any]], ck: Dict[str, Any],
               path: str) -> None:
    """Load ``ck``'s weights into ``module``; refuse a checkpoint written for another model config
    (``model_meta["config"]``), naming the fields that differ."""
    mine = (model_meta or {}).get("config")
    theirs = (ck.get("model_meta") or {}).get("config")
    if isinstance(mine, dict) and isinstance(theirs, dict):
        diff = _config_diff(theirs, mine)
        if diff:
            shown = "; ".join(f"{k} is {a!r} there, {b!r} here" for k, a, b in diff[:4])
            more = f" (and {len(diff) - 4} more)" if len(diff) > 4 else ""
            raise CheckpointError(f"checkpoint {path} was written for another model config: {shown}{more}")
    try:
        module.load_state_dict(ck["model"])
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        n = sum("size mismatch" in ln for ln in lines)
        detail = f"{n} tensor shapes differ, e.g. {lines[1][:200]}" if n and len(lines) > 1 else lines[0][:300]
        raise CheckpointError(f"checkpoint {path} does not fit this model: {detail}") from None


# ------------------------------------------------------------------------------------------ helpers
def _flat(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _config_diff(a: Dict[str, Any], b: Dict[str, Any]) -> List[tuple]:
    """[(field, a's value, b's value)] of the fields that differ between two nested config dicts."""
    fa, fb = _flat(a), _flat(b)
    missing = object()
    out = []
    for k in sorted(set(fa) | set(fb)):
        va, vb = fa.get(k, missing), fb.get(k, missing)
        if isinstance(va, tuple):
            va = list(va)
        if isinstance(vb, tuple):
            vb = list(vb)
        if va != vb:
            out.append((k, None if va is missing else va, None if vb is missing else vb))
    return out


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
