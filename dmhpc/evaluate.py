"""Predictions over a split from every rank, and `dmhpc eval`: metrics JSON and plots of a run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dmhpc.errors import DmhpcError

DOMAINS = ("source", "target")


def predict(model, directory, split: str, *, batch_size: int, dist, mean, std,
            with_features: bool = False) -> dict:
    """Run `model` over one split of one data set, sharded over ranks; every rank gets all predictions.

    Returns numpy arrays `labels`, `prob` (n, classes), `index` and optionally `features`, in split
    order. The model is put in eval mode and left there.
    """
    import torch

    from dmhpc.data.loaders import eval_batches

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
    from dmhpc.distributed import all_gather_object

    parts = all_gather_object(local)  # rank order = split order: each rank holds a contiguous part
    return {key: np.concatenate([p[key] for p in parts if len(p[key])] or [local[key]]) for key in local}


def _cat(chunks, dtype, empty_shape):
    return np.concatenate(chunks).astype(dtype, copy=False) if chunks else np.zeros(empty_shape, dtype)


def evaluate_model(model, cfg, dist, *, split: str, run_dir: Path, checkpoint_info: dict,
                   plots: bool = True) -> dict:
    """Metrics of both domains on `split`, written to RUN/eval/metrics.json with plots (rank 0).

    `checkpoint_info` says which checkpoint the model holds (name, epoch, selection criterion and
    score) and is copied into the JSON, so a reader can tell oracle-selected results apart.
    """
    from dmhpc import plots as P
    from dmhpc.data.loaders import domain_stats
    from dmhpc.train.metrics import CRITERIA, classification_metrics, read_log

    stats = dict(zip(DOMAINS, domain_stats(cfg.data.source, cfg.data.target, cfg.data.normalize)))
    dirs = {"source": cfg.data.source, "target": cfg.data.target}
    preds = {
        d: predict(model, dirs[d], split, batch_size=2 * cfg.train.batch_size, dist=dist,
                   mean=stats[d][0], std=stats[d][1], with_features=plots)
        for d in DOMAINS
    }
    result = {
        "split": split,
        "checkpoint": checkpoint_info,
        "oracle": CRITERIA.get(checkpoint_info.get("criterion"), False),
        **{d: classification_metrics(preds[d]["labels"], preds[d]["prob"]) for d in DOMAINS},
    }
    if not dist.is_main:
        return result
    out = Path(run_dir)
    (out / "eval").mkdir(parents=True, exist_ok=True)
    (out / "eval" / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    if plots:
        tag = f"{split}" + (" (oracle selection)" if result["oracle"] else "")
        P.roc_curves({d: (preds[d]["labels"], preds[d]["prob"]) for d in DOMAINS},
                     out / "plots" / f"roc_{split}.png", f"ROC, {tag}")
        P.confusion_matrices({d: result[d] for d in DOMAINS}, out / "plots" / f"confusion_{split}.png",
                             f"confusion, {tag}")
        P.training_curves(read_log(out), out / "plots" / "training_curves.png")
        P.latent_embedding({d: (preds[d]["features"], preds[d]["labels"]) for d in DOMAINS},
                           out / "plots" / f"latent_{split}.png", f"DA features, {tag}", seed=cfg.seed,
                           max_points=1000)
    return result


def eval_arguments(parser) -> None:
    parser.add_argument("--run", required=True, type=Path, help="run directory (holds config.yaml and checkpoints/)")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    parser.add_argument("--checkpoint", default="best", choices=["best", "last"],
                        help="which checkpoint of the run to evaluate")


def eval_main(args) -> int:
    from dmhpc.config import load_config
    from dmhpc.distributed import bootstrap, shutdown
    from dmhpc.train.checkpoint import load_checkpoint
    from dmhpc.train.objective import build_backbone

    config_path = args.run / "config.yaml"
    if not config_path.exists():
        raise DmhpcError(f"{config_path}: no such file (is {args.run} a dmhpc run directory?)")
    cfg = load_config(config_path)
    ckpt = load_checkpoint(args.run / "checkpoints" / f"{args.checkpoint}.pt")
    dist = bootstrap()
    try:
        model = build_backbone(cfg).to(dist.device)
        model.load_state_dict(ckpt["model"])
        info = {"name": args.checkpoint, **{k: ckpt[k] for k in ("epoch", "step") if k in ckpt},
                **ckpt.get("selection", {})}
        result = evaluate_model(model, cfg, dist, split=args.split, run_dir=args.run, checkpoint_info=info)
        if dist.is_main:
            print(format_table({args.run.name: result}))
            print(f"wrote {args.run / 'eval' / 'metrics.json'} and {args.run / 'plots'}/*.png")
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
