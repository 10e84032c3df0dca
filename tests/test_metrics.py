"""Metrics and label-free validators (dmhpc/train/metrics.py) against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dmhpc.names import LABEL_FREE
from dmhpc.train.metrics import (batch_nuclear_norm, classification_metrics, deep_embedded_validation,
                                 information_maximization, negative_entropy, selection_score,
                                 soft_neighborhood_density, validator_scores)


def test_classification_metrics_of_an_empty_split_are_nan_not_an_error():
    """scikit-learn's accuracy raised ValueError ("Found empty input array") where the docstring
    promises NaN for what is undefined; selection_score calls it directly."""
    m = classification_metrics(np.zeros(0, int), np.zeros((0, 2)))
    assert m["n"] == 0 and all(math.isnan(m[k]) for k in ("accuracy", "precision", "recall", "f1", "roc_auc",
                                                            "brier"))


def test_classification_metrics_by_hand():
    labels = np.array([1, 1, 0, 0, 1])
    p1 = np.array([0.9, 0.4, 0.2, 0.6, 0.7])
    m = classification_metrics(labels, np.stack([1 - p1, p1], 1))
    # predictions 1 0 0 1 1: TP 2, FN 1, TN 1, FP 1
    assert m["confusion"] == [[1, 1], [1, 2]]
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["brier"] == pytest.approx(np.mean((p1 - labels) ** 2))
    assert m["roc_auc"] == pytest.approx(5 / 6)  # 5 of 6 positive/negative pairs ordered right
    assert math.isnan(classification_metrics(np.ones(3, int), np.full((3, 2), 0.5))["roc_auc"])


def test_what_is_undefined_is_nan_not_zero():
    """A test split of one class gave a perfect classifier F1 0.0 (averaged into the summary as a
    real zero); a NaN prediction counted as a non-merger in the predicted merger fraction; an empty
    split was called unlabelled."""
    from dmhpc.train.metrics import domain_metrics, prediction_metrics

    perfect_on_non_mergers = classification_metrics(np.zeros(4, int), np.array([[0.9, 0.1]] * 4))
    assert perfect_on_non_mergers["accuracy"] == 1.0
    assert all(math.isnan(perfect_on_non_mergers[k]) for k in ("precision", "recall", "f1", "roc_auc"))
    p = np.array([[0.2, 0.8]] * 5 + [[0.9, 0.1]] * 2 + [[np.nan, np.nan]])
    assert math.isnan(prediction_metrics(p)["merger_fraction"])
    assert prediction_metrics(p[:-1])["merger_fraction"] == pytest.approx(5 / 7)
    assert "labelled" not in domain_metrics(np.zeros(0, int), np.zeros((0, 2)))
    assert domain_metrics(np.full(2, -1), p[:2])["labelled"] is False
    # A NaN probability (an fp16 step that overflowed) in a labelled domain: scikit-learn's
    # "Input contains NaN" traceback ended the epoch's summary; now every metric is NaN.
    labelled = domain_metrics(np.array([1] * 5 + [0] * 3), p)
    assert labelled["nonfinite"] == 1 and "confusion" not in labelled
    assert all(math.isnan(labelled[k]) for k in ("accuracy", "precision", "recall", "f1", "roc_auc", "brier"))
    # Mergers predicted, none in the labels: F1 is 0 (2TP / (2TP + FP + FN)), recall undefined.
    none = classification_metrics(np.zeros(3, int), np.array([[0.9, 0.1], [0.3, 0.7], [0.8, 0.2]]))
    assert none["f1"] == 0.0 and none["precision"] == 0.0 and math.isnan(none["recall"])


@pytest.mark.parametrize("low, high", [(18.0, 30.0), (40.0, 600.0)])
def test_confident_predictions_keep_their_order_for_the_auc(tmp_path, low, high):
    """Softmax in float32 rounds p to exactly 1.0 beyond a logit margin of ~17: every confident
    prediction tied, and the ROC AUC of an over-confident model came out points low. In float64 p
    rounds to 1.0 beyond ~37: the AUC ranks by the logit margin the probabilities keep."""
    import torch

    from dmhpc.data.shards import write_dataset
    from dmhpc.distributed import DistInfo
    from dmhpc.train.evaluate import predict

    n = 40
    labels = np.arange(n) % 2
    margin = np.linspace(low, high, n)  # logit1 - logit0, all above float32's limit
    margin[labels == 0] -= 0.15  # each negative just below its positive neighbour: the order is right
    images = margin.reshape(n, 1, 1, 1).repeat(2, axis=2).repeat(2, axis=3).astype(np.float32)
    write_dataset(images, labels, None, tmp_path / "confident", shard_size=n, seed=0, fractions=(0.5, 0.0, 0.5))

    class Margin(torch.nn.Module):  # features and logits (0, margin): the margin is the image's pixel
        def forward(self, x):
            m = x.flatten(1)[:, :1].double()
            return m, torch.cat([torch.zeros_like(m), m], dim=1)

    out = predict(Margin(), tmp_path / "confident", "test", batch_size=8,
                  dist=DistInfo(0, 0, 1, torch.device("cpu"), None), mean=[0.0], std=[1.0])
    from sklearn.metrics import roc_auc_score

    truth = roc_auc_score(out["labels"], out["index"].astype(float) * 0 + margin[out["index"]])
    assert out["prob"].dtype == np.float64 and (out["prob"][:, 0] > 0.0).all()
    assert classification_metrics(out["labels"], out["prob"])["roc_auc"] == pytest.approx(truth, abs=1e-12)


def test_a_probability_of_exactly_zero_ranks_first_or_last():
    """Beyond a margin of ~104 a float32 softmax (the trainer's train metrics) gives p = 0 exactly:
    the logit margin is then infinite, which scikit-learn's ROC refused, ending the run."""
    prob = np.array([[0.0, 1.0], [1e-30, 1.0], [0.4, 0.6], [1.0, 0.0], [1.0, 1e-30]], dtype=np.float32)
    labels = np.array([1, 1, 0, 0, 1])
    assert classification_metrics(labels, prob)["roc_auc"] == pytest.approx(5 / 6)  # only -69 below a non-merger


def test_information_maximization_rewards_confident_balanced_predictions():
    confident_balanced = np.array([[0.99, 0.01], [0.01, 0.99]] * 10)
    uncertain = np.full((20, 2), 0.5)
    collapsed = np.array([[0.99, 0.01]] * 20)
    assert information_maximization(confident_balanced) > information_maximization(uncertain)
    assert information_maximization(confident_balanced) > information_maximization(collapsed)
    assert information_maximization(confident_balanced) == pytest.approx(math.log(2) - 0.056, abs=1e-3)


def test_soft_neighborhood_density_prefers_clustered_predictions():
    rng = np.random.default_rng(0)
    clustered = np.repeat(np.array([[0.95, 0.05], [0.05, 0.95]]), 30, axis=0)
    spread = rng.dirichlet([1, 1], size=60)
    assert soft_neighborhood_density(clustered) > soft_neighborhood_density(spread)


def _snd_whole(prob: np.ndarray, temperature: float = 0.05) -> float:
    """SND from the whole similarity matrix at once, as written in the paper."""
    p = prob / np.linalg.norm(prob, axis=1, keepdims=True)
    sim = p @ p.T
    np.fill_diagonal(sim, -np.inf)
    w = np.exp(sim / temperature - (sim / temperature).max(axis=1, keepdims=True))
    w /= w.sum(axis=1, keepdims=True)
    return float(-(w * np.log(np.clip(w, 1e-12, 1.0))).sum(axis=1).mean())


def test_soft_neighborhood_density_in_blocks_of_rows_is_the_whole_matrix_s(monkeypatch):
    """The whole (n, n) similarity matrix and the arrays made from it took 1.4 GB at 6,000 validation
    rows, on every rank: blocks of rows give the same score in bounded memory."""
    import tracemalloc

    from dmhpc.train import metrics

    prob = np.random.default_rng(1).dirichlet([1, 1], size=61)
    monkeypatch.setattr(metrics, "SND_BLOCK", 7 * 61)  # blocks of 7 rows, the last one short
    assert soft_neighborhood_density(prob) == pytest.approx(_snd_whole(prob), rel=1e-12)
    monkeypatch.undo()
    big = np.random.default_rng(2).dirichlet([1, 1], size=4000)
    tracemalloc.start()
    try:
        score = soft_neighborhood_density(big)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 300e6, peak  # the whole matrix: 128 MB per array, over 600 MB at its peak
    assert score == pytest.approx(_snd_whole(big), rel=1e-12)


def test_soft_neighborhood_density_of_many_rows_is_that_of_a_fixed_draw_of_them(monkeypatch):
    """Its cost grows with the square of the rows, on rank 0 while the others wait in a collective:
    at ~400,000 target validation rows, past the 30-minute timeout. Beyond SND_MAX_ROWS it is the
    score of that many rows drawn with a fixed seed, the same at every evaluation."""
    from dmhpc.train import metrics

    prob = np.random.default_rng(4).dirichlet([1, 1], size=3000)
    monkeypatch.setattr(metrics, "SND_MAX_ROWS", 1000)
    drawn = np.sort(np.random.default_rng(0).choice(3000, size=1000, replace=False))
    assert soft_neighborhood_density(prob) == pytest.approx(_snd_whole(prob[drawn]), rel=1e-12)
    assert soft_neighborhood_density(prob) == soft_neighborhood_density(prob.copy())
    assert soft_neighborhood_density(prob[:1000]) == pytest.approx(_snd_whole(prob[:1000]), rel=1e-12)  # (all)


def test_deep_embedded_validation_weights_source_samples_like_the_target():
    """DEV estimates the target risk: it grows when the source samples that look like target are wrong."""
    rng = np.random.default_rng(0)
    fs = rng.normal(0, 1, (200, 4))
    ft = rng.normal(0, 1, (200, 4)) + np.array([1.5, 0, 0, 0])
    labels = (fs[:, 1] > 0).astype(int)
    right = np.where(labels[:, None] == np.arange(2), 0.9, 0.1)
    wrong_near_target, wrong_far_from_target = right.copy(), right.copy()
    near, far = fs[:, 0] > 0.75, fs[:, 0] < -0.75  # (as many rows on each side)
    wrong_near_target[near] = right[near][:, ::-1]
    wrong_far_from_target[far] = right[far][:, ::-1]
    good = deep_embedded_validation({"features": fs, "labels": labels, "prob": right}, {"features": ft})
    bad = deep_embedded_validation({"features": fs, "labels": labels, "prob": wrong_near_target}, {"features": ft})
    harmless = deep_embedded_validation({"features": fs, "labels": labels, "prob": wrong_far_from_target},
                                        {"features": ft})
    assert math.isfinite(good) and good > bad
    # The weights' direction: as many errors where the target is not weigh less (with the density
    # ratio inverted, or the domains swapped, the two orders swapped too, and every other test passed).
    assert harmless > bad, (harmless, bad)


def test_deep_embedded_validation_stays_a_risk_where_the_domains_separate():
    """The paper's control variate assumes the weights' mean is 1; where the domain classifier
    separates the domains it is ~1e-4, and the estimate left the range of a loss: a model whose
    features separate the domains scored a negative risk and was selected over one with a third of
    its source loss on overlapping domains."""
    rng = np.random.default_rng(0)
    n, m, d = 400, 300, 64
    labels = rng.integers(0, 2, n)

    def prob(right):
        p = np.where(labels[:, None] == np.arange(2), right, 1 - right)
        return np.clip(p + rng.normal(0, 0.1, (n, 1)) * [[1, -1]], 0.02, 0.98)

    def source_loss(p):
        return -np.log(p[np.arange(n), labels])

    overlap, good = rng.normal(size=(n, d)), prob(0.75)
    a = deep_embedded_validation({"features": overlap, "labels": labels, "prob": good},
                                 {"features": rng.normal(size=(m, d)) + 0.3})
    for shift in (1.0, 100.0, 1000.0):
        bad = prob(0.45)
        b = deep_embedded_validation({"features": rng.normal(size=(n, d)) * 1e-3, "labels": labels, "prob": bad},
                                     {"features": rng.normal(size=(m, d)) * 1e-3 + shift})
        assert source_loss(bad).min() <= -b <= source_loss(bad).max(), (shift, b)
        assert a > b, (shift, a, b)


def test_deep_embedded_validation_on_a_draw_of_rows_reads_their_labels_and_predictions():
    """The trainer takes at most DEV_MAX_ROWS rows' features per domain (every row's were gathered
    onto every rank: 10 GB a domain at a million rows); the source loss is of the same rows."""
    rng = np.random.default_rng(2)
    fs, ft = rng.normal(size=(500, 4)), rng.normal(size=(300, 4)) + 1
    labels, prob = rng.integers(0, 2, 500), rng.dirichlet([1, 1], 500)
    drawn = np.sort(rng.choice(500, 120, replace=False))
    on_draw = deep_embedded_validation({"features": fs[drawn], "labels": labels, "prob": prob,
                                        "feature_positions": drawn}, {"features": ft})
    alone = deep_embedded_validation({"features": fs[drawn], "labels": labels[drawn], "prob": prob[drawn]},
                                     {"features": ft})
    assert math.isfinite(on_draw) and on_draw == alone


def test_deep_embedded_validation_weights_are_density_ratios_in_many_dimensions():
    """Fitted and scored on the same rows, the domain classifier separated 2592-d features of two
    identical domains perfectly: the weights averaged 0.003, not 1, and DEV was an arbitrary
    re-weighting. Scored on rows it was not fitted on, they are density ratios again."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    rng = np.random.default_rng(1)
    fs, ft = rng.normal(size=(300, 2592)), rng.normal(size=(300, 2592))  # no shift: w should be ~1
    labels = rng.integers(0, 2, 300)
    prob = rng.dirichlet([1, 1], 300)
    seen = []
    real_fit = LogisticRegression.fit

    def fit(self, x, y, *a, **k):
        seen.append(x.shape)
        return real_fit(self, x, y, *a, **k)

    LogisticRegression.fit = fit
    try:
        dev = deep_embedded_validation({"features": fs, "labels": labels, "prob": prob}, {"features": ft})
    finally:
        LogisticRegression.fit = real_fit
    # two folds of half the rows each, never all of them, on the 16 leading principal components
    # the docs name (another count scored other weights, without a word)
    assert seen == [(300, 16), (300, 16)]
    loss = -np.log(prob[np.arange(300), labels]).mean()
    assert dev == pytest.approx(-loss, rel=0.1), (dev, -loss)


def test_selection_uses_target_labels_only_for_the_oracle():
    s = {"labels": np.array([0, 1]), "prob": np.array([[0.9, 0.1], [0.2, 0.8]])}
    t = {"labels": np.array([1, 1]), "prob": np.array([[0.9, 0.1], [0.9, 0.1]])}
    assert selection_score("source-val-acc", {"source": s, "target": t}) == 1.0
    assert selection_score("oracle-target-acc", {"source": s, "target": t}) == 0.0
    t_relabelled = dict(t, labels=np.array([0, 0]))
    for criterion in ("im", "snd", "bnm", "entropy"):
        assert selection_score(criterion, {"source": s, "target": t}) == \
            selection_score(criterion, {"source": s, "target": t_relabelled})


def test_every_label_free_validator_is_scored_and_none_reads_target_labels():
    rng = np.random.default_rng(1)
    s = {"labels": np.arange(40) % 2, "prob": rng.dirichlet([1, 1], 40), "features": rng.normal(size=(40, 3))}
    t = {"labels": np.arange(40) % 2, "prob": rng.dirichlet([1, 1], 40), "features": rng.normal(size=(40, 3))}
    scores = validator_scores({"source": s, "target": t})
    assert set(scores) == set(LABEL_FREE) == {"source-val-acc", "im", "snd", "dev", "bnm", "entropy"}
    flipped = validator_scores({"source": s, "target": dict(t, labels=1 - t["labels"])})
    assert scores == flipped


def test_batch_nuclear_norm_and_entropy_by_hand():
    confident_balanced = np.array([[1.0, 0.0], [0.0, 1.0]] * 8)
    collapsed = np.array([[1.0, 0.0]] * 16)
    uncertain = np.full((16, 2), 0.5)
    # singular values sqrt(8), sqrt(8) -> 2 sqrt(8) / sqrt(16) = sqrt(2); one of sqrt(16) -> 1; one of sqrt(8) -> 1/sqrt(2)
    assert batch_nuclear_norm(confident_balanced) == pytest.approx(math.sqrt(2))
    assert batch_nuclear_norm(collapsed) == pytest.approx(1.0)
    assert batch_nuclear_norm(uncertain) == pytest.approx(1 / math.sqrt(2))
    assert negative_entropy(uncertain) == pytest.approx(-math.log(2))
    assert negative_entropy(collapsed) == pytest.approx(0.0, abs=1e-9)


def test_the_train_metrics_rank_confident_predictions_as_the_evaluation_does():
    """The epoch's train probabilities were float32: past a logit margin of ~17 every merger
    probability was exactly 1, and a perfect ranking scored a ROC AUC of 0.5 (the evaluation's,
    in float64, 1.0)."""
    import torch

    from dmhpc.train.meter import EpochMeter

    margins = torch.tensor([20.0, 21.0, 22.0, 23.0, 17.0, 17.5, 18.0, 18.5], dtype=torch.float64)
    labels = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0])
    logits = torch.stack([torch.zeros(8, dtype=torch.float64), margins], dim=1).float()
    meter = EpochMeter(torch.device("cpu"))
    meter.add(1, {"total": torch.tensor(0.1)}, {"logits": torch.cat([logits, logits])}, labels, labels)
    record = meter.summary(None)
    assert record["source"]["train"]["roc_auc"] == 1.0, record["source"]["train"]


def test_each_criterion_scores_the_domain_it_is_of():
    """Scored on the other domain's predictions (im of the source, DEV of source against source, bnm
    as the entropy) a criterion still passed every test: they only checked that target labels
    were not read, with domains whose scores agree."""
    rng = np.random.default_rng(3)
    s = {"labels": np.arange(60) % 2, "prob": rng.dirichlet([6, 1], 60), "features": rng.normal(size=(60, 3))}
    t = {"labels": np.arange(50) % 2, "prob": rng.dirichlet([1, 1], 50), "features": rng.normal(size=(50, 3)) + 1}
    val = {"source": s, "target": t}
    expected = {
        "source-val-acc": classification_metrics(s["labels"], s["prob"])["accuracy"],
        "oracle-target-acc": classification_metrics(t["labels"], t["prob"])["accuracy"],
        "im": information_maximization(t["prob"]), "snd": soft_neighborhood_density(t["prob"]),
        "dev": deep_embedded_validation(s, t), "bnm": batch_nuclear_norm(t["prob"]),
        "entropy": negative_entropy(t["prob"]),
    }
    for criterion, value in expected.items():
        assert selection_score(criterion, val) == value, criterion
    # ... and the other domain's (or the other function's) would differ: these would catch a swap.
    assert information_maximization(s["prob"]) != expected["im"]
    assert deep_embedded_validation(s, s) != expected["dev"] and negative_entropy(t["prob"]) != expected["bnm"]


def test_prediction_metrics_by_hand():
    from dmhpc.train.metrics import MERGER_THRESHOLD, prediction_metrics

    p1 = np.array([0.9, MERGER_THRESHOLD, 0.2, 0.3])  # the threshold itself is a merger, as predict's column
    m = prediction_metrics(np.stack([1 - p1, p1], 1))
    assert m["merger_fraction"] == 0.5 and m["mean_p_merger"] == pytest.approx(p1.mean())
    entropies = -(p1 * np.log(p1) + (1 - p1) * np.log(1 - p1))
    assert m["mean_entropy"] == pytest.approx(entropies.mean()) and m["mean_entropy"] > 0
    labels = np.array([1, 1, 0, 0])
    assert classification_metrics(labels, np.stack([1 - p1, p1], 1))["accuracy"] == 1.0


def test_the_epoch_record_keeps_the_domains_and_the_discriminators_sides_apart():
    """The tests fed both domains the same logits: source and target swapped in the record, or the
    discriminator's right and wrong inverted, went unseen."""
    import torch

    from dmhpc.train.meter import EpochMeter

    labels = torch.tensor([1, 0, 1, 0])
    right = torch.tensor([[-5.0, 5.0], [5.0, -5.0], [-5.0, 5.0], [5.0, -5.0]])
    # The discriminator says source with a positive logit: 4 of 4 source rows, 3 of 4 target rows right.
    domain = torch.tensor([3.0, 2.0, 1.0, 4.0, -1.0, -2.0, 5.0, -3.0])
    meter = EpochMeter(torch.device("cpu"))
    meter.add(1, {"total": torch.tensor(0.1)}, {"logits": torch.cat([right, -right]), "domain_logits": domain},
              labels, labels)
    record = meter.summary(None)
    assert record["source"]["train"]["accuracy"] == 1.0 and record["target"]["train"]["accuracy"] == 0.0
    assert record["discriminator_accuracy"] == 7 / 8


def test_a_non_finite_loss_names_the_terms_of_its_first_bad_step_only():
    import torch

    from dmhpc.errors import DmhpcError
    from dmhpc.train.meter import EpochMeter

    class Weights:  # the training state's part check_finite reads: its weights are finite
        def nonfinite_tensors(self):
            return []

    nan, one = torch.tensor(math.nan), torch.tensor(1.0)
    labels = torch.tensor([0, 1])
    meter = EpochMeter(torch.device("cpu"))
    meter.add(1, {"mmd": nan, "classifier": one, "total": nan}, {"logits": torch.zeros(4, 2)}, labels, labels)
    meter.add(2, {"mmd": nan, "classifier": nan, "total": nan}, {"logits": torch.zeros(4, 2)}, labels, labels)
    with pytest.raises(DmhpcError, match=r"^step 1: loss terms mmd, total not finite \(NaN or Inf\); training "
                                         r"stopped at step 2"):
        meter.check_finite(Weights(), None, 2)


def test_the_confusion_matrix_has_true_labels_as_rows_and_both_classes_on_a_one_class_split():
    """The by-hand case had as many false positives as false negatives: a matrix transposed (rows
    the predictions) passed, and so did one of a test split of non-mergers only, which came out
    1x1 ([[n]]) for the confusion figure and the result file."""
    labels = np.array([1, 1, 1, 0])
    p1 = np.array([0.9, 0.8, 0.3, 0.2])  # TP 2, FN 1, TN 1, FP 0
    m = classification_metrics(labels, np.stack([1 - p1, p1], 1))
    assert m["confusion"] == [[1, 0], [1, 2]]  # [[TN, FP], [FN, TP]]
    non_mergers = classification_metrics(np.zeros(4, int), np.array([[0.9, 0.1]] * 4))  # one class, rightly
    assert non_mergers["confusion"] == [[4, 0], [0, 0]]
    mergers = classification_metrics(np.ones(3, int), np.array([[0.2, 0.8]] * 3))
    assert mergers["confusion"] == [[0, 0], [0, 3]]


def test_an_empty_split_has_its_count_and_no_nan_metrics():
    """Without its guard an empty split gave NaN means (and numpy's empty-mean warnings) under
    every label-free key, numbers of nothing in the record."""
    from dmhpc.train.metrics import domain_metrics, prediction_metrics

    assert prediction_metrics(np.zeros((0, 2))) == {"n": 0}
    assert domain_metrics(np.zeros(0, int), np.zeros((0, 2))) == {"n": 0}


def test_information_maximization_of_exact_one_hot_predictions_is_finite():
    """A float64 softmax is exactly 0 and 1 past a logit margin of ~745: without the clip, 0 * log 0
    made the IM validator NaN, and selection by IM never kept such a checkpoint."""
    one_hot = np.array([[1.0, 0.0], [0.0, 1.0]] * 8)
    assert information_maximization(one_hot) == pytest.approx(math.log(2))
    assert information_maximization(np.array([[1.0, 0.0]] * 16)) == pytest.approx(0.0, abs=1e-9)


def test_deep_embedded_validation_of_identical_domains_of_unequal_sizes_is_the_source_loss():
    """The density ratio p(target|x)/p(source|x) is scaled by n_source/n_target: with it inverted,
    dropped, or the domain labels swapped, DEV of two identical domains was a multiple of the
    source loss, not the loss. The tests had domains of equal sizes, where each ratio is 1."""
    rng = np.random.default_rng(5)
    for ns, nt in ((200, 2000), (500, 1500)):  # (smaller sets came within 3% of the 5% tolerance)
        fs, ft = rng.normal(size=(ns, 4)), rng.normal(size=(nt, 4))  # one distribution: w should be ~1
        labels, prob = rng.integers(0, 2, ns), rng.dirichlet([1, 1], ns)
        loss = -np.log(prob[np.arange(ns), labels]).mean()
        dev = deep_embedded_validation({"features": fs, "labels": labels, "prob": prob}, {"features": ft})
        assert dev == pytest.approx(-loss, rel=0.05), (ns, nt, dev, -loss)


def test_deep_embedded_validation_does_not_depend_on_the_features_units():
    """The features are standardized before the PCA and the domain classifier: without it, the
    leading components were those of the largest-valued features, and a domain shift in a
    small-valued feature went unseen (DEV 20% off here)."""
    rng = np.random.default_rng(3)
    fs, ft = rng.normal(size=(200, 40)), rng.normal(size=(200, 40))
    ft[:, 0] += 1.5  # the shift, in one of 40 features (DEV keeps 16 components)
    labels, prob = rng.integers(0, 2, 200), rng.dirichlet([1, 1], 200)
    near = fs[:, 0] > 0.5  # the source rows that look like target are wrong
    prob[near] = np.where(labels[near, None] == np.arange(2), 0.1, 0.9)
    scale = 10.0 ** rng.uniform(-3, 3, 40)
    plain = deep_embedded_validation({"features": fs, "labels": labels, "prob": prob}, {"features": ft})
    scaled = deep_embedded_validation({"features": fs * scale, "labels": labels, "prob": prob},
                                      {"features": ft * scale})
    assert math.isfinite(plain) and scaled == pytest.approx(plain, rel=1e-9)


def test_deep_embedded_validation_of_a_one_row_domain_is_a_number():
    """A domain of one validation row fits in no fold of a two-fold split: scikit-learn's
    ValueError, where DEV fits the domain classifier once on every row instead."""
    rng = np.random.default_rng(4)
    source = {"features": rng.normal(size=(30, 4)), "labels": rng.integers(0, 2, 30),
              "prob": rng.dirichlet([1, 1], 30)}
    assert math.isfinite(deep_embedded_validation(source, {"features": rng.normal(size=(1, 4))}))


def test_an_unknown_selection_criterion_is_refused():
    """A misspelt criterion must fail, not score every checkpoint alike (best.pt the first epoch's)."""
    s = {"labels": np.array([0, 1]), "prob": np.array([[0.9, 0.1], [0.2, 0.8]])}
    with pytest.raises(ValueError, match="unknown selection criterion 'accuracy'"):
        selection_score("accuracy", {"source": s, "target": s})


def test_the_discriminator_accuracy_leaves_out_the_steps_fp16_skipped():
    """Under fp16 a step whose loss overflowed is skipped and left out of the epoch's means and
    train metrics; its discriminator outputs (inf or NaN) were still counted, as wrong."""
    import torch

    from dmhpc.train.meter import EpochMeter

    y = torch.tensor([0, 1])
    logits = torch.tensor([[2.0, -2.0], [-2.0, 2.0], [1.0, -1.0], [-1.0, 1.0]])
    right = torch.tensor([3.0, 1.0, -1.0, -2.0])  # source positive, target not: 4 of 4 right
    meter = EpochMeter(torch.device("cpu"), watch_loss=False)
    meter.add(1, {"total": torch.tensor(0.5)}, {"logits": logits, "domain_logits": right}, y, y)
    meter.add(2, {"total": torch.tensor(math.nan)},
              {"logits": torch.full((4, 2), math.nan), "domain_logits": torch.full((4,), math.nan)}, y, y)
    meter.add(3, {"total": torch.tensor(0.25)}, {"logits": logits, "domain_logits": right}, y, y)
    record = meter.summary(None)
    assert record["nonfinite_loss_steps"] == 1 and record["discriminator_accuracy"] == 1.0
    # Every step of an epoch skipped: no accuracy (it was 0.0, a discriminator always wrong).
    meter = EpochMeter(torch.device("cpu"), watch_loss=False)
    for step in (1, 2):
        meter.add(step, {"total": torch.tensor(math.nan)},
                  {"logits": torch.full((4, 2), math.nan), "domain_logits": torch.full((4,), math.nan)}, y, y)
    record = meter.summary(None)
    assert record["nonfinite_loss_steps"] == 2 and math.isnan(record["discriminator_accuracy"])


def test_the_tensorboard_hparams_give_each_domain_its_own_test_metrics(tmp_path):
    """The HParams view compares a grid's runs by their test metrics: only the tags were checked,
    so the target's accuracy showing the source's passed. And a flag (True/False) is no curve."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dmhpc.config import load_config
    from dmhpc.run import RunDir
    from dmhpc.train.metrics import MetricLog
    from tests.conftest import TINY

    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    result = {"source": {"accuracy": 0.875, "roc_auc": 0.9375}, "target": {"accuracy": 0.625, "roc_auc": 0.5625}}
    with MetricLog(run) as log:
        log.write({"kind": "epoch", "step": 3, "final": True, "loss": {"total": 0.25}}, step=3)
        log.hparams(load_config(TINY), {"score": 0.75}, result)
    scalars = {}
    for events in run.tensorboard_dir.glob("events.out.tfevents.*"):
        board = EventAccumulator(str(events))
        board.Reload()
        scalars.update({tag: board.Scalars(tag)[-1].value for tag in board.Tags()["scalars"]})
    assert scalars["loss/total"] == 0.25 and "final" not in scalars
    assert scalars["hparam/selection_score"] == 0.75
    for domain in ("source", "target"):
        for metric in ("accuracy", "roc_auc"):
            assert scalars[f"hparam/test_{domain}_{metric}"] == result[domain][metric], (domain, metric)


def test_a_merger_probability_above_one_half_is_a_merger():
    """Two classes: the merger class is the argmax, p(merger) >= 0.5. A threshold of 0.6 counted a
    p of 0.55 as a non-merger in the accuracy, the merger fraction and the catalog."""
    from dmhpc.train.metrics import prediction_metrics

    p1 = np.array([0.55, 0.45, 0.51, 0.2])
    probs = np.stack([1 - p1, p1], 1)
    assert prediction_metrics(probs)["merger_fraction"] == 0.5
    m = classification_metrics(np.array([1, 0, 1, 0]), probs)
    assert m["accuracy"] == 1.0 and m["confusion"] == [[2, 0], [0, 2]]
