"""Read a task's raw source, validate, exact-dedupe, and split deterministically.

Order matters: duplicates are removed *before* splitting so the same example can
never land in both train and test.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from tuneforge.core.kinds import OutputKind
from tuneforge.core.params import SplitSpec, TaskSpec
from tuneforge.core.readers import Record, Rejected, read_repository_source
from tuneforge.core.records import folded, normalise, write_jsonl

SPLITS = ("train", "validation", "test")


@dataclass
class Prepared:
    """Every raw record ends up in exactly one place: a split, the quarantine, or `duplicates`."""

    splits: dict[str, list[Record]]
    rejected: list[Rejected]
    raw_count: int
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (kept source, dropped source)

    @property
    def kept(self) -> int:
        return sum(len(v) for v in self.splits.values())

    @property
    def exact_duplicates(self) -> int:
        return len(self.duplicates)


def split_of(group_key: str, split: SplitSpec, production_fraction: float) -> str:
    """Deterministic split from a hash: stable when rows are added or reordered.

    The key is the normalised input, so inputs that differ only in case, punctuation or Unicode form (NFC/NFD,
    fullwidth, zero-width characters) share a split and cannot leak from train into test.
    """
    digest = hashlib.sha256(f"{split.seed}:{group_key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < production_fraction:
        return "production"
    u = (u - production_fraction) / (1 - production_fraction)
    if u < split.test_fraction:
        return "test"
    if u < split.test_fraction + split.validation_fraction:
        return "validation"
    return "train"


def base_special_tokens(base_dir: Path, output: OutputKind) -> list[str]:
    """The special-token strings of the base model's tokenizer (models/base): the markers its chat template renders
    turns with, which no training record may hold. The task's output kind is bound to the same tokenizer first, so a
    task the template cannot write (tool_call on a template that ignores tools=) fails here, before training."""
    from tuneforge.core.chat import special_token_strings
    from tuneforge.core.modeling import load_tokenizer  # imports torch: only when the stage asks

    tokenizer = load_tokenizer(base_dir)
    output.bind(tokenizer)
    return special_token_strings(tokenizer)


def prepare(task: TaskSpec, split: SplitSpec, root: Path, specials: Collection[str] = ()) -> Prepared:
    """specials: the base model's special-token strings (base_special_tokens); a record holding one is quarantined.
    The stage passes them; without them that check is skipped."""
    rel = task.source
    rejected: list[Rejected] = []
    valid: list[Record] = []
    raw_count = 0
    for item in read_repository_source(root, rel, task):
        raw_count += 1
        if isinstance(item, Rejected):
            rejected.append(item)
            continue
        problem, raw = record_problem(item, task, specials)
        if problem:
            rejected.append(Rejected(rel, item.line, problem, raw))
            continue
        valid.append(with_canonical_answers(item, task.output))

    seen_given_ids: dict[str, str] = {}
    by_id: dict[str, Record] = {}
    answer_for_input: dict[str, Record] = {}
    duplicates: list[tuple[str, str]] = []
    for record in valid:
        file, line = record.source.rsplit(":", 1)
        if record.given_id is not None:
            given_id = json.dumps(record.given_id)  # its JSON text: the id 1 and the id "1" are two ids
            if given_id in seen_given_ids:
                rejected.append(Rejected(file, int(line), f"duplicated id {record.given_id!r} (first at {seen_given_ids[given_id]})"))
                continue
            seen_given_ids[given_id] = record.source
        if record.id in by_id:
            duplicates.append((by_id[record.id].source, record.source))
            continue
        # Inputs that differ only in case, spacing or Unicode form (NFC/NFD, fullwidth, zero-width characters) are
        # one input to a model: two answers for it teach a coin toss. Answers are compared the same way, so JSON
        # values copied from a differently capitalised input ("MAIN ST" / "Main St") are no conflict. Punctuation
        # stays significant ("# 86" vs "& 86").
        prompt_key = json.dumps([[m["role"], folded(m.get("content") or ""), m.get("tool_calls")]
                                 for m in record.messages[:-1]])
        answer = task.output.reference(record.to_json())
        if prompt_key in answer_for_input and folded(task.output.reference(answer_for_input[prompt_key].to_json())) != folded(answer):
            first = answer_for_input[prompt_key]
            rejected.append(Rejected(file, int(line), f"same input as {first.source} (ignoring case, spacing and "
                                     f"Unicode look-alikes) with a different answer", answer))
            continue
        answer_for_input.setdefault(prompt_key, record)
        by_id[record.id] = record

    splits: dict[str, list[Record]] = {name: [] for name in (*SPLITS, "production")}
    for record in by_id.values():
        splits[split_of(normalise(record.user_text), split, task.production_fraction)].append(record)
    if not task.production_fraction:
        del splits["production"]
    return Prepared(splits, rejected, raw_count, duplicates)


def record_problem(record: Record, task: TaskSpec, specials: Collection[str] = ()) -> tuple[str, str]:
    """(why the record cannot be trained on, the text at fault), or ("", "").

    Every assistant turn is checked, not only the last: chat.render puts loss on each of them."""
    problem = record.problem(specials)
    if problem:
        return problem, record.user_text
    answers = task.output.answers(record.messages)
    for turn, answer in enumerate(answers, start=1):
        problem = task.output.answer_problem(answer) or task.output.training_problem(answer)
        if problem:
            where = f"assistant turn {turn} of {len(answers)}: " if len(answers) > 1 else ""
            return where + problem, answer
    return "", ""


def with_canonical_answers(record: Record, output: OutputKind) -> Record:
    """The valid record with every answer in the form decoding produces (the kind's canonical_messages); its id is
    that content's, so answers that differ only in layout are exact duplicates."""
    messages = output.canonical_messages(record.messages)
    return record if messages == record.messages else Record(messages, record.source, given_id=record.given_id,
                                                                   metadata=record.metadata)


def write_prepared(prepared: Prepared, out_dir: Path, quarantine: Path) -> dict:
    for name, records in prepared.splits.items():
        write_jsonl(out_dir / f"{name}.jsonl", [r.to_json() for r in records])
    write_jsonl(quarantine, [r.to_json() for r in prepared.rejected])
    summary = {
        "raw_records": prepared.raw_count,
        "quarantined": len(prepared.rejected),
        "exact_duplicates_removed": prepared.exact_duplicates,
        "kept_records": prepared.kept,
        **{f"{name}_records": len(records) for name, records in prepared.splits.items()},
        "quarantine_reasons": dict(Counter(r.reason.split(" (")[0].split(":")[0] for r in prepared.rejected)),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
