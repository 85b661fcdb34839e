"""Reference vs current traffic with Evidently 0.7, and a retrain verdict a stakeholder can read.

Reference: the test split's inputs with the tuned model's answers (evaluation stage).
Current: data/production/<task>.jsonl, the requests a deployed model received (`tuneforge serve`
appends to it), with its answers and latency where known.

Only descriptors that need no downloaded resources are used (no NLTK corpora), so the report
builds offline.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import pandas as pd
from tqdm import tqdm

from tuneforge.core.kinds import OutputKind

OTHER = "(other)"


def traffic_frame(inputs: list[str], outputs: list[str | None], latencies_ms: list[float | None],
                  tokenizer, spec: OutputKind) -> pd.DataFrame:
    df = pd.DataFrame({"input": pd.Series(inputs, dtype=object)})
    df["input_chars"] = df["input"].str.len()
    df["input_tokens"] = [len(ids) for ids in tokenizer(inputs, add_special_tokens=False)["input_ids"]] if inputs else []
    if inputs and any(o is not None for o in outputs):
        known = [o if o is not None else "" for o in outputs]
        df["output_tokens"] = [len(ids) for ids in tokenizer(known, add_special_tokens=False)["input_ids"]]
        df["output_valid"] = ["invalid" if spec.answer_problem(o) else "valid" for o in known]
        df["prediction"] = [spec.category(o) for o in known]
        df.loc[[o is None for o in outputs], ["output_tokens", "output_valid", "prediction"]] = np.nan
    if any(lat is not None for lat in latencies_ms):
        df["latency_ms"] = pd.array(latencies_ms, dtype="Float64")
    return df


def judged_outputs(requests: list[dict]) -> list[str | None]:
    """Each logged answer, or None where it was cut short: by the client (client_max_tokens, which params' serve
    section may allow) or by the server's time limit (cut_by_time_limit, a slow prompt on a busy machine). Such an
    answer says nothing about the model's validity, only its input is compared."""
    return [None if r.get("client_max_tokens") is not None or r.get("cut_by_time_limit") else r.get("output")
            for r in requests]


def fold_rare(reference: pd.Series, current: pd.Series, keep: int = 8) -> tuple[pd.Series, pd.Series]:
    """Key sets have a long tail; keep the reference's most common ones, fold the rest into "(other)"."""
    common = {v for v, _ in Counter(reference.dropna()).most_common(keep)}
    fold = lambda s: s.where(s.isna() | s.isin(common), OTHER)  # noqa: E731
    return fold(reference), fold(current)


@dataclass
class DriftOutcome:
    snapshot: object | None  # evidently Snapshot (save_html, dict); None when there was too little traffic
    retrain: bool
    reasons: list[str]
    metrics: dict
    drifted_columns: list[str]


# Evidently's type name for ValueDrift in a result's metric config: a test is matched to its column by the metric's
# type and column parameters, never by the display name it shows people.
VALUE_DRIFT = "evidently:metric_v2:ValueDrift"


def drifted_columns(result: dict) -> list[str]:
    """The columns whose ValueDrift test did not pass, from a snapshot's dict()."""
    return [t["metric_config"]["params"]["column"] for t in result["tests"]
            if t["metric_config"]["params"].get("type") == VALUE_DRIFT and t["status"] != "SUCCESS"]


def run_drift(reference: pd.DataFrame, current: pd.DataFrame, spec) -> DriftOutcome:
    """Evidently drift report with tests; the verdict combines the tests with validity and latency rules.

    With fewer than `min_rows` current requests there is no verdict and no Evidently report (snapshot None).
    """
    if len(current) < spec.min_rows:
        reason = f"only {len(current)} current requests (drift.min_rows = {spec.min_rows}): too few to judge"
        return DriftOutcome(None, False, [reason], {"reference_rows": len(reference), "current_rows": len(current),
                                                    "retrain": False}, [])
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import DriftedColumnsCount, MeanValue, ValueDrift
    from evidently.tests import gte, lt

    reference, current = reference.copy(), current.copy()
    if "prediction" in reference and "prediction" in current:
        reference["prediction"], current["prediction"] = fold_rare(reference["prediction"], current["prediction"])
    shared = [c for c in reference.columns if c in current.columns and c != "latency_ms"]
    numeric = [c for c in shared if c in ("input_chars", "input_tokens", "output_tokens")]
    categorical = [c for c in shared if c in ("output_valid", "prediction")]
    # Latency is judged by its own rule below: the reference (offline evaluation) has none to compare with.
    definition = DataDefinition(text_columns=["input"], numerical_columns=numeric, categorical_columns=categorical)
    current_valid = (current["output_valid"] == "valid").astype(float) if "output_valid" in current else None
    reference_valid_rate = float((reference["output_valid"] == "valid").mean()) if "output_valid" in reference else None

    metrics = [DriftedColumnsCount(columns=shared, drift_share=spec.max_drift_share,
                                   share_tests=[lt(spec.max_drift_share)])]
    metrics += [ValueDrift(column=c) for c in shared]
    if current_valid is not None and reference_valid_rate is not None:
        current = current.assign(output_valid_rate=current_valid)
        definition.numerical_columns.append("output_valid_rate")
        metrics.append(MeanValue(column="output_valid_rate", tests=[gte(reference_valid_rate - spec.max_validity_drop)]))
    current_ds = Dataset.from_pandas(current.drop(columns=["latency_ms"], errors="ignore"), data_definition=definition)
    reference_ds = Dataset.from_pandas(reference.assign(output_valid_rate=(reference["output_valid"] == "valid").astype(float))
                                       if "output_valid" in reference else reference, data_definition=definition)
    # One call, no progress hook inside: the bar says what runs and how long it took (text drift dominates).
    with tqdm(total=1, desc=f"Evidently drift report ({len(shared)} columns)", unit="report") as bar:
        snapshot = Report(metrics, include_tests=True).run(current_ds, reference_ds)
        bar.update()

    result = snapshot.dict()
    drifted = drifted_columns(result)
    share = len(drifted) / max(1, len(shared))
    reasons = []
    if share >= spec.max_drift_share:
        reasons.append(f"{len(drifted)} of {len(shared)} columns drifted ({', '.join(drifted)}); "
                       f"drift.max_drift_share = {spec.max_drift_share:.0%}")
    current_valid_rate = float(current_valid.mean()) if current_valid is not None else None
    if current_valid_rate is not None and reference_valid_rate is not None \
            and reference_valid_rate - current_valid_rate > spec.max_validity_drop:
        reasons.append(f"valid answers fell from {reference_valid_rate:.1%} to {current_valid_rate:.1%} "
                       f"(drift.max_validity_drop = {spec.max_validity_drop:.0%})")
    latency_p95 = float(current["latency_ms"].quantile(0.95)) if "latency_ms" in current and current["latency_ms"].notna().any() else None
    if latency_p95 is not None and latency_p95 > spec.max_latency_p95_ms:
        reasons.append(f"p95 latency {latency_p95:.0f} ms exceeds drift.max_latency_p95_ms = {spec.max_latency_p95_ms:.0f}")
    retrain = bool(reasons)
    summary = {
        "reference_rows": len(reference), "current_rows": len(current), "columns_checked": len(shared),
        "drifted_columns": len(drifted), "drift_share": share,
        "reference_valid_rate": reference_valid_rate, "current_valid_rate": current_valid_rate,
        "current_latency_p95_ms": latency_p95, "retrain": retrain,
        "tests_failed": sum(t["status"] != "SUCCESS" for t in result["tests"]), "tests_total": len(result["tests"]),
    }
    return DriftOutcome(snapshot, retrain, reasons, summary, drifted)


def most_shifted(reference: pd.DataFrame, current: pd.DataFrame, n: int = 5) -> pd.DataFrame:
    """Current inputs least like any reference input (TF-IDF character n-grams, nearest cosine)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5), min_df=1).fit(reference["input"])
    similarity = (vectorizer.transform(current["input"]) @ vectorizer.transform(reference["input"]).T).max(axis=1)
    nearest = np.asarray(similarity.todense()).ravel()
    cols = [c for c in ("input", "input_chars", "prediction", "output_valid") if c in current.columns]
    return current.assign(nearest_reference_similarity=nearest).sort_values("nearest_reference_similarity")[
        cols + ["nearest_reference_similarity"]].head(n)
