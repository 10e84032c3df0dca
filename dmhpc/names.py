"""Names used across dmhpc, each with one home: models, selection criteria, domains, reported metrics.

Torch-free, so that configuration checks and launchers can read them without importing a model.
"""

from __future__ import annotations

# Every model `model.name` may name; dmhpc/models/registry.py builds exactly these.
MODEL_NAMES = ("deepmerge", "deepmerge2", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152")

# Model-selection criteria, and whether each reads target labels (an oracle, marked as such in
# every output; refused on an unlabelled target).
CRITERIA = {"source-val-acc": False, "im": False, "snd": False, "dev": False, "bnm": False, "entropy": False,
            "oracle-target-acc": True}
# The criteria that read no target label: what a study's validator table compares with the oracle.
LABEL_FREE = tuple(name for name, oracle in CRITERIA.items() if not oracle)

# The two domains of a run, in the order every pair of them is written.
DOMAINS = ("source", "target")

# The schedules of the DANN gradient-reversal coefficient (loss.grl.schedule).
GRL_SCHEDULES = ("dann", "constant")

# The levels of the data sets' start-up check (data.verify, predict --verify): the manifest, split
# lists and each shard's datasets and labels, or that and every shard's SHA-256.
VERIFY_LEVELS = ("checksums", "structure")

# A merger where p(merger) is at least this: accuracy, F1, the predicted merger fraction, a
# catalog's `merger` column, the model card and explain's choice of class all use it.
MERGER_THRESHOLD = 0.5
# The class index of "merger" among the network's outputs (labels: 1 merger, 0 non-merger).
MERGER = 1

# The test metrics leaderboards and study summaries report per domain.
REPORTED_METRICS = ("accuracy", "roc_auc", "f1", "brier")

# The kind of the log record (metrics.jsonl) a diverged run ends with: a tuner tells the sampler
# that the trial's values failed it, where a failed setup (a data path) is no fault of theirs.
DIVERGED = "diverged"
