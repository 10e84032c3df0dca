"""The training loop: one program for a laptop, `torchrun`, `srun` and `mpiexec`.

    dmhpc train --config configs/deepmerge-mmd-fisher-entropy.yaml train.epochs=5
    torchrun --nproc_per_node=4 -m dmhpc.train --config ... --resume auto

Read top to bottom: set-up, resume, the epoch loop (step, evaluate, select, checkpoint), and the
final test evaluation of the selected checkpoint.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, asdict
from pathlib import Path

import numpy as np
import torch

from dmhpc.config import config_to_dict, load_config, save_config
from dmhpc.data.loaders import domain_stats, make_train_loader
from dmhpc.distributed import all_gather_object, barrier, bootstrap, shutdown
from dmhpc.evaluate import evaluate_model, format_table, predict
from dmhpc.models import param_groups
from dmhpc.train.checkpoint import (REQUEUE_EXIT_CODE, StopRequest, find_resume, gather_rng_states,
                                    load_checkpoint, restore_rank_rng_state, save_checkpoint)
from dmhpc.train.metrics import MetricLog, classification_metrics, read_log, selection_score
from dmhpc.train.objective import DomainAdaptation
from dmhpc.train.schedule import lr_factor
from dmhpc.losses import grl_coefficient

DEBUG_BATCHES = 8  # debug=true trains on this many global batches per domain


@dataclass
class Progress:
    """Where the run stands; saved in every checkpoint."""

    epoch: int = 0            # current epoch
    step_in_epoch: int = 0    # next step to run within it
    step: int = 0             # global optimizer steps taken
    best_score: float = -math.inf
    best_epoch: int = -1
    evals_since_best: int = 0


def train(cfg, resume: str = "auto") -> int:
    """Train as configured; returns the process exit code (0, or REQUEUE_EXIT_CODE on a signal)."""
    dist = bootstrap()
    try:
        return _train(cfg, resume, dist)
    finally:
        shutdown()


def _train(cfg, resume: str, dist) -> int:
    run_dir = Path(cfg.run.dir)
    ckpt_dir = run_dir / "checkpoints"
    if dist.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    torch.manual_seed(cfg.seed + dist.rank)  # dropout differs per rank; data order comes from the loader
    if cfg.debug:
        torch.autograd.set_detect_anomaly(True)

    # --- set-up -------------------------------------------------------------------------------
    subset = DEBUG_BATCHES * cfg.train.batch_size * dist.world_size if cfg.debug else None
    t_setup = time.perf_counter()
    loader = make_train_loader(
        cfg.data.loader, cfg.data.source, cfg.data.target, batch_size=cfg.train.batch_size,
        rank=dist.rank, world_size=dist.world_size, seed=cfg.seed, device=dist.device,
        augment=cfg.data.augment, normalize=cfg.data.normalize, num_workers=cfg.data.num_workers,
        subset=subset)
    # Data staging (reading the data into device memory, or starting reader processes): the
    # slowest rank's time, which scaling studies report beside the throughput.
    loader_setup_s = max(all_gather_object(time.perf_counter() - t_setup))
    model = DomainAdaptation(cfg, seed=cfg.seed).to(dist.device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    mult = cfg.optim.head_lr_mult
    groups = param_groups(model.backbone, discriminator=model.discriminator, fisher=model.fisher,
                          head_lr_mult=mult, discriminator_lr_mult=mult, fisher_lr_mult=mult)
    optimizer = _optimizer(cfg.optim, groups)
    scaler = torch.amp.GradScaler(dist.device.type, enabled=cfg.train.amp == "fp16")
    ddp = model
    if dist.world_size > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    step_fn = torch.compile(ddp) if cfg.train.compile else ddp

    steps_per_epoch = len(loader)
    total_steps = cfg.train.epochs * steps_per_epoch
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)
    dirs = {"source": cfg.data.source, "target": cfg.data.target}
    stats = dict(zip(dirs, domain_stats(cfg.data.source, cfg.data.target, cfg.data.normalize)))
    log = MetricLog(run_dir) if dist.is_main else None
    if dist.is_main:
        print(f"dmhpc train: {run_dir} | world {dist.world_size} on {dist.device} | loader {loader.kind} "
              f"({loader.reason}) | {steps_per_epoch} steps/epoch, {total_steps} steps", flush=True)

    # --- resume ---------------------------------------------------------------------------------
    prog = Progress()
    path = find_resume(run_dir, resume)
    if path is not None:
        ckpt = load_checkpoint(path)
        model.backbone.load_state_dict(ckpt["model"])
        for name in ("discriminator", "fisher"):
            if getattr(model, name) is not None:
                getattr(model, name).load_state_dict(ckpt[name])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        prog = Progress(**ckpt["progress"])
        restore_rank_rng_state(ckpt["rng"], dist.rank)
        if log is not None:
            print(f"dmhpc train: resumed from {path} at epoch {prog.epoch}, step {prog.step}", flush=True)
    if log is not None:
        _truncate_log(run_dir, prog.step)  # a fresh start or a resume: no records from the future
        log.write({"kind": "setup", "step": prog.step, "world_size": dist.world_size, "loader": loader.kind,
                   "loader_setup_s": loader_setup_s, "cpu_threads": torch.get_num_threads()}, prog.step)

    def checkpoint(name: str, selection: dict | None = None) -> None:
        rng = gather_rng_states()  # a collective: every rank calls it
        if dist.is_main:
            state = {
                "model": model.backbone.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "progress": asdict(prog),
                "rng": rng,
                "epoch": prog.epoch,
                "step": prog.step,
                "selection": selection or {},
                "config": config_to_dict(cfg),
            }
            for part in ("discriminator", "fisher"):
                if getattr(model, part) is not None:
                    state[part] = getattr(model, part).state_dict()
            save_checkpoint(ckpt_dir / f"{name}.pt", state)
        # Nobody exits (and so ends the job step) while rank 0 is still writing.
        barrier()

    # --- the epoch loop -------------------------------------------------------------------------
    criterion = cfg.select.criterion
    autocast = _autocast(cfg.train.amp, dist.device)
    stopped = False
    with StopRequest(cfg.train.signals) as stop:
        while not stopped and prog.step < total_steps and prog.epoch < cfg.train.epochs:
            model.train()
            sums, seen, preds = {}, 0, {"source": [], "target": [], "domain": []}
            t_epoch = time.perf_counter()
            for xs, ys, xt, yt in loader.epoch(prog.epoch, start_step=prog.step_in_epoch):
                scale = lr_factor(prog.step, schedule=cfg.optim.schedule, total_steps=total_steps,
                                  steps_per_epoch=steps_per_epoch, lr=cfg.optim.lr,
                                  warmup_steps=cfg.optim.warmup_steps, min_lr=cfg.optim.min_lr,
                                  cycle_epochs=cfg.optim.cycle_epochs, gamma=cfg.optim.gamma, power=cfg.optim.power)
                for g in optimizer.param_groups:
                    g["lr"] = cfg.optim.lr * g["lr_mult"] * scale
                grl = grl_coefficient(prog.step, total_steps, schedule=cfg.loss.grl.schedule,
                                      alpha=cfg.loss.grl.alpha, high=cfg.loss.grl.high)
                if cfg.train.channels_last:
                    xs = xs.contiguous(memory_format=torch.channels_last)
                    xt = xt.contiguous(memory_format=torch.channels_last)

                with autocast:
                    loss, terms, out = step_fn(xs, ys, xt, grl)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.optim.grad_clip:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                prog.step += 1
                prog.step_in_epoch += 1

                # Bookkeeping stays on the device: no host synchronisation per step.
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + v
                seen += 1
                prob = torch.softmax(out["logits"].float(), dim=1)
                preds["source"].append((ys, prob[: len(ys)]))
                preds["target"].append((yt, prob[len(ys):]))
                if "domain_logits" in out:
                    preds["domain"].append(out["domain_logits"])
                if log is not None and prog.step % cfg.train.log_every == 0:
                    log.write({"kind": "step", "step": prog.step, "epoch": prog.epoch, "lr_scale": scale,
                               "grl": grl, "loss": {k: float(v) for k, v in terms.items()}}, prog.step)

                if stop.should_stop():  # the same answer on every rank, so all stop after this step
                    stopped = True
                    break
                if cfg.train.checkpoint_every and prog.step % cfg.train.checkpoint_every == 0:
                    checkpoint("last")
                if prog.step >= total_steps:
                    break
            if stopped:
                break

            # --- epoch record, evaluation, selection, checkpoint ------------------------------------
            elapsed = time.perf_counter() - t_epoch
            record = {
                "kind": "epoch", "epoch": prog.epoch, "step": prog.step,
                "loss": {k: v / max(seen, 1) for k, v in _mean_over_ranks(sums, dist).items()},
                "images_per_s": 2 * seen * cfg.train.batch_size * dist.world_size / max(elapsed, 1e-9),
                "step_time_s": elapsed / max(seen, 1),
            }
            for d in dirs:
                # Empty when a resume lands on the end of an epoch: nothing left to train in it.
                labels, prob = _gather_predictions(preds[d], dist)
                record[d] = {"train": classification_metrics(labels, prob)} if len(labels) else {}
            if preds["domain"]:
                record["discriminator_accuracy"] = _domain_accuracy(preds["domain"], dist)

            epoch_done = prog.step_in_epoch >= steps_per_epoch
            if prog.step >= total_steps or (epoch_done and (prog.epoch + 1) % cfg.train.eval_every == 0):
                val = {d: predict(model.backbone, dirs[d], "val", batch_size=2 * cfg.train.batch_size, dist=dist,
                                  mean=stats[d][0], std=stats[d][1], with_features=criterion == "dev")
                       for d in dirs}
                for d in dirs:
                    record[d]["val"] = classification_metrics(val[d]["labels"], val[d]["prob"])
                score = selection_score(criterion, val)
                record["selection"] = {"criterion": criterion, "score": score}
                if score > prog.best_score:
                    prog.best_score, prog.best_epoch, prog.evals_since_best = score, prog.epoch, 0
                    checkpoint("best", {"criterion": criterion, "score": score, "epoch": prog.epoch})
                else:
                    prog.evals_since_best += 1
            if epoch_done:
                prog.epoch += 1
                prog.step_in_epoch = 0
            checkpoint("last")
            if log is not None:
                log.write(record, prog.step)
                print(_epoch_line(record, criterion), flush=True)
            if cfg.train.early_stopping and prog.evals_since_best >= cfg.train.early_stopping:
                if dist.is_main:
                    print(f"dmhpc train: early stop: {criterion} has not improved for "
                          f"{prog.evals_since_best} evaluations", flush=True)
                break
    loader.close()

    if stopped:
        checkpoint("last")
        if dist.is_main:
            print(f"dmhpc train: {stop.signal_name or 'a signal on another rank'}: checkpoint written at step "
                  f"{prog.step}; exiting with {REQUEUE_EXIT_CODE} so the launcher requeues", flush=True)
        return REQUEUE_EXIT_CODE

    # --- test the selected checkpoint -----------------------------------------------------------
    best = load_checkpoint(ckpt_dir / "best.pt")
    model.backbone.load_state_dict(best["model"])
    info = {"name": "best", "epoch": best["epoch"], "step": best["step"], **best["selection"]}
    result = evaluate_model(model.backbone, cfg, dist, split="test", run_dir=run_dir, checkpoint_info=info)
    if log is not None:
        log.close()
        print(format_table({run_dir.name: result}), flush=True)
    return 0


def _epoch_line(r: dict, criterion: str) -> str:
    val = {d: r[d].get("val", {}).get("accuracy", math.nan) for d in ("source", "target")}
    return (f"epoch {r['epoch']} step {r['step']}: loss {r['loss'].get('total', math.nan):.4f} | val acc "
            f"source {val['source']:.3f} target {val['target']:.3f} | {criterion} "
            f"{r.get('selection', {}).get('score', math.nan):.4f} | {r['images_per_s']:.0f} img/s")


def _optimizer(o, groups):
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.momentum > 0,
                               weight_decay=o.weight_decay)
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return cls(groups, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)


def _autocast(amp: str, device):
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def _mean_over_ranks(sums: dict, dist) -> dict:
    """Epoch sums of the loss terms, averaged over ranks (global-scope terms are equal on every rank)."""
    if not sums:
        return {}
    keys = sorted(sums)
    vec = torch.stack([torch.as_tensor(sums[k], dtype=torch.float64, device=dist.device) for k in keys])
    if dist.world_size > 1:
        torch.distributed.all_reduce(vec)
        vec /= dist.world_size
    return dict(zip(keys, vec.tolist()))


def _gather_predictions(pairs, dist):
    if not pairs:
        return np.zeros(0, np.int64), np.zeros((0, 2), np.float32)
    labels = torch.cat([y for y, _ in pairs]).cpu().numpy()
    prob = torch.cat([p for _, p in pairs]).cpu().numpy()
    if dist.world_size > 1:
        parts = all_gather_object((labels, prob))
        labels = np.concatenate([p[0] for p in parts])
        prob = np.concatenate([p[1] for p in parts])
    return labels, prob


def _domain_accuracy(domain_logits, dist) -> float:
    """Fraction of samples the discriminator assigns to the right domain (source first in each batch)."""
    correct = total = 0
    for d in domain_logits:
        half = d.shape[0] // 2
        correct += int((d[:half] > 0).sum()) + int((d[half:] <= 0).sum())
        total += d.shape[0]
    if dist.world_size > 1:
        parts = all_gather_object((correct, total))
        correct, total = sum(p[0] for p in parts), sum(p[1] for p in parts)
    return correct / max(total, 1)


def _truncate_log(run_dir: Path, step: int) -> None:
    """Drop records written after the checkpoint we resume from, so the log has no duplicates."""
    records = [r for r in read_log(run_dir) if r.get("step", 0) <= step]
    path = run_dir / "metrics.jsonl"
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def train_arguments(parser) -> None:
    parser.add_argument("--config", required=True, type=Path, help="training configuration (YAML)")
    parser.add_argument("--resume", default="auto",
                        help="auto: continue from RUN/checkpoints/last.pt if present; none; or a checkpoint path")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides, e.g. train.epochs=5 data.source=/scratch/pristine")


def train_main(args) -> int:
    cfg = load_config(args.config, args.overrides)  # errors here come before any process group starts
    return train(cfg, resume=args.resume)
