"""The text and chat output kinds: settings, validity, metrics against sacrebleu's own, baselines."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import TypeAdapter, ValidationError
from sacrebleu.metrics import BLEU, CHRF

from tuneforge.core.kinds import INVALID, KINDS, OutputSpec
from tuneforge.core.kinds.chat import ChatOutput
from tuneforge.core.kinds.text import TextOutput

SPEC = TypeAdapter(OutputSpec)

REFS = ["The meeting moved to Friday at noon.", "Thanks, the invoice is attached.", "Server down again",
        "Lunch on Tuesday?"]
OUTS = ["The meeting is now on Friday at noon.", "Thanks, invoice attached.", "", "Lunch on Tuesday?"]
INPUTS = ["a", "b", "c", "d"]


def text(**settings) -> TextOutput:
    return SPEC.validate_python({"kind": "text", **settings})


def record(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


def test_registered():
    assert KINDS["text"] is TextOutput and KINDS["chat"] is ChatOutput
    assert isinstance(SPEC.validate_python({"kind": "chat"}), ChatOutput)


@pytest.mark.parametrize(("settings", "message"), [
    ({"regex": "(unclosed"}, "output.regex does not compile"),
    ({"grammar": "root ::= undefined-rule\n"}, "output.grammar is not a valid GBNF grammar"),
    ({"grammar": 'root ::= "open\n'}, "output.grammar is not a valid GBNF grammar"),
    ({"grammar": "root ::= [z-a]\n"}, "output.grammar is not a valid GBNF grammar"),
    ({"required_terms": ["Best"], "forbidden_terms": ["best"]}, "both required and forbidden"),
    ({"forbidden_terms": [" "]}, "output.forbidden_terms holds an empty term"),
    ({"max_chars": 0}, "greater than 0"),
    ({"baseline": "oracle"}, "'retrieval' or 'lead'"),
])
def test_bad_settings_are_named(settings, message):
    with pytest.raises(ValidationError, match=message):
        text(**settings)


def test_chat_has_no_lead_baseline():
    with pytest.raises(ValidationError, match="retrieval"):
        SPEC.validate_python({"kind": "chat", "baseline": "lead"})


def test_settings_round_trip_under_their_yaml_names():
    kind = text(grammar='root ::= [a-z]+\n', baseline="lead", max_chars=10)
    dumped = kind.model_dump()
    assert dumped["grammar"] == 'root ::= [a-z]+\n' and dumped["baseline"] == "lead"
    assert SPEC.validate_python(dumped) == kind


def test_answer_problem():
    kind = text(max_chars=10, regex=r"[A-Z].*")
    assert kind.answer_problem("Fine.") == ""
    assert kind.answer_problem("lowercase") == ""  # format rules are scored, not validity
    assert kind.answer_problem("") and kind.answer_problem(" \n\t")
    assert "max_chars" in kind.answer_problem("x" * 11)
    assert kind.answer_problem("  " + "x" * 10 + "\n") == ""  # surrounding whitespace is not counted
    assert kind.category("Fine.") == "1-5 words" and kind.category("") == INVALID


def test_grammar_constrains_and_validates():
    assert text().grammar("anything") is None
    kind = text(grammar='root ::= "Re: " [a-z ]+\n')
    assert kind.grammar("x") == 'root ::= "Re: " [a-z ]+\n'
    assert kind.answer_problem("Re: lunch plans") == ""
    assert "grammar" in kind.answer_problem("Lunch plans")
    assert kind.error_kind("Lunch plans", "Re: lunch", "") == "outside the grammar"


def test_canonical_answer_strips_unless_a_grammar_says_otherwise():
    assert text().canonical_answer("  Hello there.\n") == "Hello there."
    assert text(grammar='root ::= [a-z]+ "\\n"\n').canonical_answer("hi\n") == "hi\n"


def test_corpus_metrics_equal_sacrebleu():
    kind = text()
    scores = kind.score(INPUTS, REFS, OUTS)
    assert scores["chrf"] == pytest.approx(CHRF().corpus_score(OUTS, [REFS]).score / 100, abs=1e-12)
    assert scores["bleu"] == pytest.approx(BLEU().corpus_score(OUTS, [REFS]).score / 100, abs=1e-12)
    assert 0 < scores["chrf"] < 1 and 0 < scores["bleu"] < 1
    assert scores["exact_match"] == 0.25
    assert scores["length_ratio"] == pytest.approx(sum(map(len, OUTS)) / sum(map(len, REFS)))
    assert scores["valid_answer"] == 0.75
    assert scores["format_pass"] == 1.0  # no rules
    assert list(kind.METRICS)[0] == "chrf" and kind.plain_metric in kind.METRICS


def test_rouge_l_is_the_mean_of_row_f_measures():
    from rouge_score.rouge_scorer import RougeScorer

    scorer = RougeScorer(["rougeL"])
    expected = np.mean([scorer.score(r, o)["rougeL"].fmeasure for o, r in zip(OUTS, REFS, strict=True)])
    assert text().score(INPUTS, REFS, OUTS)["rouge_l"] == pytest.approx(expected)


def test_exact_match_collapses_whitespace_but_keeps_case():
    kind = text()
    assert kind.score(["x"], ["Hello  world"], [" Hello world\n"])["exact_match"] == 1.0
    assert kind.score(["x"], ["Hello world"], ["hello world"])["exact_match"] == 0.0


def test_resampled_totals_give_one_value_a_resample():
    kind = text()
    rows = np.array([[0, 1, 2, 3], [0, 0, 0, 0], [3, 3, 1, 2], [2, 2, 2, 2]])
    totals = kind.totals(INPUTS, REFS, OUTS, rows)
    assert totals["chrf_stats"].shape == (4, 18)
    values = {name: f(totals) for name, f in kind.metric_functions().items()}
    assert all(v.shape == (4,) for v in values.values())
    for i, drawn in enumerate(rows):  # each resample scores as sacrebleu scores the drawn rows
        hyps, refs = [OUTS[j] for j in drawn], [REFS[j] for j in drawn]
        assert values["chrf"][i] == pytest.approx(CHRF().corpus_score(hyps, [refs]).score / 100, abs=1e-12)
        assert values["bleu"][i] == pytest.approx(BLEU().corpus_score(hyps, [refs]).score / 100, abs=1e-12)
    assert values["exact_match"][3] == 0.0 and values["valid_answer"][3] == 0.0


def test_format_rules_are_a_pass_rate_with_a_breakdown():
    kind = text(regex=r"[A-Z][^\n]*[.?]", required_terms=["friday"], forbidden_terms=["ASAP"])
    outs = ["See you Friday.", "see you friday.", "Friday, asap.", "Monday?"]
    scores = kind.score(["x"] * 4, ["See you Friday."] * 4, outs)
    assert scores["format_pass"] == 0.25
    assert scores["per_rule"] == {"regex": 0.75, "required: friday": 0.75, "forbidden: ASAP": 0.75}
    assert kind.error_kind("Monday?", "See you Friday.", "") == "breaks a format rule"


def test_example_score_and_error_kinds():
    kind = text(max_chars=20)
    assert kind.example_score("Lunch on Tuesday?", "Lunch on Tuesday?", "") == 1.0
    assert kind.example_score("", "Lunch on Tuesday?", "") == 0.0
    assert 0 < kind.example_score("Lunch Tuesday", "Lunch on Tuesday?", "") < 1
    assert kind.error_kind(" ", "a", "") == "empty output"
    assert kind.error_kind("x" * 21, "a", "") == "too long"
    assert kind.error_kind("Lunch  on Tuesday?", "Lunch on Tuesday?", "") == "ok"
    assert kind.error_kind("Lunch Tuesday", "Lunch on Tuesday?", "") == "differs from the reference"


def test_answer_balance_counts_length_classes():
    counts = text().answer_balance(["Hi.", "one two three four five six", " ".join(["w"] * 120)])
    assert counts == {"1-5 words": 1, "6-10 words": 1, ">100 words": 1}


TRAIN = [
    record(("system", "Write the subject."), ("user", "The quarterly budget review is on Monday. Bring numbers."),
           ("assistant", "Budget review Monday")),
    record(("system", "Write the subject."), ("user", "Your parcel from the shop has shipped and arrives soon."),
           ("assistant", "Parcel shipped")),
]
TEST = [record(("system", "Write the subject."), ("user", "Reminder: budget review moved, same numbers please."),
               ("assistant", "Budget review moved"))]


def test_retrieval_baseline_answers_with_the_nearest_training_answer():
    assert text().baseline(TRAIN, TEST) == ["Budget review Monday"]
    assert text().baseline_name.startswith("TF-IDF")


def test_lead_baseline_cuts_the_first_sentence_to_the_mean_answer_length():
    # mean answer length over train: (3 + 2) / 2 = 2.5 words -> 2 (round half to even)
    assert text(baseline="lead").baseline(TRAIN, TEST) == ["Reminder: budget"]
    long_answers = [record(("user", "x"), ("assistant", " ".join(["w"] * 20)))]
    assert text(baseline="lead").baseline(long_answers, TRAIN) == [
        "The quarterly budget review is on Monday.", "Your parcel from the shop has shipped and arrives soon."]


def test_chat_input_is_the_conversation_before_the_final_reply():
    kind = SPEC.validate_python({"kind": "chat"})
    conversation = record(("system", "Be brief."), ("user", "Hi, can you book a table?"), ("assistant", "For when?"),
                          ("user", "Friday at 8, two people."), ("assistant", "Booked: Friday 8pm for two."))
    assert kind.input_text(conversation) == ("user: Hi, can you book a table?\nassistant: For when?\n"
                                             "user: Friday at 8, two people.")
    assert kind.reference(conversation) == "Booked: Friday 8pm for two."
    assert kind.answers(conversation["messages"]) == ["For when?", "Booked: Friday 8pm for two."]


def test_chat_retrieval_matches_on_earlier_turns_too():
    kind = SPEC.validate_python({"kind": "chat"})
    train = [record(("user", "Book a table please"), ("assistant", "For when?"), ("user", "Friday"),
                    ("assistant", "Table booked for Friday.")),
             record(("user", "Cancel my gym membership"), ("assistant", "Which branch?"), ("user", "Friday"),
                    ("assistant", "Membership cancelled."))]
    # the last user turn alone ("Friday") ties; the first turn tells them apart
    test = [record(("user", "I want to book a table"), ("assistant", "For when?"), ("user", "Friday"),
                   ("assistant", "Booked."))]
    assert kind.baseline(train, test) == ["Table booked for Friday."]
    test = [record(("user", "Please cancel the gym membership"), ("assistant", "Which branch?"),
                   ("user", "Friday"), ("assistant", "Done."))]
    assert kind.baseline(train, test) == ["Membership cancelled."]


def test_no_rows_score_zero_rather_than_fail():
    scores = text().score([], [], [])
    assert scores["n"] == 0 and scores["chrf"] == scores["bleu"] == 0.0
