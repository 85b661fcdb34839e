"""Data audit checks on the prepared splits; the notebook shows them and gates on them."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
from datasketch import MinHash, MinHashLSH

from tuneforge.core.chat import IGNORE, render
from tuneforge.core.kinds import OutputKind
from tuneforge.core.params import AuditSpec
from tuneforge.core.pii import pii_findings
from tuneforge.core.records import normalise

NUM_PERM = 64


def shingles(text: str, k: int = 5) -> set[str]:
    text = normalise(text)
    return {text[i : i + k] for i in range(max(1, len(text) - k + 1))}


def _minhash(text: str) -> MinHash:
    m = MinHash(num_perm=NUM_PERM, seed=1)
    m.update_batch([s.encode() for s in shingles(text)])
    return m


@dataclass
class NearDuplicates:
    within: dict[str, int]  # split -> records with a near twin in the same split
    leaked: dict[str, int]  # split -> validation/test records with a near twin in train
    examples: list[tuple[str, str, str, str]]  # (split a, text a, split b, text b)


def near_duplicates(texts: dict[str, list[str]], threshold: float) -> NearDuplicates:
    """MinHash LSH over character 5-gram shingles of the normalised inputs."""
    lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
    hashes = {}
    for split, items in texts.items():
        for i, text in enumerate(items):
            key = f"{split}/{i}"
            hashes[key] = _minhash(text)
            lsh.insert(key, hashes[key])
    within: Counter[str] = Counter()
    leaked: Counter[str] = Counter()
    examples = []
    for key, mh in hashes.items():
        split, i = key.split("/")
        twins = [t for t in lsh.query(mh) if t != key]
        if any(t.split("/")[0] == split for t in twins):
            within[split] += 1
        train_twins = [t for t in twins if t.startswith("train/")]
        if split != "train" and train_twins:
            leaked[split] += 1
            if len(examples) < 8:
                t_split, t_i = train_twins[0].split("/")
                examples.append((split, texts[split][int(i)], t_split, texts[t_split][int(t_i)]))
    return NearDuplicates(dict(within), dict(leaked), examples)


def exact_leakage(texts: dict[str, list[str]]) -> list[tuple[str, str, str]]:
    """Inputs (normalised) that occur in more than one split: (split a, split b, text)."""
    first_split: dict[str, str] = {}
    found = []
    for split, items in texts.items():
        for text in items:
            key = normalise(text)
            if key in first_split and first_split[key] != split:
                found.append((first_split[key], split, text))
            first_split.setdefault(key, split)
    return found


def token_lengths(tokenizer, records: list[dict], **template_kwargs) -> tuple[np.ndarray, np.ndarray]:
    """(total tokens, trained tokens) per record, with the real chat template (and the output kind's arguments)."""
    rendered = [render(tokenizer, r["messages"], **template_kwargs) for r in records]
    return (np.array([len(r.input_ids) for r in rendered]), np.array([r.trained_tokens for r in rendered]))


def loss_mask_html(tokenizer, messages: list[dict[str, str]], **template_kwargs) -> str:
    """The rendered example with trained tokens highlighted, for the audit report."""
    r = render(tokenizer, messages, **template_kwargs)
    spans = []
    for token_id, label in zip(r.input_ids, r.labels):
        text = tokenizer.decode([token_id]).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        style = "background:#c6f6c6;font-weight:bold" if label != IGNORE else "color:#777"
        spans.append(f'<span style="{style};border-right:1px dotted #ccc">{text}</span>')
    return '<pre style="white-space:pre-wrap;font-size:12px">' + "".join(spans) + "</pre>"


def record_accounting(metrics: dict) -> list[tuple[str, int]]:
    """Where the raw records went, for the report: the first three rows add up to the last."""
    return [("kept (in a split)", metrics["kept_records"]), ("quarantined", metrics["quarantined"]),
            ("exact duplicates removed", metrics["exact_duplicates_removed"]), ("raw records read", metrics["raw_records"])]


def gate(metrics: dict, spec: AuditSpec) -> list[str]:
    """Threshold breaches, each a sentence naming the number and the setting it broke."""
    unaccounted = metrics.get("unaccounted_records", 0)
    checks = [
        (metrics["invalid_fraction"] > spec.max_invalid_fraction,
         f"{metrics['invalid_fraction']:.1%} of raw records were quarantined (audit.max_invalid_fraction = {spec.max_invalid_fraction:.1%})"),
        (metrics["exact_leakage"] > spec.max_exact_leakage,
         f"{metrics['exact_leakage']} inputs appear in two splits (audit.max_exact_leakage = {spec.max_exact_leakage})"),
        (metrics["near_leakage_fraction"] > spec.max_near_leakage_fraction,
         f"{metrics['near_leakage_fraction']:.1%} of validation+test records have a near twin in train (audit.max_near_leakage_fraction = {spec.max_near_leakage_fraction:.1%})"),
        (metrics["over_length_fraction"] > spec.max_over_length_fraction,
         f"{metrics['over_length_fraction']:.1%} of records exceed train.max_seq_len tokens (audit.max_over_length_fraction = {spec.max_over_length_fraction:.1%})"),
        (metrics["pii_fraction"] > spec.max_pii_fraction,
         f"{metrics['pii_fraction']:.1%} of records contain an email, phone or card-like number (audit.max_pii_fraction = {spec.max_pii_fraction:.1%})"),
        (metrics["train_records"] < spec.min_records,
         f"only {metrics['train_records']} training records (audit.min_records = {spec.min_records})"),
        (unaccounted != 0, f"{unaccounted} raw records are neither kept, quarantined nor exact duplicates"),
    ]
    return [message for failed, message in checks if failed]


@dataclass
class AuditResult:
    metrics: dict
    splits: dict[str, list[dict]]
    quarantine: list[dict]
    lengths: dict[str, np.ndarray]
    near: NearDuplicates
    leaks: list[tuple[str, str, str]]
    pii_examples: list[tuple[str, dict]]
    balance: dict[str, Counter]


def run_audit(splits: dict[str, list[dict]], quarantine: list[dict], prepare_summary: dict,
              tokenizer, output: OutputKind, spec: AuditSpec, max_seq_len: int) -> AuditResult:
    def user_text(r: dict) -> str:
        return "\n".join(m["content"] for m in r["messages"] if m["role"] == "user")

    texts = {name: [user_text(r) for r in rows] for name, rows in splits.items()}
    near = near_duplicates(texts, spec.near_duplicate_jaccard)
    leaks = exact_leakage(texts)
    everything = [r for rows in splits.values() for r in rows]
    pii = [(user_text(r), found) for r in everything if (found := pii_findings(user_text(r)))]
    lengths, trained = {}, {}
    for name, rows in splits.items():
        lengths[name], trained[name] = token_lengths(tokenizer, rows, **output.template_kwargs())
    # An empty source reaches the audit with no records at all: its verdict is the min_records gate, not a crash.
    all_lengths = np.concatenate([np.zeros(0, dtype=int), *lengths.values()])
    all_trained = np.concatenate([np.zeros(0, dtype=int), *trained.values()])
    kept = len(everything)
    duplicates = prepare_summary["exact_duplicates_removed"]
    held_out = sum(len(splits.get(s, [])) for s in ("validation", "test"))
    pii_kinds = Counter(kind for _, found in pii for kind in found)
    metrics = {
        "train_records": 0,
        **{f"{name}_records": len(rows) for name, rows in splits.items()},
        # Where every raw record went: kept + quarantined + exact duplicates = raw.
        "raw_records": prepare_summary["raw_records"],
        "kept_records": kept,
        "quarantined": len(quarantine),
        "exact_duplicates_removed": duplicates,
        "unaccounted_records": prepare_summary["raw_records"] - kept - len(quarantine) - duplicates,
        "invalid_fraction": len(quarantine) / max(1, prepare_summary["raw_records"]),
        "exact_leakage": len(leaks),
        "near_duplicates_within": sum(near.within.values()),
        "near_leakage_fraction": sum(near.leaked.get(s, 0) for s in ("validation", "test")) / max(1, held_out),
        "tokens_p50": float(np.percentile(all_lengths, 50)) if kept else 0.0,
        "tokens_p95": float(np.percentile(all_lengths, 95)) if kept else 0.0,
        "tokens_max": int(all_lengths.max(initial=0)),
        "over_length_fraction": float((all_lengths > max_seq_len).mean()) if kept else 0.0,
        "trained_token_share": float(all_trained.sum() / max(1, all_lengths.sum())),
        "pii_fraction": len(pii) / max(1, len(everything)),
        **{f"pii_{kind}": n for kind, n in pii_kinds.items()},
    }
    balance = {name: output.answer_balance([output.reference(r) for r in rows]) for name, rows in splits.items()}
    return AuditResult(metrics, splits, quarantine, lengths, near, leaks, pii[:10], balance)
