"""Every output kind in the registry through the same checks, so that a new kind cannot skip one: its references
are valid answers, canonical answers are stable, its grammar (where it has one) accepts the canonical answers token
by token, the references score perfectly against themselves, every metric bootstraps, its baseline answers every
test record, and it can say in words what an answer is."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from tuneforge.core.kinds import KINDS, output_spec
from tuneforge.core.readers import Record, read_source

from .conftest import ROOT, load_script

DATA = ROOT / "tests" / "data"


def chat_records(path: Path, system: str = "", n: int = 12) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()[:n]]
    prefix = [{"role": "system", "content": system}] if system else []
    return [{"messages": prefix + [m for m in row["messages"] if m["role"] != "system"]} for row in rows]


def prompt_records(path: Path, n: int = 12) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()[:n]]
    return [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
            for r in rows]


def address_records(n: int = 12) -> list[dict]:
    from tuneforge.core.params import load_params

    spec = load_params().task("address_json")
    found = [r for r in read_source(ROOT / spec.source, spec.source, spec) if isinstance(r, Record)]
    return [{"messages": r.messages} for r in found[:n]]


# kind -> (its settings, records whose last assistant turn is a reference answer)
CASES = {
    "label": ({"kind": "label", "labels": ["spam", "ham"]},
              lambda: [{"messages": [{"role": "user", "content": t}, {"role": "assistant", "content": a}]}
                       for t, a in [("WIN a prize now", "spam"), ("see you at 5", "ham"), ("free cash", "spam"),
                                    ("lunch?", "ham"), ("claim your reward", "spam"), ("ok thanks", "ham")]]),
    "json_object": (None, address_records),  # address_json's own output block
    "json_schema": ({"kind": "json_schema", "schema_file": "tests/data/json_schema_task/schema.json"},
                    lambda: prompt_records(DATA / "json_schema_task" / "records.jsonl")),
    "text": ({"kind": "text", "max_chars": 80},
             lambda: prompt_records(ROOT / "data" / "raw" / "email_subject" / "emails.jsonl")),
    "chat": ({"kind": "chat"}, lambda: chat_records(DATA / "chat_task" / "records.jsonl")),
    "tool_call": ({"kind": "tool_call", "tools": yaml.safe_load((DATA / "tool_call_task" / "tools.yaml").read_text())},
                  lambda: chat_records(DATA / "tool_call_task" / "records.jsonl", "You have tools.", n=20)),
}


def test_every_registered_kind_has_a_case():
    assert set(CASES) == set(KINDS)


@pytest.fixture(scope="module")
def qwen25_tokenizer():
    """A tokenizer whose template renders tools=: the Qwen2 vocabulary with Qwen2.5-Instruct's template."""
    builder = load_script("make_random_model")
    if not builder.VOCAB_DIR.exists():
        pytest.skip("the vocabulary GGUFs are fetched by scripts/fetch_gguf_converter.sh")
    tokenizer = builder.family_tokenizer("qwen2")
    tokenizer.chat_template = (DATA / "chat_templates" / "qwen2.5-instruct.jinja").read_text()
    return tokenizer


@pytest.fixture(params=sorted(CASES))
def case(request, tokenizer, qwen25_tokenizer, monkeypatch):
    monkeypatch.setenv("TUNEFORGE_ROOT", str(ROOT))
    settings, make_records = CASES[request.param]
    if settings is None:
        from tuneforge.core.params import load_params

        spec = load_params().task("address_json").output
    else:
        spec = output_spec(**settings)
    records = [{"messages": spec.canonical_messages(r["messages"])} for r in make_records()]
    tok = qwen25_tokenizer if spec.binds_to_template else tokenizer
    return spec.bind(tok), records, tok


def test_references_are_valid_answers_in_canonical_form(case):
    spec, records, _ = case
    for record in records:
        for answer in spec.answers(record["messages"]):
            assert spec.answer_problem(answer) == "" and spec.training_problem(answer) == "", answer
            assert spec.canonical_answer(answer) == answer
        assert spec.reference(record) and spec.input_text(record)


def test_the_grammar_accepts_every_canonical_reference(case):
    """What training teaches, decoding can write (the grammar llama.cpp and llguidance both run)."""
    from tuneforge.core.chat import assistant_turn, end_of_turn
    from tuneforge.core.constraints import GrammarMatcher

    spec, records, tok = case
    for record in records:
        grammar = spec.grammar(spec.input_text(record))
        if grammar is None:
            continue
        # The answer as the template writes it (a tool call in its wire format), without the end-of-turn token.
        text = assistant_turn(tok, record["messages"], end_of_turn(tok), **spec.template_kwargs())[1]
        text = text.removesuffix(end_of_turn(tok)).strip()
        matcher = GrammarMatcher(tok, len(tok), grammar).matcher
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert matcher.consume_tokens(ids) and matcher.is_accepting() and not matcher.is_error(), text


def test_references_score_perfectly_and_every_metric_bootstraps(case):
    spec, records, _ = case
    inputs, references = [spec.input_text(r) for r in records], [spec.reference(r) for r in records]
    scores = spec.score(inputs, references, references)
    primary = next(iter(spec.METRICS))
    assert scores["n"] == len(records) and scores["valid_answer"] == 1.0
    assert scores[primary] == pytest.approx(1.0) and scores[spec.plain_metric] == pytest.approx(1.0)
    rows = np.random.default_rng(0).integers(0, len(records), size=(7, len(records)))
    totals = spec.totals(inputs, references, references, rows)
    for name, metric in spec.metric_functions().items():
        assert np.shape(metric(totals)) == (7,), name
    assert all(spec.example_score(r, r, i) == pytest.approx(1.0) for r, i in zip(references, inputs, strict=True))
    assert all(spec.error_kind(r, r, i) == "ok" for r, i in zip(references, inputs, strict=True))


def test_the_baseline_answers_every_test_record_and_the_kind_describes_itself(case):
    spec, records, _ = case
    half = len(records) // 2
    answers = spec.baseline(records[:half], records[half:])
    assert len(answers) == len(records) - half and all(isinstance(a, str) for a in answers)
    assert spec.baseline_name and spec.describe() and spec.plain_sentence.format(share="50%", n=10)
    assert spec.category(spec.reference(records[0])) != "(invalid)"
