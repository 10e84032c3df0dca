"""Predictions over a split from every rank, and `dmhpc eval`: one result file and plots per evaluation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dmhpc import plots as P
from dmhpc.data.loaders import domain_stats, eval_batches
from dmhpc.distributed import all_gather_object, bootstrap, shutdown
from dmhpc.run import RunDir, evaluation_tag
from dmhpc.train.checkpoint import load_checkpoint
from dmhpc.train.metrics import CRITERIA, classification_metrics
from dmhpc.train.objective import build_backbone

DOMAINS = ("source", "target")


def predict(model, directory, split: str, *, batch_size: int, dist, mean, std,
            with_features: bool = False) -> dict:
    """Run `model` over one split of one data set, sharded over ranks; every rank gets all predictions.

    Returns numpy arrays `labels`, `prob` (n, classes), `index` and optionally `features`, in split
    order. The model is put in eval mode and left there.
    """
    model.eval()
    labels, probs, indices, feats = [], [], [], []
    with torch.no_grad():
        for x, y, idx in eval_batches(directory, split, batch_size=batch_size, rank=dist.rank,
                                      world_size=dist.world_size, device=dist.device, mean=mean, std=std):
            f, logits = model(x)
            probs.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
            labels.append(y.cpu().numpy())
            indices.append(idx.cpu().numpy() if hasattr(idx, "cpu") else np.asarray(idx))
            if with_features:
                feats.append(f.float().cpu().numpy())
    local = {
        "labels": _cat(labels, np.int64, (0,)),
        "prob": _cat(probs, np.float32, (0, 2)),
        "index": _cat(indices, np.int64, (0,)),
    }
    if with_features:
        local["features"] = _cat(feats, np.float32, (0, 0))
    if dist.world_size == 1:
        return local
    parts = all_gather_object(local)  # rank order = split order: each rank holds a contiguous part
    return {key: np.concatenate([p[key] for p in parts if len(p[key])] or [local[key]]) for key in local}


def _cat(chunks, dtype, empty_shape):
    return np.concatenate(chunks).astype(dtype, copy=False) if chunks else np.zeros(empty_shape, dtype)


def evaluate_run(model, cfg, dist, run: RunDir, *, checkpoint: dict, split: str, stats: dict,
                 plots: bool = True) -> dict:
    """Metrics of both domains of the run's data on `split`, written by rank 0 to the run's own file
    for (checkpoint, split), with plots named alike, never over another evaluation's.

    `checkpoint` says which checkpoint the model holds (name, epoch, step, selection criterion and
    score) and is copied into the result, so a reader can tell oracle-selected results apart.
    `stats[domain]` is the (mean, std) the domain is normalized with.
    """
    dirs = {"source": cfg.data.source, "target": cfg.data.target}
    preds = {
        d: predict(model, dirs[d], split, batch_size=2 * cfg.train.batch_size, dist=dist,
                   mean=stats[d][0], std=stats[d][1], with_features=plots)
        for d in DOMAINS
    }
    result = {
        "split": split,
        "checkpoint": checkpoint,
        "oracle": CRITERIA.get(checkpoint.get("criterion"), False),
        "data": {d: str(dirs[d]) for d in DOMAINS},
        **{d: classification_metrics(preds[d]["labels"], preds[d]["prob"]) for d in DOMAINS},
    }
    if not dist.is_main:
        return result
    run.write_result(result, checkpoint["name"], split)
    if plots:
        tag = evaluation_tag(checkpoint["name"], split)
        title = f"{run.path.name}: {checkpoint['name']} checkpoint, {split} split" + (
            " (oracle selection)" if result["oracle"] else "")
        P.roc_curves({d: (preds[d]["labels"], preds[d]["prob"]) for d in DOMAINS},
                     run.plot_path(f"roc_{tag}"), f"ROC, {title}")
        P.confusion_matrices({d: result[d] for d in DOMAINS}, run.plot_path(f"confusion_{tag}"),
                             f"confusion, {title}")
        P.training_curves(run.read_log(), run.plot_path("training_curves"))
        P.latent_embedding({d: (preds[d]["features"], preds[d]["labels"]) for d in DOMAINS},
                           run.plot_path(f"latent_{tag}"), f"DA features, {title}", seed=cfg.seed,
                           max_points=1000)
    return result


def eval_arguments(parser) -> None:
    parser.add_argument("--run", required=True, type=Path, help="run directory (holds config.yaml and checkpoints/)")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"], help="default: test")
    parser.add_argument("--checkpoint", default="best", choices=["best", "last"],
                        help="which checkpoint of the run to evaluate (default: best)")


def eval_main(args) -> int:
    run = RunDir(args.run)
    cfg = run.config()
    ckpt = load_checkpoint(run.checkpoint(args.checkpoint))
    dist = bootstrap()
    try:
        model = build_backbone(cfg).to(dist.device)
        model.load_state_dict(ckpt["model"])
        info = {"name": args.checkpoint, **{k: ckpt[k] for k in ("epoch", "step") if k in ckpt},
                **ckpt.get("selection", {})}
        stats = dict(zip(DOMAINS, domain_stats(cfg.data.source, cfg.data.target, cfg.data.normalize)))
        result = evaluate_run(model, cfg, dist, run, checkpoint=info, split=args.split, stats=stats)
        if dist.is_main:
            print(format_table({f"{args.run.name} ({args.checkpoint}, {args.split})": result}))
            print(f"wrote {run.result_path(args.checkpoint, args.split)} and "
                  f"{run.plot_path(f'*_{evaluation_tag(args.checkpoint, args.split)}')}")
    finally:
        shutdown()
    return 0


def format_table(results: dict) -> str:
    """A Markdown table of source and target accuracy and AUC, one row per run."""
    rows = ["| run | source acc | source AUC | target acc | target AUC |", "|---|---|---|---|---|"]
    for name, r in results.items():
        mark = " (oracle)" if r.get("oracle") else ""
        rows.append(f"| {name}{mark} | {r['source']['accuracy']:.3f} | {r['source']['roc_auc']:.3f} "
                    f"| {r['target']['accuracy']:.3f} | {r['target']['roc_auc']:.3f} |")
    return "\n".join(rows)
