"""Evaluation by slice: test rows grouped by a record field or a derived bucket, a metric per group with its count
and interval, so that an average does not hide the inputs a model fails on (evaluate.slices in params.yaml)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from tuneforge.core.metrics import bootstrap_interval

if TYPE_CHECKING:
    from tuneforge.core.params import TaskSpec

MISSING = "(missing)"


def slice_keys(task: TaskSpec, records: list[dict], name: str) -> list[str]:
    """Each record's group under the slice `name`: input_length (thirds of these inputs by word count, so every
    group holds about a third of the rows) or metadata.<field> (the value the raw record carried)."""
    if name == "input_length":
        words = np.array([len(task.output.input_text(r).split()) for r in records])
        if not len(words):
            return []
        low, high = np.quantile(words, [1 / 3, 2 / 3])
        group = np.where(words <= low, 0, np.where(words > high, 2, 1))
        # Each group named by the word counts its rows really have (the cut points fall between whole numbers).
        names = {}
        for g, label in enumerate(("short", "medium", "long")):
            members = words[group == g]
            if len(members):
                names[g] = f"{label} ({members.min()}-{members.max()} words)"
        return [names[g] for g in group]
    field = name.removeprefix("metadata.")
    return [str((r.get("metadata") or {}).get(field, MISSING)) for r in records]


def slice_metrics(task: TaskSpec, records: list[dict], outputs: list[str], names: list[str]) -> dict:
    """{slice: {"groups": {group: {"n", metric, "<metric>_ci"}}, "worst": group}} for the task's primary metric;
    the worst group is the one with the lowest estimate among groups of at least 10 rows (fewer: too noisy to name)."""
    metric = task.primary_metric
    out = {}
    for name in names:
        keys = slice_keys(task, records, name)
        groups = {}
        for group in sorted(set(keys)):
            rows = [i for i, k in enumerate(keys) if k == group]
            interval = bootstrap_interval(task, [records[i] for i in rows], [outputs[i] for i in rows], metric)
            groups[group] = {"n": len(rows), **interval.to_metrics(metric)}
        named = {g: v for g, v in groups.items() if v["n"] >= 10}
        out[name] = {"groups": groups, "worst": min(named, key=lambda g: named[g][metric]) if len(named) > 1 else None}
    return out
