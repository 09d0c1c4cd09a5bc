"""``gkcore pretrain`` and ``gkcore demo``: their arguments, and the pretrain job (model, loader and
:class:`~gkcore.engine.trainer.Trainer` put together); the demo job is :func:`gkcore.engine.demo.run_demo`."""
from __future__ import annotations

import ast
import json
import os
import sys
from typing import Any, Dict

__all__ = ["register", "cmd_pretrain", "cmd_demo"]


def _parse_set(items) -> Dict[str, Any]:
    """``["embed_dim=64", "vision.depth=2"]`` -> overrides (values parsed as JSON or as a Python literal when
    they parse, else kept as strings; the config checks the types)."""
    out: Dict[str, Any] = {}
    for it in items or []:
        if "=" not in it:
            raise SystemExit(f"--set expects KEY=VALUE, got {it!r}")
        k, v = it.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            try:  # Python spellings: True, False, None, (1, 2)
                out[k.strip()] = ast.literal_eval(v)
            except (ValueError, SyntaxError):
                out[k.strip()] = v
    return out


def register(subparsers) -> None:
    # ------------------------------------------------------------------ pretrain
    p = subparsers.add_parser(
        "pretrain", help="pre-train GK-MVLP (single process or under torchrun)",
        description="Pre-train GK-MVLP with ITC + ITM + LM + LECLS. Run under `torchrun --nproc_per_node N` "
                    "for DDP (NCCL on GPUs, gloo on CPUs); only rank 0 writes. Ctrl-C / SIGTERM writes a "
                    "checkpoint and exits; --resume continues exactly.")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--preset", help="model preset (gk_mvlp_tiny, gk_mvlp_base, gk_mvlp_resnet50)")
    g.add_argument("--config", help="JSON file: {\"preset\": ..., \"overrides\": {...}, \"train\": {...}, "
                                    "\"batch_size\": ...}; command-line flags win")
    p.add_argument("--data", required=True, help="ADAPTER:PATH, e.g. synth:./synthcxr or mimic:/data/mimic-cxr-jpg")
    p.add_argument("--split", default=None, help="dataset split to use where the adapter has splits (mimic: train)")
    p.add_argument("--out", required=True, help="output folder (checkpoint.pt, train_log.jsonl, model.safetensors)")
    p.add_argument("--steps", type=int, help="optimiser steps (default 1000)")
    p.add_argument("--batch-size", type=int, help="batch size per process (default 32)")
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--warmup", type=int, help="warm-up steps")
    p.add_argument("--grad-accum", type=int)
    p.add_argument("--clip", type=float, help="gradient norm clip (<= 0: off)")
    p.add_argument("--amp", choices=("auto", "bf16", "off"))
    p.add_argument("--alpha", type=float, help="ITC soft-target weight (default: the model's own ramp)")
    p.add_argument("--log-every", type=int)
    p.add_argument("--ckpt-every", type=int)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="checkpoint to continue from (no value: OUT/checkpoint.pt)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="model config override (repeatable)")
    p.add_argument("--backend", default=None, help="op backend for the model (auto, reference, cpu, cuda, triton)")
    p.add_argument("--device", default="auto")
    p.add_argument("--num-threads", type=int, default=2, help="data loading threads")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_pretrain)

    # ------------------------------------------------------------------ demo
    from gkcore.engine.demo import DEFAULTS, GEN_IMAGES

    d = subparsers.add_parser(
        "demo", help="the main job: synthetic data, evaluate, pre-train gk_mvlp_tiny, evaluate again (CPU, ~10 min)",
        description="Generate a small SynthCXR set, evaluate gk_mvlp_tiny on every downstream task (zero-shot "
                    "AUROC, pointing game and mAP, retrieval, report generation, linear probe), pre-train it, "
                    "evaluate again, print a table next to chance and save plots; --ablation adds the model "
                    "without the GK module.")
    d.add_argument("--out", default="gkcore-demo", help="output folder (default ./gkcore-demo)")
    d.add_argument("--n", type=int, default=DEFAULTS["n"], help="number of synthetic images")
    d.add_argument("--size", type=int, default=DEFAULTS["size"], help="synthetic image size (px)")
    d.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    d.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    d.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    d.add_argument("--warmup", type=int, default=DEFAULTS["warmup"])
    d.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    d.add_argument("--device", default="cpu")
    d.add_argument("--backend", default=None)
    d.add_argument("--num-threads", type=int, default=2)
    d.add_argument("--regenerate", action="store_true", help="regenerate the data even if present")
    d.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="gk_mvlp_tiny config override (repeatable; replaces the demo's own overrides)")
    d.add_argument("--ablation", action="store_true",
                   help="also pre-train the same model without the GK module (ITC + ITM + LM) on the same data, "
                        "split, seed and budget, and add its column to the table")
    d.add_argument("--gen-images", type=int, default=GEN_IMAGES,
                   help=f"held-out images scored for report generation (default {GEN_IMAGES})")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=cmd_demo)


# ---------------------------------------------------------------------------------------------- commands
#: TrainConfig field -> the flag that sets it (for error messages)
_FLAG = {"steps": "--steps", "lr": "--lr", "weight_decay": "--weight-decay", "warmup_steps": "--warmup",
         "grad_accum": "--grad-accum", "clip_grad": "--clip", "amp": "--amp", "alpha": "--alpha",
         "log_every": "--log-every", "ckpt_every": "--ckpt-every", "seed": "--seed"}


def cmd_pretrain(args) -> int:

    from gkcore import create_model
    from gkcore.data import build_loader, open_dataset
    from gkcore.models.config import config_to_dict

    from gkcore.engine import launch as D
    from gkcore.engine.outdir import OutputLockedError
    from gkcore.engine.trainer import (CheckpointError, DataError, NonFiniteLossError, TrainConfig, Trainer,
                                       seed_everything)

    file_cfg: Dict[str, Any] = {}
    if args.config:
        try:
            with open(args.config) as f:
                file_cfg = json.load(f)
        except (OSError, ValueError) as e:  # ValueError: invalid JSON or text
            print(f"error: --config {args.config}: {e}", file=sys.stderr)
            return 2
        if not isinstance(file_cfg, dict) or "preset" not in file_cfg:
            print(f"error: {args.config} has no 'preset' entry", file=sys.stderr)
            return 2
    preset = args.preset or file_cfg["preset"]
    overrides = dict(file_cfg.get("overrides", {}))
    overrides.update(_parse_set(args.set))
    tcfg = dict(file_cfg.get("train", {}))
    for flag, key in (("steps", "steps"), ("lr", "lr"), ("weight_decay", "weight_decay"), ("warmup", "warmup_steps"),
                      ("grad_accum", "grad_accum"), ("clip", "clip_grad"), ("amp", "amp"), ("alpha", "alpha"),
                      ("log_every", "log_every"), ("ckpt_every", "ckpt_every"), ("seed", "seed")):
        v = getattr(args, flag)
        if v is not None:
            tcfg[key] = v
    tcfg["progress"] = not args.no_progress
    try:
        config = TrainConfig(**tcfg)
        bad = config.problems()
    except TypeError as e:  # an unknown key in the config file's "train"
        print(f"error: --config {args.config}: {e}", file=sys.stderr)
        return 2
    if bad:  # every value is checked before any work is done; the message names the flag
        name, why = bad[0]
        print(f"error: {_FLAG.get(name, name)} {why}", file=sys.stderr)
        return 2
    batch_size = args.batch_size if args.batch_size is not None else file_cfg.get("batch_size", 32)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        print(f"error: --batch-size must be an int >= 1, got {batch_size!r}", file=sys.stderr)
        return 2
    if args.num_threads < 0:
        print(f"error: --num-threads must be >= 0, got {args.num_threads}", file=sys.stderr)
        return 2
    if args.resume not in (None, "auto") and not os.path.isfile(args.resume):
        print(f"error: --resume {args.resume}: checkpoint not found", file=sys.stderr)
        return 2
    from gkcore.engine.outdir import check_writable
    try:
        check_writable(args.out)
    except OSError as e:
        print(f"error: --out: {e.strerror}", file=sys.stderr)
        return 2

    try:
        D.resolve_device(args.device)
    except ValueError as e:
        print(f"error: --{e}", file=sys.stderr)
        return 2
    info = D.init_from_env(args.device)
    if info.device.type == "cpu":  # freed blocks stay in the heap: fewer page faults a step
        from gkcore.engine.host_memory import keep_freed_memory

        keep_freed_memory()
    try:
        seed_everything(config.seed)
        try:
            model = create_model(preset, backend=args.backend, **overrides)
            dataset = open_dataset(args.data, **({"split": args.split} if args.split else {}))
        except (ValueError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        data_kw = dict(tokenizer=getattr(model, "tokenizer", None), max_length=model.config.max_length,
                       channels=model.config.channels, device=str(info.device), num_threads=args.num_threads,
                       seed=config.seed)
        loader = build_loader(dataset, batch_size, model.config.image_size, train=True, rank=info.rank,
                              world_size=info.world_size, **data_kw)
        if info.is_main:
            print(f"pretrain {preset}: {len(dataset)} samples, {len(loader)} batches/epoch per process, "
                  f"{info.world_size} process(es) on {info.device}", file=sys.stderr)
        tr = Trainer(model, loader, config, args.out, dist_info=info,
                     model_meta={"preset": preset, "overrides": overrides, "config": config_to_dict(model.config)})
        resume = args.resume
        if resume == "auto":
            resume = tr.checkpoint_path
            if not os.path.isfile(resume):
                print(f"error: --resume given but {resume} does not exist", file=sys.stderr)
                return 2
        try:
            res = tr.fit(resume=resume)
        except NonFiniteLossError as e:
            if info.is_main:
                print(f"error: {e}", file=sys.stderr)
            return 3
        except (CheckpointError, DataError, OutputLockedError, OSError) as e:  # the message names the file or folder
            if info.is_main:
                print(f"error: {e.strerror if isinstance(e, OSError) and e.strerror else e}", file=sys.stderr)
            return 2
        if info.is_main:
            if res.status == "completed":
                if getattr(model, "_state_window", 0):  # the decoder's decisions, scored as generation sees images
                    model.calibrate_states(build_loader(dataset, batch_size, model.config.image_size, train=False,
                                                        **data_kw))
                path = os.path.join(args.out, "model.safetensors")
                model.save(path)
                print(f"done: {res.step} steps; final loss {res.history[-1]['loss']:.4f}; weights in {path}"
                      if res.history else f"done: {res.step} steps; weights in {path}")
            else:
                print(f"interrupted at step {res.step}; resume with --resume {res.checkpoint}")
        if res.status == "completed":
            return 0
        return 128 + (tr.stop_signal or 2)  # 130 after SIGINT, 143 after SIGTERM (the shell convention)
    finally:
        D.cleanup()


def cmd_demo(args) -> int:
    import torch

    from gkcore.engine.demo import DEFAULTS, _check_args, run_demo

    try:  # every value before any data is generated
        _check_args(args.n, args.size, args.steps, args.batch_size, args.lr, args.warmup,
                    DEFAULTS["eval_fraction"], args.num_threads)
    except ValueError as e:
        print(f"error: demo: {e}", file=sys.stderr)
        return 2
    from gkcore.engine.launch import resolve_device

    try:
        device = str(resolve_device(args.device))
    except ValueError as e:
        print(f"error: --{e}", file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))))
    res = run_demo(args.out, n=args.n, size=args.size, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                   warmup=args.warmup, seed=args.seed, device=device, num_threads=args.num_threads,
                   progress=not args.no_progress, backend=args.backend, reuse_data=not args.regenerate,
                   overrides=_parse_set(args.set) if args.set else None, ablation=args.ablation,
                   gen_images=args.gen_images)
    if res["train"]["status"] != "completed":
        return 130
    if not res["above_chance_after_pretraining"]:
        print("note: the pre-trained model did not beat chance on both metrics in this run", file=sys.stderr)
    return 0
