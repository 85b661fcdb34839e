"""Audit checks on hand-made data, and the loss mask with the real tokenizer."""

from tuneforge.core.chat import IGNORE, prompt_text, render
from tuneforge.core.params import AuditSpec
from tuneforge.stages.audit import exact_leakage, gate, near_duplicates, pii_findings


def test_pii_finds_emails_phones_and_luhn_valid_cards():
    found = pii_findings("mail a.b@example.com or call 0800 169 6031, card 4111 1111 1111 1111")
    assert found["email"] == ["a.b@example.com"]
    assert found["phone"]
    assert found["card_number"] == ["4111 1111 1111 1111"]
    assert "card_number" not in pii_findings("order 4111 1111 1111 1112")  # fails the Luhn check
    assert pii_findings("123 Main St") == {}


def test_near_duplicates_and_leakage_across_splits():
    texts = {
        "train": ["URGENT! You have won a 900 prize. Call 09061701851 now", "see you at lunch"],
        "test": ["URGENT! You have won a 900 prize. Call 09061701939 now", "completely different text here"],
    }
    near = near_duplicates(texts, 0.6)
    assert near.leaked == {"test": 1}
    assert near.examples[0][0] == "test"
    assert exact_leakage({"train": ["I'm home."], "test": ["i'm home"]}) == [("train", "test", "i'm home")]


def test_gate_names_each_breached_threshold():
    metrics = {"invalid_fraction": 0.5, "exact_leakage": 2, "near_leakage_fraction": 0.0,
               "over_length_fraction": 0.0, "pii_fraction": 0.0, "train_records": 100}
    failures = gate(metrics, AuditSpec())
    assert len(failures) == 2
    assert "audit.max_invalid_fraction" in failures[0] and "audit.max_exact_leakage" in failures[1]


def test_only_the_answer_and_its_end_of_turn_carry_loss(tokenizer):
    messages = [{"role": "system", "content": "Parse the US address into JSON."},
                {"role": "user", "content": "8128 S. DR MARTIN LUTHER KING JR Drive"},
                {"role": "assistant", "content": '{"AddressNumber": "8128"}'}]
    r = render(tokenizer, messages)
    trained = tokenizer.decode([t for t, label in zip(r.input_ids, r.labels) if label != IGNORE])
    assert trained == '{"AddressNumber": "8128"}<|im_end|>'
    # The untrained prefix is exactly the inference prompt, token for token.
    prompt_ids = tokenizer(prompt_text(tokenizer, messages), add_special_tokens=False)["input_ids"]
    assert r.input_ids[: len(prompt_ids)] == prompt_ids
    assert set(r.labels[: len(prompt_ids)]) == {IGNORE}
    # Rendering in pieces gives the same tokens as rendering the whole conversation.
    whole = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    assert r.input_ids == whole


def test_multi_turn_trains_every_assistant_turn(tokenizer):
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "ham"},
                {"role": "user", "content": "b"}, {"role": "assistant", "content": "spam"}]
    r = render(tokenizer, messages)
    trained = tokenizer.decode([t for t, label in zip(r.input_ids, r.labels) if label != IGNORE])
    assert trained == "ham<|im_end|>spam<|im_end|>"


def test_the_email_pattern_scans_a_megabyte_of_dotted_words_in_linear_time():
    """The old pattern retried every start of "a.a.a..." against the whole run: 16k characters took 0.58 s and each
    doubling four times as long (a 1 MB record: ~40 min)."""
    import time

    start = time.perf_counter()
    assert pii_findings("a." * 500_000) == {}
    assert time.perf_counter() - start < 1.0
    assert pii_findings("a." * 50_000 + "x@example.com")["email"] == ["a." * 50_000 + "x@example.com"]
    assert pii_findings(".+x@example.com, x@y@example.org")["email"] == ["x@example.com", "y@example.org"]
