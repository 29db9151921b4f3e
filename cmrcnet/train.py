"""Train one method on one fold: early stopping on a validation split, resumable after preemption.

Why the care with seeds and checkpoints: SLURM jobs get killed, and a resumed run must give the same model as an
uninterrupted one. Every epoch reseeds all RNGs from (seed, epoch) and the data order and augmentations are
functions of (seed, epoch, index), so on CPU a resumed run ends with bit-identical weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from cmrcnet.data.datasets import EpochSampler, Fold, Part, fold_id, load_fold
from cmrcnet.errors import input_error
from cmrcnet.io import atomic_path, provenance, write_json, write_table

log = logging.getLogger("cmrcnet")

MODELS = ("cmrcnet", "bleep", "stnet", "histogene", "crossmodal")
OPTIMIZERS = ("AdamW", "Adam")
DEFAULT_TRAIN: dict[str, Any] = {
    "epochs": 60,
    "batch_size": 64,
    "lr": 1e-4,
    "weight_decay": 1e-3,
    "optimizer": "AdamW",
    "patience": 10,
    "val_split": "spot",
    "val_fraction": 0.1,
    "num_workers": 4,
    "amp": True,
    "channels_last": True,
    "max_steps_per_epoch": None,
    "grad_clip": None,
    "shuffle_pairs": False,
    "schedule": "cosine",
    "min_lr": 1e-5,
    "warmup_epochs": 0,
}
SCHEDULES = ("constant", "cosine")
# Settings that change speed or length, not the path a run takes: a checkpoint may be resumed with other values.
# (`epochs` shapes the path under a cosine schedule or a warm-up, and is then fingerprinted.)
NOT_FINGERPRINTED = ("num_workers", "epochs")


def build_model(name: str, n_genes: int, params: dict):
    """The one place models are made (tests replace it with small stand-ins)."""
    from cmrcnet.models import create_model

    return create_model(name, n_genes=n_genes, **params)


def _whole(value, least: int) -> bool:
    """A whole number of at least `least` (YAML's `true` is not 1 epoch)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def resolve_train_cfg(train_cfg: dict | None, method_cfg: dict, method: str) -> dict:
    """Defaults, then the shared `train` settings, then the method's own overrides; unknown keys are refused."""
    cfg = dict(DEFAULT_TRAIN)
    set_in = {}  # where each given value came from, so an error points at the line to fix
    for source, where in ((train_cfg or {}, "train"), (method_cfg.get("train") or {}, f"methods.{method}.train")):
        for key, value in source.items():
            if key not in DEFAULT_TRAIN:
                raise input_error(f"{where}.{key}", f"unknown training setting; known: {', '.join(DEFAULT_TRAIN)}")
            cfg[key] = value
            set_in[key] = where
    checks = {
        "epochs": _whole(cfg["epochs"], 1),
        "batch_size": _whole(cfg["batch_size"], 1),
        "lr": _number(cfg["lr"]) and cfg["lr"] >= 0,
        "optimizer": cfg["optimizer"] in OPTIMIZERS,
        "patience": cfg["patience"] is None or _whole(cfg["patience"], 1),
        "num_workers": _whole(cfg["num_workers"], 0),
        "max_steps_per_epoch": cfg["max_steps_per_epoch"] is None or _whole(cfg["max_steps_per_epoch"], 1),
        "grad_clip": cfg["grad_clip"] is None or (_number(cfg["grad_clip"]) and cfg["grad_clip"] > 0),
        "shuffle_pairs": isinstance(cfg["shuffle_pairs"], bool),
        "schedule": cfg["schedule"] in SCHEDULES,
        "min_lr": _number(cfg["min_lr"]) and cfg["min_lr"] >= 0,
        "warmup_epochs": _whole(cfg["warmup_epochs"], 0) and cfg["warmup_epochs"] < cfg["epochs"],
    }
    for key, ok in checks.items():
        if not ok:
            raise input_error(f"{set_in.get(key, 'train')}.{key}", f"invalid value {cfg[key]!r}")
    return cfg


def lr_factor(epoch: int, cfg: dict) -> float:
    """Learning rate of 0-based epoch `epoch` as a multiple of `cfg["lr"]`.

    "constant": the base rate throughout. "cosine" (the authors' code; the paper states only lr 1e-4): after
    `warmup_epochs` of linear warm-up, cosine decay from the base rate towards `min_lr` over the planned epochs,
    as torch's CosineAnnealingLR(T_max=epochs - warmup_epochs, eta_min=min_lr) stepped once per epoch.
    A pure function of the epoch, so a resumed run takes the same rates as an uninterrupted one."""
    warmup = cfg["warmup_epochs"]
    if epoch < warmup:
        return (epoch + 1) / (warmup + 1)
    if cfg["schedule"] == "constant" or cfg["lr"] <= 0:
        return 1.0
    base = float(cfg["lr"])
    low = min(float(cfg["min_lr"]), base)
    t = (epoch - warmup) / max(cfg["epochs"] - warmup, 1)
    return (low + (base - low) * (1 + math.cos(math.pi * t)) / 2) / base


SMALL_FILE = 1 << 20  # input files up to this size are identified by their content hash


def file_identity(path: str | Path) -> str:
    """What identifies an input file: the hash of its content when small (gene and fold tables), else its size
    and modification time (expression and patch files are rewritten whole by the stage that makes them, never
    edited in place, so a new file means new data; a rewritten identical file only costs a fresh start)."""
    path = Path(path)
    if not path.is_file():
        raise input_error(path, "training input not found")
    stat = path.stat()
    if stat.st_size <= SMALL_FILE:
        return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return f"size:{stat.st_size},mtime_ns:{stat.st_mtime_ns}"


def data_identity(dataset_dir: str | Path, data: Fold) -> dict[str, str]:
    """The identity of every file a fold's training reads: the gene and fold tables and each training sample's
    normalised expression and patches."""
    dataset_dir = Path(dataset_dir)
    files = {"genes.tsv": data.genes_tsv, "folds.tsv": dataset_dir / "folds.tsv"}
    for sample in data.train_samples:
        files[f"st/{sample}"] = data.st_path(sample)
        files[f"patches/{sample}"] = data.patch_path(sample)
    return {name: file_identity(path) for name, path in files.items()}


def fingerprint(model: str, params: dict, cfg: dict, genes: list[str], fold: int, seed: int,
                data: dict | None = None) -> dict:
    """What a checkpoint must match to be resumed: everything that changes the weights an epoch produces, the
    input data's identity (`data_identity`) included."""
    fixed_length = cfg["schedule"] == "constant" and not cfg["warmup_epochs"]
    skip = NOT_FINGERPRINTED if fixed_length else tuple(k for k in NOT_FINGERPRINTED if k != "epochs")
    fp = {
        "model": model,
        "params": params,
        "train": {k: v for k, v in cfg.items() if k not in skip},
        "genes": list(genes),
        "fold": fold_id(fold),
        "seed": int(seed),
        "data": dict(data or {}),
    }
    return json.loads(json.dumps(fp, sort_keys=True, default=str))  # plain JSON types compare reliably


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def fingerprint_diff(old: dict, new: dict) -> list[str]:
    a, b = _flatten(old), _flatten(new)
    missing = object()
    return sorted(k for k in a.keys() | b.keys() if a.get(k, missing) != b.get(k, missing))


def _short_keys(keys: list[str], limit: int = 6) -> list[str]:
    return keys if len(keys) <= limit else [*keys[:limit], f"{len(keys) - limit} more"]


def _move_aside(checkpoints: Path, message: str) -> None:
    """Keep the previous run's checkpoints (one generation) beside the new ones instead of resuming them."""
    previous = checkpoints.with_name(checkpoints.name + ".previous")
    shutil.rmtree(previous, ignore_errors=True)
    checkpoints.rename(previous)
    log.warning("%s; moved to %s, training from scratch", message, previous)


def fingerprint_hash(fp: dict) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


def _seed_everything(seed: int, *extra: int) -> None:
    """Seed torch, numpy and random from (seed, *extra): each epoch's randomness is then fixed by its number."""
    value = int(np.random.SeedSequence([int(v) % 2**64 for v in (seed, *extra)]).generate_state(1)[0])
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


def _rng_state() -> dict:
    state = np.random.get_state(legacy=False)
    state["state"]["key"] = state["state"]["key"].tolist()  # plain types, so the checkpoint loads weights_only
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": state,
        "python": random.getstate(),
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy_state = dict(state["numpy"])
    numpy_state["state"] = {**numpy_state["state"], "key": np.array(numpy_state["state"]["key"], dtype=np.uint32)}
    np.random.set_state(numpy_state)
    random.setstate(state["python"])


def _save(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint written by `train_fold` (best.pt or last.pt) onto the CPU."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a damaged file fails inside torch.load in many different ways
        raise input_error(path, f"cannot read checkpoint ({type(exc).__name__}); delete it to start over") from None


def _cpu_state(model: torch.nn.Module) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _n_spots(part: Part) -> int:
    return int(sum(len(idx) for idx in part.values()))


def _parameter_groups(model: torch.nn.Module) -> list:
    """The trainable parameters; frozen parts (a foundation model's encoder) are left out, so weight decay never
    touches them. Names the model lists in `no_weight_decay()` (timm's convention: a learned temperature or bias of
    a CLIP/SigLIP loss, which CLIP keeps out of weight decay) form a second group without it."""
    exempt = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not exempt:
        return [p for _, p in named]
    return [{"params": [p for n, p in named if n not in exempt]},
            {"params": [p for n, p in named if n in exempt], "weight_decay": 0.0}]


def _make_loaders(data: Fold, train_part: Part, val_part: Part, model, cfg: dict, seed: int, device: torch.device):
    """Training loader (shuffled per epoch, augmented) and validation loader (fixed order, plain)."""
    from torch.utils.data import DataLoader

    size = int(model.input_size)
    if model.slide_level:
        if cfg.get("shuffle_pairs"):
            raise input_error("train.shuffle_pairs", "the shuffled-pairing control supports spot-level models only")
        train_ds = data.slide_dataset(train_part, size, augment=True, seed=seed)
        val_ds = data.slide_dataset(val_part, size, augment=False, seed=seed)
        batch_size = 1
    else:
        train_ds = data.spot_dataset(train_part, size, augment=True, seed=seed)
        val_ds = data.spot_dataset(val_part, size, augment=False, seed=seed)
        batch_size = cfg["batch_size"]
        if cfg.get("shuffle_pairs"):  # the shuffled-pairing control: same spots, broken image-expression link
            train_ds.expression = train_ds.expression[np.random.default_rng(seed).permutation(len(train_ds))]
    max_steps = cfg["max_steps_per_epoch"]
    sampler = EpochSampler(len(train_ds), seed, shuffle=True,
                           limit=None if max_steps is None else max_steps * batch_size)

    def options(ds) -> dict:
        workers = min(cfg["num_workers"], len(ds))  # no idle workers (a slide loader has a handful of items)
        return {"num_workers": workers, "persistent_workers": workers > 0, "pin_memory": device.type == "cuda"}

    train_loader = DataLoader(train_ds, batch_size=batch_size, sampler=sampler,
                              drop_last=len(sampler) > batch_size,  # a last batch of 1 breaks BatchNorm/contrast
                              generator=torch.Generator(), **options(train_ds))
    val_loader = DataLoader(val_ds, batch_size=batch_size, shuffle=False, **options(val_ds))
    return train_loader, val_loader, sampler


def _loss_parts(out: dict) -> dict[str, torch.Tensor]:
    """`loss` plus every other scalar the model reports (its named loss parts)."""
    return {k: v.detach().float() for k, v in out.items() if torch.is_tensor(v) and v.numel() == 1}


def _run_epoch(model, loader, optimizer, device, cfg, channels_last: bool, desc: str, progress: bool) -> dict:
    """One pass over a loader; trains when an optimizer is given. Returns spot-weighted means of the loss parts."""
    from tqdm import tqdm

    training = optimizer is not None
    model.train(training)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg["amp"] and device.type == "cuda")
    totals: dict[str, torch.Tensor] = {}
    n_total = 0
    # a terminal gets a live bar; a log file (Snakemake, SLURM) one line every 30 s instead of thousands
    bar = tqdm(loader, desc=desc, leave=False, disable=not progress, unit="batch",
               mininterval=0.1 if sys.stderr.isatty() else 30)
    with torch.set_grad_enabled(training):
        for step, batch in enumerate(bar):
            inputs = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k in ("image", "expr", "pos")}
            if channels_last and inputs["image"].ndim == 4:
                inputs["image"] = inputs["image"].contiguous(memory_format=torch.channels_last)
            n = inputs["expr"].numel() // inputs["expr"].shape[-1]  # spots in the batch, spot or slide level
            with autocast:
                out = model(inputs)
            if training:
                optimizer.zero_grad(set_to_none=True)
                out["loss"].backward()
                if cfg["grad_clip"]:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
                optimizer.step()
            for key, value in _loss_parts(out).items():
                totals[key] = totals.get(key, 0.0) + value * n
            n_total += n
            if progress and step % 10 == 0:
                bar.set_postfix(loss=f"{float(totals['loss']) / n_total:.4f}")
    bar.close()
    if n_total == 0:
        raise RuntimeError(f"{desc}: no batches (too few spots for the batch size?)")
    return {k: float(v) / n_total for k, v in totals.items()}


def _history_table(history: list[dict]) -> pd.DataFrame:
    table = pd.DataFrame(history)
    first = ["epoch", "train_loss", "val_loss"]
    last = ["lr", "seconds"]
    middle = sorted(c for c in table.columns if c not in first + last)
    return table[first + middle + last]


def _write_deployable(best_pt: Path, out: Path, model, data: Fold, device: torch.device) -> None:
    """best.pt = the best epoch's checkpoint plus what prediction on a new slide needs: the patch resolution the
    model was trained at and, for a retrieval model, its reference bank (cmrcnet.inference.bank)."""
    from cmrcnet.data.datasets import patch_settings
    from cmrcnet.inference.bank import BANK_KEY, PATCHES_KEY, build_bank

    ckpt = load_checkpoint(best_pt)
    settings = {s: patch_settings(data.patch_path(s)) for s in data.samples}
    if len({tuple(v.values()) for v in settings.values()}) > 1:
        raise input_error(data.dataset_dir / "patches", f"patches cut at different settings: {settings}")
    ckpt[PATCHES_KEY] = next(iter(settings.values()))
    if model.kind == "retrieval":
        model.load_state_dict(ckpt["model"])
        ckpt[BANK_KEY] = build_bank(model, data, device)
    _save(ckpt, out)


def train_fold(*, method: str, method_cfg: dict, train_cfg: dict, dataset_dir, fold: int | str, out_dir, seed: int = 0,
               device: str | None = None, progress: bool = True, stop_after_epochs: int | None = None,
               technology: str | None = None) -> dict:
    """Train `method` on fold `fold` of a processed dataset; writes best.pt, checkpoints/last.pt, history.csv,
    train.json into `out_dir` and resumes from checkpoints/last.pt when it exists.

    Fold `all` trains the deployable model on every sample. `technology` (visium / xenium) is recorded in best.pt
    so that prediction on a new slide lays spots on the same geometry.

    `stop_after_epochs` stops once that many epochs are done, as a kill would (no train.json); a later call resumes.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    model_name = method_cfg.get("model")
    if model_name not in MODELS:
        raise input_error(f"methods.{method}.model", f"unknown model {model_name!r}; use one of {', '.join(MODELS)}")
    cfg = resolve_train_cfg(train_cfg, method_cfg, method)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    data = load_fold(dataset_dir, fold)
    train_part, val_part = data.split(cfg["val_split"], cfg["val_fraction"], seed)
    n_train, n_val = _n_spots(train_part), _n_spots(val_part)
    params = dict(method_cfg.get("params") or {})
    if model_name == "histogene":
        needed = data.n_pos()
        if params.get("n_pos") is None:
            params["n_pos"] = needed
        elif params["n_pos"] < needed:
            raise input_error(f"methods.{method}.params.n_pos", f"{params['n_pos']} is below the data's {needed}")
    fp = fingerprint(model_name, params, cfg, data.genes, fold, seed, data_identity(dataset_dir, data))
    log.info("%s fold %s: %d training spots (%s), %d validation spots, %d genes, device %s", method, fold, n_train,
             ", ".join(train_part), n_val, len(data.genes), dev)

    _seed_everything(seed)
    model = build_model(model_name, len(data.genes), params)
    if hasattr(model, "set_output_bias"):
        model.set_output_bias(torch.from_numpy(data.expression(train_part).mean(axis=0)))
    channels_last = cfg["channels_last"] and dev.type == "cuda" and not model.slide_level
    model.to(dev)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    opt_class = getattr(torch.optim, cfg["optimizer"])
    optimizer = opt_class(_parameter_groups(model), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: lr_factor(epoch, cfg))

    state: dict[str, Any] = {"epoch": 0, "best_val_loss": math.inf, "best_epoch": None, "bad_epochs": 0,
                             "history": [], "stopped_early": False}
    # Both live in checkpoints/, which Snakemake does not own: a failed job's outputs are deleted, these survive.
    last_pt = out_dir / "checkpoints" / "last.pt"
    best_pt = out_dir / "checkpoints" / "best.pt"
    if last_pt.exists():
        ckpt = load_checkpoint(last_pt)
        differ = fingerprint_diff(ckpt.get("fingerprint", {}), fp)
        finished = ckpt["stopped_early"] or ckpt["epoch"] >= cfg["epochs"]
        if differ or finished:
            # another config or other data, or a finished run that was asked to run again (`--forcerun`, fewer
            # epochs): the old state cannot be resumed, so it is moved aside and training starts afresh
            why = (f"{', '.join(_short_keys(differ))} changed" if differ
                   else f"it holds a finished run ({ckpt['epoch']} epochs)")
            _move_aside(last_pt.parent, f"{method} fold {fold}: not resuming {last_pt} because {why}")
        else:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            _set_rng_state(ckpt["rng"])
            state = {k: ckpt[k] for k in state}
            log.info("%s fold %s: resuming from %s after epoch %d", method, fold, last_pt, state["epoch"])
    if hasattr(model, "prepare") and state["epoch"] == 0:
        # a part fitted once, before training, on the training spots alone (the cross-modal grid's scVI gene
        # tower); a resumed run has it in its checkpoint
        model.prepare(data.expression(train_part), seed=seed, device=dev)

    meta = {"method": method, "model_name": model_name, "params": params, "train_cfg": cfg, "genes": data.genes,
            "fold": fold_id(fold), "seed": int(seed), "kind": model.kind, "slide_level": bool(model.slide_level),
            "input_size": int(model.input_size), "fingerprint": fp, "technology": technology}
    train_loader, val_loader, sampler = _make_loaders(data, train_part, val_part, model, cfg, seed, dev)
    n_epochs = cfg["epochs"] if stop_after_epochs is None else min(cfg["epochs"], stop_after_epochs)
    while state["epoch"] < n_epochs and not state["stopped_early"]:
        epoch = state["epoch"] + 1
        tic = time.perf_counter()
        _seed_everything(seed, epoch)
        sampler.set_epoch(epoch)
        train_loader.generator.manual_seed(int(np.random.SeedSequence([seed % 2**64, epoch, 3]).generate_state(1)[0]))
        desc = f"{method} fold {fold} epoch {epoch}/{cfg['epochs']}"
        train_stats = _run_epoch(model, train_loader, optimizer, dev, cfg, channels_last, desc, progress)
        if not math.isfinite(train_stats["loss"]):
            raise RuntimeError(f"{method} fold {fold}: training loss is {train_stats['loss']} in epoch {epoch}; "
                               "try a lower lr or set grad_clip")
        val_stats = _run_epoch(model, val_loader, None, dev, cfg, channels_last, desc + " (val)", progress)
        row = {"epoch": epoch, "train_loss": train_stats.pop("loss"), "val_loss": val_stats.pop("loss")}
        row.update({f"train_{k}": v for k, v in train_stats.items()})
        row.update({f"val_{k}": v for k, v in val_stats.items()})
        row.update({"lr": optimizer.param_groups[0]["lr"], "seconds": round(time.perf_counter() - tic, 3)})
        state["history"].append(row)
        state["epoch"] = epoch
        scheduler.step()

        if row["val_loss"] < state["best_val_loss"]:
            state.update(best_val_loss=row["val_loss"], best_epoch=epoch, bad_epochs=0)
            _save({"model": _cpu_state(model), **meta, "epoch": epoch, "val_loss": row["val_loss"],
                   "provenance": provenance(meta["train_cfg"])}, best_pt)
        else:
            state["bad_epochs"] += 1
            if cfg["patience"] is not None and state["bad_epochs"] >= cfg["patience"]:
                state["stopped_early"] = True
        write_table(out_dir / "history.csv", _history_table(state["history"]))
        _save({"model": _cpu_state(model), "optimizer": optimizer.state_dict(), "rng": _rng_state(),
               "scheduler": scheduler.state_dict(),
               "fingerprint": fp, "fingerprint_hash": fingerprint_hash(fp), **state}, last_pt)
        log.info("%s fold %s epoch %d: train loss %.4f, val loss %.4f%s (%.1f s)", method, fold, epoch,
                 row["train_loss"], row["val_loss"], " *" if state["best_epoch"] == epoch else "", row["seconds"])
        if state["stopped_early"]:
            log.info("%s fold %s: early stop, no better validation loss for %d epochs", method, fold,
                     state["bad_epochs"])

    history = state["history"]
    complete = state["stopped_early"] or state["epoch"] >= cfg["epochs"]
    summary = {
        "epochs_run": state["epoch"],
        "best_epoch": state["best_epoch"],
        "best_val_loss": state["best_val_loss"] if state["best_epoch"] else None,
        "first_val_loss": history[0]["val_loss"] if history else None,
        "stopped_early": state["stopped_early"],
        "seconds": round(sum(r["seconds"] for r in history), 3),
        "device": str(dev),
        "n_train_spots": n_train,
        "n_val_spots": n_val,
        "complete": complete,
    }
    if complete:
        if state["best_epoch"] is None or not best_pt.exists():
            raise RuntimeError(f"{method} fold {fold}: no epoch gave a finite validation loss; no best.pt")
        _write_deployable(best_pt, out_dir / "best.pt", model, data, dev)
        write_table(out_dir / "history.csv", _history_table(history))
        write_json(out_dir / "train.json", {
            "config": {"method": method, "method_cfg": method_cfg, "train_cfg": cfg, "params": params,
                       "dataset_dir": str(dataset_dir), "fold": fold_id(fold), "seed": int(seed)},
            "summary": summary,
            "device": {"type": dev.type, "name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"},
            "train_samples": list(train_part), "test_samples": data.test_samples,
            "fingerprint_hash": fingerprint_hash(fp),
            "provenance": provenance(),
            "wall_seconds_this_call": round(time.perf_counter() - start, 3),
        })
        log.info("%s fold %s: done, best epoch %s, val loss %.4f", method, fold, state["best_epoch"],
                 state["best_val_loss"])
    return summary
