"""Classification metrics, label-free model-selection validators, and the run's metric log.

Metrics come from scikit-learn on predictions gathered from every rank, so a number never
depends on how the batch was split across GPUs.
"""

from __future__ import annotations

import contextlib
import math
import threading

import numpy as np

from dmhpc.errors import DmhpcError
from dmhpc.names import LABEL_FREE, MERGER, MERGER_THRESHOLD


def classification_metrics(labels: np.ndarray, prob: np.ndarray) -> dict:
    """Accuracy, precision, recall, F1, ROC AUC, Brier score and confusion matrix.

    `prob` is (n, 2) class probabilities; class 1 (merger) is the positive class.
    What is undefined is NaN, never 0: ROC AUC with one class present, precision without a merger
    predicted, recall without a merger in the labels, F1 without either (with mergers predicted
    and none in the labels it is 0: 2TP / (2TP + FP + FN)). Where a probability is not finite (an
    fp16 step that overflowed) every metric is NaN and there is no confusion matrix: a NaN counted
    as a non-merger would pass for a prediction.
    """
    from sklearn import metrics as skm

    labels = np.asarray(labels).astype(np.int64)
    p1 = np.asarray(prob, dtype=np.float64).reshape(-1, 2)[:, MERGER]
    if not len(labels):  # (scikit-learn's accuracy raised ValueError on an empty split)
        return {"n": 0, **dict.fromkeys(("accuracy", "precision", "recall", "f1", "roc_auc", "brier"), math.nan)}
    if not np.isfinite(p1).all():
        return {"n": int(len(labels)), "nonfinite": int((~np.isfinite(p1)).sum()),
                **dict.fromkeys(("accuracy", "precision", "recall", "f1", "roc_auc", "brier"), math.nan)}
    pred = (p1 >= MERGER_THRESHOLD).astype(np.int64)
    both = len(np.unique(labels)) == 2
    return {
        "n": int(len(labels)),
        "accuracy": float(skm.accuracy_score(labels, pred)),
        "precision": float(skm.precision_score(labels, pred, zero_division=np.nan)),
        "recall": float(skm.recall_score(labels, pred, zero_division=np.nan)),
        "f1": float(skm.f1_score(labels, pred, zero_division=np.nan)),
        "roc_auc": float(skm.roc_auc_score(labels, merger_score(prob))) if both else math.nan,
        "brier": float(skm.brier_score_loss(labels, p1)) if len(labels) else math.nan,
        "confusion": skm.confusion_matrix(labels, pred, labels=[0, 1]).tolist(),
    }


def merger_score(prob: np.ndarray) -> np.ndarray:
    """What ranks images as mergers for a ROC curve: log p(merger) - log p(non-merger), the logit
    margin, exact from a float64 softmax out to a margin of about 745. p(merger) itself rounds to
    exactly 1.0 beyond a margin of about 37, where confident mergers and confident false mergers
    tie and the ROC AUC loses their order (0.75 for 1.0 on margins 50, 45 | 40, -3)."""
    p = np.asarray(prob, dtype=np.float64)
    with np.errstate(divide="ignore"):
        score = np.log(p[:, MERGER]) - np.log(p[:, 1 - MERGER])
    # A probability of exactly 0 (beyond 745, or 104 in a float32 softmax) ranks first or last, tied
    # with its kind: finite, as scikit-learn's ROC takes scores.
    big = np.finfo(np.float64).max
    return np.clip(score, -big, big)


def prediction_metrics(prob: np.ndarray) -> dict:
    """What predictions say without labels: the predicted merger fraction, the mean merger
    probability, the mean prediction entropy (nats) and the IM validator."""
    p = np.asarray(prob, dtype=np.float64)
    if not len(p):
        return {"n": 0}
    q = np.clip(p, 1e-12, 1.0)
    return {
        "n": int(len(p)),
        # A NaN prediction is no non-merger: NaN, as the means below.
        "merger_fraction": float((p[:, MERGER] >= MERGER_THRESHOLD).mean()) if np.isfinite(p).all() else math.nan,
        "mean_p_merger": float(p[:, MERGER].mean()),
        "mean_entropy": float(-(q * np.log(q)).sum(axis=1).mean()),
        "im": information_maximization(p),
    }


def domain_metrics(labels: np.ndarray, prob: np.ndarray) -> dict:
    """Label-free metrics of the predictions, and the classification metrics when the domain has
    labels (an unlabelled data set stores -1 for every label)."""
    labels = np.asarray(labels)
    out = prediction_metrics(prob)
    if len(labels) and (labels >= 0).all():
        out.update(classification_metrics(labels, prob))
    elif len(labels):  # an empty split says nothing about labels
        out["labelled"] = False
    return out


def information_maximization(prob: np.ndarray) -> float:
    """IM validator: entropy of the mean prediction minus the mean per-sample entropy (higher is better).

    Rewards confident predictions that still use every class (Shi & Sha 2012; Musgrave et al. 2022).
    """
    p = np.clip(np.asarray(prob, dtype=np.float64), 1e-12, 1.0)
    mean = p.mean(axis=0)
    return float(-(mean * np.log(mean)).sum() + (p * np.log(p)).sum(axis=1).mean())


SND_MIN_ROWS = 2  # each sample's neighbourhood is the other samples: one alone has none (NaN)
SND_BLOCK = 1 << 22  # similarities held at once: 32 MiB of float64 per array
# Rows SND is computed on, at most: its cost grows with their square (13 ns a pair here: 5 s at
# 20,000 rows, 2 h at 400,000, while the other ranks wait in a collective that times out in 30 min).
SND_MAX_ROWS = 20_000


def soft_neighborhood_density(prob: np.ndarray, temperature: float = 0.05) -> float:
    """SND validator (Saito et al. 2021): entropy of the soft neighbourhood of each target sample.

    Higher is better: predictions of nearby samples agree (dense clusters in prediction space). With
    two classes collapsed or uncertain predictions are the densest (every row "merger": the highest
    score): docs/results.md found it anti-correlated with target accuracy.
    Computed a block of rows at a time: the whole (n, n) similarity matrix, and the arrays made
    from it, took 1.4 GB at 6,000 validation rows and would take 16 GB at 20,000, on every rank.
    Beyond SND_MAX_ROWS rows, on that many drawn with a fixed seed (the same rows at every
    evaluation of a split). The score grows with the rows' count (an entropy over more neighbours):
    it compares checkpoints on one split, as selection does, not splits of other sizes.
    """
    p = np.asarray(prob, dtype=np.float64)
    if len(p) > SND_MAX_ROWS:
        p = p[np.sort(np.random.default_rng(0).choice(len(p), size=SND_MAX_ROWS, replace=False))]
    p = p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)
    n = len(p)
    step = max(1, SND_BLOCK // max(n, 1))
    entropies = np.empty(n)
    for a in range(0, n, step):
        sim = p[a:a + step] @ p.T
        sim[np.arange(len(sim)), np.arange(a, a + len(sim))] = -np.inf  # not its own neighbour
        logits = sim / temperature
        logits -= logits.max(axis=1, keepdims=True)
        w = np.exp(logits)
        w /= w.sum(axis=1, keepdims=True)
        entropies[a:a + step] = -(w * np.log(np.clip(w, 1e-12, 1.0))).sum(axis=1)
    return float(entropies.mean())


def batch_nuclear_norm(prob: np.ndarray) -> float:
    """BNM validator (Cui et al. 2020; Musgrave et al. 2022): the nuclear norm of the (n, classes)
    prediction matrix over sqrt(n) (its largest value, sqrt(min(n, classes)), for confident predictions
    spread evenly over the classes). Higher is better: confident and diverse at once."""
    p = np.asarray(prob, dtype=np.float64)
    return float(np.linalg.norm(p, "nuc") / math.sqrt(max(len(p), 1)))


def negative_entropy(prob: np.ndarray) -> float:
    """ENT validator: minus the mean prediction entropy (nats). Higher is better: confident target
    predictions; blind to a collapse onto one class, which IM and BNM penalise."""
    q = np.clip(np.asarray(prob, dtype=np.float64), 1e-12, 1.0)
    return float((q * np.log(q)).sum(axis=1).mean())


# Dimensions the DEV domain classifier sees: with a few hundred validation rows a domain at most,
# 16 keep its weights near 1 for two identical domains (mean 1.02-1.23 over 300-800 rows, 2592-d
# features, three draws each); 32 let it overfit (1.1-1.6).
DEV_COMPONENTS = 16
# Validation rows per domain DEV is computed on, at most (a fixed draw, evaluate.feature_sample):
# every row's 2592 features were gathered onto every rank, 10 GB a domain at a million rows, and
# fitted on in float64.
DEV_MAX_ROWS = 20_000


def deep_embedded_validation(source: dict, target: dict, seed: int = 0) -> float:
    """DEV validator (You et al. 2019), negated so that higher is better.

    A domain classifier on the features gives density ratios w = p(target|x)/p(source|x) for
    source validation samples; the target risk is estimated as the w-weighted source validation
    loss, the weights normalized to mean 1 (self-normalized importance weighting). The paper's
    control variate assumes that mean is 1: where the classifier separates the domains it is ~1e-4,
    and the estimate, a regression slope over near-constant weights, left the range of a loss (a
    negative risk, -32 in docs/results.md's tuning) and selected the checkpoint whose features
    separate the domains most. Normalized, the control variate adds nothing, and the estimate is a
    weighted mean of the source losses, within their range. The classifier sees the
    features' DEV_COMPONENTS leading principal components and scores rows it was not fitted on (two
    folds, each scored by the other's fit; the paper fits it on training features): fitted on the
    2592-d features and scored on the same rows, it separated two identical domains perfectly, and
    its weights were no density ratios (their mean 0.003, not 1).
    `source` and `target` hold `features`, and source also `labels` and `prob`; where the features
    are of some rows only, `feature_positions` says which (`evaluate.predict`).
    """
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.preprocessing import StandardScaler

    fs, ft = np.asarray(source["features"], np.float64), np.asarray(target["features"], np.float64)
    x = StandardScaler().fit_transform(np.concatenate([fs, ft]))
    components = min(DEV_COMPONENTS, x.shape[1], len(x) - 1)
    if components < x.shape[1]:
        x = PCA(components, random_state=seed).fit_transform(x)
    domain = np.r_[np.zeros(len(fs)), np.ones(len(ft))]
    p_target = np.empty(len(x))
    if min(len(fs), len(ft)) >= 2:
        for fit, score in StratifiedKFold(2, shuffle=True, random_state=seed).split(x, domain):
            clf = LogisticRegression(max_iter=1000, random_state=seed).fit(x[fit], domain[fit])
            p_target[score] = clf.predict_proba(x[score])[:, 1]
    else:  # a row of a domain alone: no fold could hold it and be scored
        p_target[:] = LogisticRegression(max_iter=1000, random_state=seed).fit(x, domain).predict_proba(x)[:, 1]
    p = np.clip(p_target[: len(fs)], 1e-6, 1 - 1e-6)
    w = p / (1 - p)
    rows = source.get("feature_positions", np.arange(len(fs)))
    prob = np.clip(np.asarray(source["prob"], np.float64)[rows], 1e-12, 1.0)
    loss = -np.log(prob[np.arange(len(fs)), np.asarray(source["labels"])[rows]])
    return -float(np.sum(w * loss) / np.sum(w))




def selection_score(criterion: str, val: dict) -> float:
    """The model-selection value (higher is better) from both domains' validation predictions.

    `val[domain]` holds `labels` and `prob` (and `features` for DEV). Only the oracle reads the
    target labels.
    """
    s, t = val["source"], val["target"]
    if criterion == "source-val-acc":
        return classification_metrics(s["labels"], s["prob"])["accuracy"]
    if criterion == "oracle-target-acc":
        return classification_metrics(t["labels"], t["prob"])["accuracy"]
    if criterion == "im":
        return information_maximization(t["prob"])
    if criterion == "snd":
        return soft_neighborhood_density(t["prob"])
    if criterion == "dev":
        return deep_embedded_validation(s, t)
    if criterion == "bnm":
        return batch_nuclear_norm(t["prob"])
    if criterion == "entropy":
        return negative_entropy(t["prob"])
    raise ValueError(f"unknown selection criterion {criterion!r}")


def validator_scores(val: dict) -> dict[str, float]:
    """Every label-free criterion's score on the same validation predictions (features included)."""
    return {name: selection_score(name, val) for name in LABEL_FREE}


class MetricLog:
    """The run's log (RUN/metrics.jsonl, through `RunDir`) mirrored to TensorBoard; rank 0 only.

    `purge_step`: the first step whose earlier events TensorBoard hides. A resumed run gives the
    step after the one it resumes from, as the log itself is cut back there, so no curve shows a
    step twice and none loses the resumed step.
    """

    def __init__(self, run, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.run = run
        with self._writing():
            self.tb = SummaryWriter(str(run.tensorboard_dir), purge_step=purge_step)
        _quiet_event_writer()

    def write(self, record: dict, step: int) -> None:
        self.run.append_log(record, default=_json_default)
        # A step record's scalars under step/: its loss terms (that step's) and an epoch record's
        # (the epoch's means) shared loss/* tags, two values at each epoch's last step on one curve.
        prefix = "step/" if record.get("kind") == "step" else ""
        with self._writing():
            for key, value in _flatten(record):
                if key == "step":  # the x axis itself
                    continue
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    self.tb.add_scalar(prefix + key, value, step)
            self.tb.flush()

    @contextlib.contextmanager
    def _writing(self):
        """TensorBoard writes its events in a thread; its error (a full disk) comes out of the next
        call here, as the one line naming the folder."""
        try:
            yield
        except OSError as exc:
            raise DmhpcError(f"{self.run.tensorboard_dir}: cannot write: {exc.strerror or exc}") from None

    def hparams(self, cfg, checkpoint: dict, result: dict) -> None:
        """The run's configuration and outcome in TensorBoard's HParams view, to compare a grid's runs."""
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        from dmhpc.config import config_to_dict

        flat = {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                for k, v in _flatten(config_to_dict(cfg)) if not k.startswith(("run", "train/signals"))}
        outcome = {"hparam/selection_score": checkpoint.get("score", math.nan)}
        for domain in ("source", "target"):
            for metric in ("accuracy", "roc_auc"):
                if metric in result.get(domain, {}):
                    outcome[f"hparam/test_{domain}_{metric}"] = result[domain][metric]
        # add_hparams would open a second writer in a subdirectory; write its three summaries into this one.
        with self._writing():
            writer = self.tb._get_file_writer()
            for summary in hparams_summary(flat, outcome):
                writer.add_summary(summary)
            for key, value in outcome.items():
                self.tb.add_scalar(key, value)
            self.tb.flush()

    def close(self) -> None:
        with self._writing():
            self.tb.close()

    def __enter__(self) -> "MetricLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _quiet_event_writer() -> None:
    """TensorBoard's writer thread dies on its error, which the next flush raises again in the
    trainer's thread and MetricLog reports in one line; the thread's own traceback is not printed.
    Other threads' errors go to the hook in place before."""
    previous = threading.excepthook
    if getattr(previous, "quiets_event_writer", False):
        return

    def hook(args) -> None:
        if type(args.thread).__name__ != "_AsyncWriterThread":
            previous(args)

    hook.quiets_event_writer = True
    threading.excepthook = hook


def _flatten(record: dict, prefix: str = ""):
    for key, value in record.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            yield from _flatten(value, name)
        else:
            yield name, value


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
