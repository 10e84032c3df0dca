"""Evaluation: predictions over a split from every rank, the metrics of both domains, and `dmhpc eval`
(one result file and plots per checkpoint, split and data set)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from dmhpc import plots as P
from dmhpc.data.batches import domain_stats
from dmhpc.data.check import check_dataset, twins_trained_on
from dmhpc.data.loaders import eval_batches, eval_rows
from dmhpc.data.shards import fingerprint, load_manifest, split_rows
from dmhpc.distributed import bootstrap, broadcast_buffers, gather, on_main, shutdown
from dmhpc.errors import DmhpcError
from dmhpc.files import fsync_directory, hold_lock, same_place, staged_write, temporary_path
from dmhpc.run import EVAL_OWNER, LOCK, RunDir, check_shape, evaluation_tag, result_text, statistics
from dmhpc.names import DOMAINS
from dmhpc.progress import progress_bar
from dmhpc.train.checkpoint import (checkpoint_info, chosen_with_target_labels, load_checkpoint_sha256,
                                   load_weights)
from dmhpc.train.metrics import domain_metrics, merger_score
from dmhpc.train.objective import NUM_CLASSES, build_backbone, term_labels


def feature_sample(n: int, rows: int) -> np.ndarray:
    """Positions in a split of `n` rows whose features `predict` keeps, `rows` of them (all when
    `rows` >= n), sorted: the same on every rank and at every call (a fixed seed)."""
    if rows >= n:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng(0).choice(n, size=rows, replace=False)).astype(np.int64)


def predict(model, directory, split: str, *, batch_size: int, dist, mean, std,
            feature_rows: int = 0, expected: str | None = None) -> dict:
    """Run `model` over one split of one data set, sharded over ranks; every rank gets all predictions.

    Returns numpy arrays `labels`, `prob` (n, classes) and `index` in split order, and with
    `feature_rows` the features of that many rows (`feature_sample`; every row: the split's length
    or more) as `features`, with their positions in the split, `feature_positions`. A figure draws
    a thousand points: gathering every row's 2592 floats onto every rank was gigabytes per rank
    from a million test images on. The model is put in eval mode and left there. `expected`: the
    fingerprint the data set had when the run started; another (the folder prepared again
    meanwhile) is refused.
    """
    model.eval()
    broadcast_buffers(model)  # the model rank 0 saves, on every rank's share

    def share() -> dict:
        labels, probs, indices, feats = [], [], [], []
        manifest = load_manifest(directory)
        if expected is not None and fingerprint(manifest) != expected:
            # Its split would now hold images the run trained on: selection and test scores inflated.
            raise DmhpcError(f"{directory}: prepared again since this run started (its manifest changed): its "
                             f"splits are no longer those the run trained with; put the data set the run started "
                             f"with back, or prepare the new one into another folder")
        first, last = eval_rows(manifest, split, dist.rank, dist.world_size, batch_size)
        start, stop = split_rows(manifest, split)
        wanted = feature_sample(stop - start, feature_rows) + start if feature_rows else np.zeros(0, np.int64)
        wanted = wanted[(wanted >= first) & (wanted < last)]  # this rank's
        at = first
        with torch.no_grad(), progress_bar(last - first, f"{split} {Path(directory).name}", unit="img",
                                           show=dist.is_main) as bar:
            for x, y, idx in eval_batches(directory, split, batch_size=batch_size, rank=dist.rank,
                                          world_size=dist.world_size, device=dist.device, mean=mean, std=std,
                                          manifest=manifest):
                bar.update(len(y))
                f, logits = model(x)
                # float64: float32 rounds p(non-merger) to 0 beyond a logit margin of ~104, where the
                # ROC's score (metrics.merger_score) loses the order of confident predictions (float64: ~745).
                probs.append(torch.softmax(logits.double(), dim=1).cpu().numpy())
                labels.append(y.cpu().numpy())
                indices.append(idx.cpu().numpy() if hasattr(idx, "cpu") else np.asarray(idx))
                keep = wanted[(wanted >= at) & (wanted < at + len(y))] - at
                if len(keep):
                    feats.append(f[torch.as_tensor(keep, device=f.device)].float().cpu().numpy())
                at += len(y)
        local = {"labels": _cat(labels, np.int64, (0,)), "prob": _cat(probs, np.float64, (0, 2)),
                 "index": _cat(indices, np.int64, (0,))}
        if feature_rows:
            local["features"] = _cat(feats, np.float32, (0, 0))
            local["feature_positions"] = wanted - start
        return local

    # Gathered with its error: a shard only one rank reads failing was that rank's one line and the
    # others' gloo traceback; now every rank's. Rank order = split order (contiguous parts).
    parts = gather(share)
    out = {key: np.concatenate([p[key] for p in parts if len(p[key])] or [parts[0][key]]) for key in parts[0]}
    bad = ~np.isfinite(out["prob"]).all(axis=1)  # the same on every rank: all stop together
    if bad.any():
        raise DmhpcError(f"{directory}: {split} split: non-finite class probabilities for {int(bad.sum())} image(s), "
                         f"the first at row {int(out['index'][bad][0])}: a pixel too large for float32 once "
                         f"normalized, or an overflow in the network")
    return out


def _cat(chunks, dtype, empty_shape):
    return np.concatenate(chunks).astype(dtype, copy=False) if chunks else np.zeros(empty_shape, dtype)


def evaluate_run(model, cfg, dist, run: RunDir, *, checkpoint: dict, split: str, stats: dict,
                 data: dict | None = None, data_name: str | None = None, plots: bool = True,
                 final: bool = False, expected: dict | None = None) -> dict:
    """Metrics of both domains on `split`, written by rank 0 to the run's own file for (checkpoint,
    split, data set), with plots named alike, never over another evaluation's.

    `data` maps "source" and "target" to data-set directories (default: the run's own; then
    `data_name` None); `stats[domain]` is the (mean, std) each is normalized with. `checkpoint` says
    which checkpoint the model holds (name, epoch, step, selection criterion and score) and is copied
    into the result, so a reader can tell oracle-selected results apart. A domain without labels
    gets the label-free metrics only. `final`: the trainer's test of its selected checkpoint, which
    marks the run finished (`RunDir.finished`). `expected`: each domain's fingerprint at the run's
    start, as for `predict`.
    """
    dirs = data or {"source": cfg.data.source, "target": cfg.data.target}
    preds = {
        d: predict(model, dirs[d], split, batch_size=2 * cfg.train.batch_size, dist=dist,
                   mean=stats[d][0], std=stats[d][1], feature_rows=P.LATENT_POINTS if plots else 0,
                   expected=(expected or {}).get(d))
        for d in DOMAINS
    }
    result = {
        "split": split,
        "checkpoint": checkpoint,
        "oracle": chosen_with_target_labels(checkpoint, cfg),
        # A target oracle (source and target one data set): trained on the target's labels, whatever
        # chose its checkpoint; its result read alone said "oracle": false.
        "trained_on_target": cfg.data.trains_on_target(),
        "data": {d: os.path.abspath(dirs[d]) for d in DOMAINS},  # absolute: the same from any working folder
        "final": final,
        # What each domain was normalized with: under per-domain normalization another data set's own
        # statistics (see `evaluate`), which predict and an exported model use only when asked.
        "normalization": {d: {"mean": [float(v) for v in stats[d][0]], "std": [float(v) for v in stats[d][1]]}
                          for d in DOMAINS},
        **{d: domain_metrics(preds[d]["labels"], preds[d]["prob"]) for d in DOMAINS},
    }
    # Rank 0's writes, their error every rank's (a full disk at the result ended rank 0 alone; the
    # others exited 0, or on NCCL waited out the watchdog at the barrier before leaving).
    def write() -> None:
        # Everything that can fail comes before anything is put in place: the log is read, every figure
        # drawn and the result written to temporary files first, then all are renamed into place, the
        # result last. A failure (a damaged metrics.jsonl, a figure that cannot be drawn, a full disk at
        # the result) used to come after something was in place, and left a new result beside old
        # figures or new figures beside an old result.
        drawn: dict[Path, Path] = {}  # final path -> its temporary file

        def draw(name: str) -> Path:
            drawn[run.plot_path(name)] = temporary_path(run.plot_path(name))
            return drawn[run.plot_path(name)]

        try:
            if plots:
                # the training's figure: other data sets leave it
                log = run.read_log() if data is None else None
                tag = evaluation_tag(checkpoint["name"], split, data_name)
                on = f" on {data_name}" if data_name else ""
                title = (f"{run.label}: {checkpoint['name']} checkpoint (epoch {checkpoint.get('epoch')}), {split} "
                         f"split of {Path(dirs['source']).name} / {Path(dirs['target']).name}{on}"
                         + (" (trained on the target's labels)" if result["trained_on_target"]
                            else " (oracle selection)" if result["oracle"] else ""))
                # A ROC curve needs both classes, a confusion matrix labels: unlabelled data sets get neither.
                if any(len(np.unique(preds[d]["labels"])) == 2 for d in DOMAINS):
                    P.roc_curves({d: (preds[d]["labels"], merger_score(preds[d]["prob"])) for d in DOMAINS},
                                 draw(f"roc_{tag}"), f"ROC, {title}")
                if any("confusion" in result[d] for d in DOMAINS):
                    P.confusion_matrices({d: result[d] for d in DOMAINS}, draw(f"confusion_{tag}"),
                                         f"confusion, {title}")
                if log is not None:  # titled with the run's own data
                    P.training_curves(log, draw("training_curves"),
                                      f"{run.label}: training; source {Path(cfg.data.source).name}, target "
                                      f"{Path(cfg.data.target).name}; selection by {cfg.select.criterion}",
                                      labels=term_labels(cfg.loss))
                P.latent_embedding({d: (preds[d]["features"], preds[d]["labels"][preds[d]["feature_positions"]])
                                    for d in DOMAINS},
                                   draw(f"latent_{tag}"), f"DA features, {title}", seed=cfg.seed)
            result_path = run.result_path(checkpoint["name"], split, data_name)
            drawn[result_path] = staged_write(result_path, result_text(result))
            for path, tmp in drawn.items():
                os.replace(tmp, path)
            # the renames, once per folder, made to survive a crash
            for folder in {path.parent for path in drawn}:
                fsync_directory(folder)
        finally:
            for tmp in drawn.values():
                tmp.unlink(missing_ok=True)  # those not put in place

    on_main(write)
    return result


def eval_arguments(parser) -> None:
    # --run-dir too: under torchrun, --run is an ambiguous abbreviation of torchrun's own --run-path.
    parser.add_argument("--run", "--run-dir", dest="run", required=True, type=Path,
                        help="run directory (holds config.yaml and checkpoints/; write --run-dir under torchrun)")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"], help="default: test")
    parser.add_argument("--checkpoint", default="best", choices=["best", "last"],
                        help="which checkpoint of the run to evaluate (default: best)")
    parser.add_argument("--target", type=Path, metavar="DIR",
                        help="evaluate on this prepared data set as the target domain (labelled or not) "
                             "instead of the run's, normalized with its own training statistics under the "
                             "run's per-domain normalization; default: the run's own data")
    parser.add_argument("--source", type=Path, metavar="DIR",
                        help="with --target: this data set as the source domain (default: the run's source)")


def evaluate(run_dir, *, checkpoint: str = "best", split: str = "test", source=None, target=None) -> dict:
    """Evaluate a run's checkpoint on a split, as `dmhpc eval` does: writes the result file and
    plots (rank 0), prints the table, returns the result. `target` (and optionally `source`):
    another prepared data set instead of the run's own."""
    run = RunDir(run_dir)
    run.config()  # a run directory at all: said before the ranks meet (read again under the lock)
    source, target = (Path(source) if source is not None else None), (Path(target) if target is not None else None)
    if source is not None and target is None:
        raise DmhpcError("--source needs --target (evaluating on the run's own target with another source "
                         "is not a data set of its own)")
    data_name = None
    if target is not None:
        data_name = "+".join(p.name or p.resolve().name for p in ((source,) if source else ()) + (target,))
    dist = bootstrap()
    held = []
    try:
        # The run directory's own lock, the one its trainer holds, taken by the rank that writes, for
        # the whole evaluation: without it two evaluations (of data sets of one folder name) both
        # passed the check below and one result was lost, an evaluation beside the trainer replaced
        # its final best_test.json with one of an older best.pt, and a trainer starting up removed
        # the evaluation's temporary files as orphans of killed writes.
        on_main(lambda: held.append(hold_lock(
            run.path / LOCK, f"run.dir {run.path}: in use by another dmhpc trainer or eval ({{holder}}); wait for "
                             f"it to end", "dmhpc eval or trainer on this run directory", owner=EVAL_OWNER)))
        on_main(run.remove_orphans)  # a killed evaluation's figures and results: only a trainer's start removed them
        # The best checkpoint's test on the run's own data, once the run finished: the trainer's result again.
        final = target is None and (checkpoint, split) == ("best", "test") and run.finished
        ckpt, sha256 = load_checkpoint_sha256(run.checkpoint(checkpoint))
        # The configuration read under the lock: one read before it may be of a run that an
        # --overwrite replaced meanwhile, whose checkpoint was then scored with its normalization.
        cfg = run.check_trained_with(ckpt, run.checkpoint(checkpoint))
        data = None if target is None else {"source": source or Path(cfg.data.source), "target": target}
        dirs = data or {"source": cfg.data.source, "target": cfg.data.target}
        shape, prints = _check_data(run, cfg, dirs, run.checkpoint_data(ckpt, run.checkpoint(checkpoint)),
                                    split=split, dist=dist, names={"source": "--source" if source else "data.source",
                                                                   "target": "--target" if target else "data.target"})
        if data is not None:  # (after the data's checks: a run's relative source not found here is said so)
            _check_other_data(run.read_result(checkpoint, split, data_name), data,
                              run.result_path(checkpoint, split, data_name))
        model = build_backbone(cfg, shape[0]).to(dist.device)
        load_weights(model, ckpt, run.checkpoint(checkpoint))
        # The checkpoint's record and its SHA-256: what export matches a result by.
        info = {**checkpoint_info(checkpoint, ckpt, run.checkpoint(checkpoint)), "sha256": sha256}
        if final:
            _check_final(run, info)
        # Normalization as the run trained: per domain, each data set with its own statistics; a
        # survey given as --target is a domain of its own (predict's --normalize own, not its default).
        # Under data.normalize: source, every domain with the statistics of the source the checkpoint
        # trained on: those of a --source given here made the target's result depend on it.
        if cfg.data.normalize == "source":
            trained = statistics(run.trained_data(ckpt, run.checkpoint(checkpoint))["source"])
            stats = dict.fromkeys(DOMAINS, trained)
        else:
            stats = dict(zip(DOMAINS, domain_stats(dirs["source"], dirs["target"], cfg.data.normalize)))
        # The data sets as checked above (their checksums took a while): one prepared again since is refused.
        result = evaluate_run(model, cfg, dist, run, checkpoint=info, split=split, stats=stats, data=data,
                              data_name=data_name, final=final, expected=prints)
        if dist.is_main:
            label = f"{run.label} ({checkpoint}, {split}{', ' + data_name if data_name else ''})"
            print(format_table({label: result}))
            print(f"wrote {run.result_path(checkpoint, split, data_name)} and "
                  f"{run.plot_path(f'*_{evaluation_tag(checkpoint, split, data_name)}')}")
    finally:
        for handle in held:
            handle.close()
        shutdown()
    return result


def _check_final(run: RunDir, info: dict) -> None:
    """Refuse to write the run's final result again of a best.pt of another moment of the run than
    the one the trainer's final test measured (a backup put back, a copy taken while it trained): its
    metrics replaced the run's result, still marked final. The moment (epoch and step), as the
    trainer's check of its best.pt: a checkpoint written again as it was (an older dmhpc's, converted)
    is the same one."""
    tested = (run.read_result("best", "test") or {}).get("checkpoint") or {}
    moment = lambda c: (c.get("epoch"), c.get("step"))  # noqa: E731
    if None not in moment(tested) and moment(tested) != moment(info):
        raise DmhpcError(f"{run.checkpoint('best')}: of epoch {info.get('epoch')} (step {info.get('step')}), not the "
                         f"checkpoint the run's final test measured (epoch {tested['epoch']}, step "
                         f"{tested['step']}): a best.pt of another moment of the run? put the run's own back")


def _check_data(run: RunDir, cfg, dirs: dict, recorded: dict, split: str, dist,
                names: dict) -> tuple[list, dict]:
    """The image shape the run trained on, and each data set's fingerprint as checked; refuses
    images its network cannot take, the run's own data sets prepared again since the checkpoint
    trained on them (`recorded`: its data sets by role; their test split may hold rows it trained
    on, and its result file would say otherwise), an empty `split`, more classes than the model
    tells apart, and data sets whose shards fail the run's data.verify check.
    A run of older dmhpc, which records no shape or fingerprint, is checked against its source data
    set as it is now. `names[role]`: how the user named the data set (data.target, --target); the
    run's own (data.*) are checked for being prepared again, also the source beside a --target."""
    manifests = {}
    for role in DOMAINS:
        try:
            manifests[role] = load_manifest(dirs[role])
        except DmhpcError as exc:
            raise (run.data_error(names[role], dirs[role], exc) if names[role].startswith("data.")
                   else DmhpcError(f"{names[role]}: {exc}")) from None
    trained = recorded.get("source", {}).get("shape") or load_manifest(cfg.data.source)["shape"]
    for role, manifest in manifests.items():
        check_shape(dirs[role], manifest["shape"], trained)
        if names[role].startswith("data."):
            other = "--target" if names["target"].startswith("data.") else "--source beside the --target"
            run.refuse_prepared_again(role, dirs[role], fingerprint(manifest),
                                      f"evaluate it as other data with {other}", recorded)
        start, stop = manifest["rows"][split]
        if stop == start:  # failed drawing the features with a ValueError traceback, after the result was written
            raise DmhpcError(f"{names[role]} {dirs[role]}: the {split} split is empty; nothing to evaluate "
                             f"(choose another --split, or prepare it with --fractions giving {split} a share)")
        if manifest["num_classes"] > NUM_CLASSES:  # the metrics failed with an sklearn traceback
            raise DmhpcError(f"{names[role]} {dirs[role]}: {manifest['num_classes']} classes; the models here tell "
                             f"{NUM_CLASSES} apart (merger or not)")
    # Other data of the run's own objects, split otherwise (its noisy copy prepared with another
    # seed): the trainer refuses such a target at start, and here it was evaluated, its test images'
    # twins among those the run trained on. The split evaluated only, against the source as the run
    # trained on it (moved away, or prepared again since: said, not compared).
    others = [role for role in DOMAINS if not names[role].startswith("data.") and split != "train"
              and not same_place(dirs[role], cfg.data.source)]
    trained_on = None
    if others:
        try:
            trained_on = load_manifest(cfg.data.source)
            was = recorded.get("source", {}).get("fingerprint")
            if was and fingerprint(trained_on) != was:
                raise DmhpcError("prepared again since the run trained on it")
        except DmhpcError as exc:
            trained_on = None
            if dist.is_main:
                said = ", ".join(f"{names[role]} {dirs[role]}" for role in others)
                print(f"dmhpc eval: note: {said}: not checked for the run's own objects in another split: "
                      f"data.source {cfg.data.source}: {exc}", flush=True)
    for role in others if trained_on is not None else ():
        problem = on_main(lambda: twins_trained_on(Path(cfg.data.source), trained_on, Path(dirs[role]),
                                                   manifests[role], adapts=False, held=(split, split)))
        if problem is not None:
            raise DmhpcError(f"{names[role]} {dirs[role]}: {problem} (the run trained on data.source "
                             f"{cfg.data.source})")
    # The shards as the trainer checks them, at the run's data.verify level: a corrupted shard was
    # evaluated from its damaged pixels into a new result file.
    for role in DOMAINS:
        if role == "target" and same_place(dirs["target"], dirs["source"]):
            break  # one data set in both roles: checked once
        check_dataset(f"{names[role]} {dirs[role]}", dirs[role], manifests[role],
                      checksums=cfg.data.verify == "checksums", rank=dist.rank, world_size=dist.world_size,
                      gather=gather)
    return trained, {role: fingerprint(manifest) for role, manifest in manifests.items()}


def _check_other_data(old: dict | None, data: dict, path: Path) -> None:
    """Refuse to replace an evaluation on other data sets whose folders have the same names as
    these (the file is named after the folders): one evaluation never overwrites another."""
    if old is None:
        return
    before = {d: Path(old.get("data", {}).get(d, "")).resolve() for d in DOMAINS}
    if before != {d: Path(data[d]).resolve() for d in DOMAINS}:
        raise DmhpcError(f"{path}: holds the evaluation on {old.get('data', {}).get('target')} (source "
                         f"{old.get('data', {}).get('source')}), data sets of the same folder names; give these "
                         f"under other names (a symbolic link named otherwise will do)")


def eval_main(args) -> int:
    evaluate(args.run, checkpoint=args.checkpoint, split=args.split, source=args.source, target=args.target)
    return 0


def format_table(results: dict) -> str:
    """A Markdown table of source and target accuracy and AUC, one row per run (an unlabelled
    domain shows its predicted merger fraction instead)."""
    rows = ["| run | source acc | source AUC | target acc | target AUC |", "|---|---|---|---|---|"]

    def cells(m: dict) -> str:
        if m.get("labelled", True) is False:
            return f"unlabelled: {m['merger_fraction']:.3f} predicted mergers | -"
        return f"{m['accuracy']:.3f} | {m['roc_auc']:.3f}"

    for name, r in results.items():
        mark = " (oracle)" if r.get("oracle") or r.get("trained_on_target") else ""
        rows.append(f"| {name}{mark} | {cells(r['source'])} | {cells(r['target'])} |")
    return "\n".join(rows)
