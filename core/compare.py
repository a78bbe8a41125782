"""How two runs differ and why: the model, or the images it was measured on; and how far labellers
and reviewers agree.

A change of accuracy between two runs has two sources. Some images were evaluated by both runs with
the same label: there only the model can have changed, and the paired right->wrong and wrong->right
counts (with McNemar's exact test) say whether it did. Other images entered or left the evaluation,
or changed label: excluding a misclassified image raises accuracy without the model getting any
better. The accuracy change is split exactly into those two parts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.stats import binomtest
from sklearn.metrics import cohen_kappa_score
from sqlite_utils import Database

from core.metrics import Estimate, RunPredictions, load_run_predictions, split_metrics
from core.workspace import Workspace

# Below this, a paired change is unlikely to be chance (two-sided McNemar exact test).
SIGNIFICANCE_LEVEL = 0.05
CHANGE_KINDS = ("added", "removed", "excluded", "relabelled")


@dataclass
class RunComparison:
    run_a: int
    run_b: int
    split: str
    accuracy_a: Estimate
    accuracy_b: Estimate
    accuracy_delta: float
    macro_f1_delta: float
    # Per class present in both runs: each metric in run a, in run b, and b - a.
    per_class: pd.DataFrame
    # (a) Images evaluated by both runs with the same label.
    paired: list[int]
    right_to_wrong: list[int]  # image ids right in run a, wrong in run b
    wrong_to_right: list[int]
    mcnemar_p_value: float
    # (b) Images evaluated by one run only, or with another label: image_id, change (one of
    # CHANGE_KINDS), label_a, label_b, right_a, right_b (None where the run did not evaluate it).
    changed: pd.DataFrame
    # accuracy_delta == model_delta + composition_delta: what the paired images' changed outcomes
    # moved, and what the change of images moved.
    model_delta: float
    composition_delta: float

    def count(self, change: str) -> int:
        return int((self.changed["change"] == change).sum())

    def summary(self) -> str:
        """Which part moved the figure, in words."""
        counts = ", ".join(f"{self.count(kind)} {kind}" for kind in CHANGE_KINDS)
        significance = (
            "unlikely to be chance" if self.mcnemar_p_value < SIGNIFICANCE_LEVEL else "within what chance gives"
        )
        text = (
            f"Accuracy on {self.split} {self.accuracy_delta:+.1%} (run #{self.run_a} "
            f"{self.accuracy_a.value:.1%} of {self.accuracy_a.n}, run #{self.run_b} "
            f"{self.accuracy_b.value:.1%} of {self.accuracy_b.n}). "
            f"From the model: {self.model_delta:+.1%} — on the {len(self.paired)} images both runs evaluated with "
            f"the same label, {len(self.wrong_to_right)} went wrong to right and {len(self.right_to_wrong)} right "
            f"to wrong (McNemar p = {self.mcnemar_p_value:.2g}, {significance}). "
            f"From changed images: {self.composition_delta:+.1%} ({counts})."
        )
        if abs(self.composition_delta) > abs(self.model_delta):
            text += " Most of the change comes from which images were measured, not from a better or worse model."
        return text


def mcnemar_p_value(right_to_wrong: int, wrong_to_right: int) -> float:
    """Two-sided exact McNemar test: how likely so uneven a split of the discordant pairs is by chance."""
    discordant = right_to_wrong + wrong_to_right
    if discordant == 0:
        return 1.0
    return float(binomtest(min(right_to_wrong, wrong_to_right), discordant, 0.5).pvalue)


def _outcomes(predictions: RunPredictions, split: str) -> pd.DataFrame:
    data = predictions.split(split).labelled()
    classes = np.array(data.classes, dtype=object)
    return pd.DataFrame(
        {"label": classes[data.labels], "right": data.predicted == data.labels}, index=data.image_ids.astype(int)
    )


def compare_predictions(db: Database, a: RunPredictions, b: RunPredictions, *, split: str = "val") -> RunComparison:
    """How run b differs from run a on one split; each image is judged against its label in that run.

    `db` tells why an image left the evaluation: excluded since (its current flag), or removed
    (unlabelled, deleted or moved to another split).
    """
    metrics_a, metrics_b = split_metrics(a, split), split_metrics(b, split)
    per_class = metrics_a.per_class.merge(metrics_b.per_class, on="class", suffixes=("_a", "_b"))
    for metric in ("precision", "recall", "f1", "support"):
        per_class[f"{metric}_delta"] = per_class[f"{metric}_b"] - per_class[f"{metric}_a"]

    outcome_a, outcome_b = _outcomes(a, split), _outcomes(b, split)
    joined = outcome_a.merge(
        outcome_b, how="outer", left_index=True, right_index=True, suffixes=("_a", "_b")
    ).sort_index()
    in_a, in_b = joined["label_a"].notna(), joined["label_b"].notna()
    same = in_a & in_b & (joined["label_a"] == joined["label_b"])
    paired = joined[same]
    right_to_wrong = [int(i) for i in paired.index[paired["right_a"].astype(bool) & ~paired["right_b"].astype(bool)]]
    wrong_to_right = [int(i) for i in paired.index[~paired["right_a"].astype(bool) & paired["right_b"].astype(bool)]]

    changed = joined[~same].copy()
    excluded = _excluded(db, changed.index[~changed["label_b"].notna()].tolist())
    changed["change"] = np.select(
        [changed["label_a"].notna() & changed["label_b"].notna(), changed["label_a"].isna(),
         changed.index.isin(list(excluded))],
        ["relabelled", "added", "excluded"],
        default="removed",
    )
    changed = changed.rename_axis("image_id").reset_index()[
        ["image_id", "change", "label_a", "label_b", "right_a", "right_b"]
    ]
    changed = changed.astype({"right_a": object, "right_b": object}).where(changed.notna(), None)

    n_b = len(outcome_b)
    model_delta = (len(wrong_to_right) - len(right_to_wrong)) / n_b
    accuracy_delta = metrics_b.accuracy - metrics_a.accuracy
    return RunComparison(
        run_a=a.run_id,
        run_b=b.run_id,
        split=split,
        accuracy_a=metrics_a.estimates["accuracy"],
        accuracy_b=metrics_b.estimates["accuracy"],
        accuracy_delta=accuracy_delta,
        macro_f1_delta=metrics_b.macro["f1"] - metrics_a.macro["f1"],
        per_class=per_class,
        paired=[int(i) for i in paired.index],
        right_to_wrong=right_to_wrong,
        wrong_to_right=wrong_to_right,
        mcnemar_p_value=mcnemar_p_value(len(right_to_wrong), len(wrong_to_right)),
        changed=changed,
        model_delta=model_delta,
        composition_delta=accuracy_delta - model_delta,
    )


def compare_runs(ws: Workspace, db: Database, run_a: int, run_b: int, *, split: str = "val") -> RunComparison:
    """`compare_predictions` of two stored runs."""
    return compare_predictions(
        db, load_run_predictions(ws, db, run_a), load_run_predictions(ws, db, run_b), split=split
    )


def _excluded(db: Database, image_ids: list[int]) -> set[int]:
    found = set()
    for start in range(0, len(image_ids), 500):
        chunk = [int(i) for i in image_ids[start : start + 500]]
        rows = db.query(
            f"SELECT id FROM images WHERE excluded = 1 AND id IN ({','.join('?' * len(chunk))})", chunk
        )
        found.update(row["id"] for row in rows)
    return found


# ---------------------------------------------------------------- labellers and reviewers


# Each reviewer's latest confirm or relabel of each image, beside the label the last other person
# gave it: the labeller the reviewer agreed or disagreed with.
_REVIEWER_AND_LABELLER = """
SELECT r.image_id, r.reviewer, rc.name AS reviewer_label, e.who AS labeller, lc.name AS labeller_label
FROM reviews r
JOIN label_events e ON e.id = (
    SELECT e2.id FROM label_events e2 WHERE e2.image_id = r.image_id AND e2.who != r.reviewer
    AND e2.new_class_id IS NOT NULL ORDER BY e2.id DESC LIMIT 1)
JOIN classes rc ON rc.id = r.class_id
JOIN classes lc ON lc.id = e.new_class_id
WHERE r.id = (
    SELECT max(r2.id) FROM reviews r2 WHERE r2.image_id = r.image_id AND r2.reviewer = r.reviewer
    AND r2.decision IN ('confirm', 'relabel'))
ORDER BY r.image_id, r.reviewer
"""


@dataclass
class Agreement:
    """How often reviewers keep the labellers' labels, beyond what chance would give (Cohen's kappa)."""

    pairs: pd.DataFrame  # image_id, reviewer, reviewer_label, labeller, labeller_label
    overall: dict  # n, agreement, kappa
    per_class: pd.DataFrame  # class, n, agreement, kappa (the class against the rest)
    per_person: pd.DataFrame  # person, role (labeller / reviewer), n, agreement, kappa


def _kappa(first: pd.Series, second: pd.Series) -> dict:
    n = len(first)
    agreement = float((first.to_numpy() == second.to_numpy()).mean()) if n else float("nan")
    # With a single category on both sides there is no chance agreement to correct for.
    defined = n > 0 and len(set(first) | set(second)) > 1
    kappa = float(cohen_kappa_score(first, second)) if defined else float("nan")
    return {"n": n, "agreement": agreement, "kappa": kappa}


def reviewer_agreement(db: Database) -> Agreement:
    """Agreement between each reviewed image's labeller and its reviewers, overall, per class and per person."""
    pairs = pd.DataFrame(
        list(db.query(_REVIEWER_AND_LABELLER)),
        columns=["image_id", "reviewer", "reviewer_label", "labeller", "labeller_label"],
    )
    classes = sorted(set(pairs["labeller_label"]) | set(pairs["reviewer_label"]))
    per_class = pd.DataFrame(
        [
            {"class": name, **_kappa(pairs["labeller_label"] == name, pairs["reviewer_label"] == name)}
            for name in classes
        ],
        columns=["class", "n", "agreement", "kappa"],
    )
    # A class's own n: the reviewed images either side put in it.
    per_class["n"] = [
        int(((pairs["labeller_label"] == name) | (pairs["reviewer_label"] == name)).sum()) for name in classes
    ]
    per_person = pd.DataFrame(
        [
            {"person": person, "role": role, **_kappa(rows["labeller_label"], rows["reviewer_label"])}
            for role, column in (("labeller", "labeller"), ("reviewer", "reviewer"))
            for person, rows in pairs.groupby(column, sort=True)
        ],
        columns=["person", "role", "n", "agreement", "kappa"],
    )
    return Agreement(pairs, _kappa(pairs["labeller_label"], pairs["reviewer_label"]), per_class, per_person)
