"""Constrained decoding: the grammar built from a task's OutputSpec, run by llguidance (HF generation, the export
stage's GGUF runs) and by llama.cpp's own grammar sampler (`tuneforge serve`), on the real tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tuneforge.core.constraints import (
    constrain_request,
    grammars_for,
)
from tuneforge.core.kinds import output_spec
from tuneforge.core.params import load_params
from tuneforge.core.readers import Record, read_source

ADDRESS = load_params().task("address_json")
SPAM = load_params().task("sms_spam")


def address_records(n: int | None = None) -> list[dict]:
    """The real labelled addresses (the raw file is in git), as chat records."""
    records = [r for r in read_source(Path(ADDRESS.source), ADDRESS.source, ADDRESS) if isinstance(r, Record)]
    return [{"id": r.id, "messages": r.messages} for r in records[:n]]


def matches(tokenizer, grammar: str, text: str, complete: bool = True) -> bool:
    """Whether text is a sentence of grammar (complete=False: the start of one), token by token as decoding
    would meet it."""
    from tuneforge.core.constraints import GrammarMatcher

    matcher = GrammarMatcher(tokenizer, len(tokenizer), grammar).matcher
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return matcher.consume_tokens(ids) and (matcher.is_accepting() or not complete) and not matcher.is_error()


@pytest.mark.slow  # every embedded address through its own grammar
def test_every_labelled_address_fits_its_own_extractive_grammar(tokenizer):
    """No reference answer is ruled out: values spread over the address ("Route 30 & Route 45" -> "30 45") and
    words that lose a trailing comma included."""
    records = address_records()
    misses = [r["messages"][-1]["content"] for r in records
              if not matches(tokenizer, ADDRESS.output.grammar(r["messages"][-2]["content"]),
                             r["messages"][-1]["content"])]
    assert not misses, misses[:3]


@pytest.mark.parametrize("answer", [
    '{"PlaceName": "Aldenon"}',                   # a value the input does not contain
    '{"StreetName": "Ohio West"}',                # input words out of order
    '{"Street": "Ohio"}',                         # a key outside allowed_keys
    '{"StreetName": "Ohio"',                      # unfinished
    '{}',                                         # empty
    '{"StreetName": "Ohio"} and more',            # text after the object
])
def test_the_extractive_grammar_refuses_what_the_input_cannot_give(tokenizer, answer):
    grammar = ADDRESS.output.grammar("1 West Ohio Street, Altoona, PA 16601")
    assert matches(tokenizer, grammar, '{"StreetNamePreDirectional": "West", "StreetName": "Ohio", "PlaceName": "Altoona"}')
    assert not matches(tokenizer, grammar, answer)


def test_llguidance_reads_a_byte_level_vocabulary_whatever_decoder_it_came_with(tokenizer):
    """transformers 5.17 turned the embedded GGUF's byte-level vocabulary into a tokenizer whose decoder is a
    SentencePiece-style sequence (byte fallback, "▁" -> " ", then ByteLevel). It decodes the same, but llguidance
    read "Ġ" in its tokens as a character, so the grammar masked every token that starts with a space (on an
    H200: constrained exact match 27% against 55% free). Such a tokenizer must constrain like the plain one."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "ByteFallback"}, {"type": "Fuse"}, {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}]}
    spec["model"]["byte_fallback"] = True
    converted = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                        eos_token=tokenizer.eos_token, pad_token=tokenizer.pad_token)
    answer = '{"AddressNumber": "9265", "StreetName": "Huer Huero", "StreetNamePostType": "Road"}'
    ids = converted(answer, add_special_tokens=False)["input_ids"]
    assert ids == tokenizer(answer, add_special_tokens=False)["input_ids"] and converted.decode(ids) == answer
    assert matches(converted, ADDRESS.output.grammar("9265 Huer Huero Road, Creston"), answer)


def test_free_json_grammar_takes_any_string_values_and_escapes(tokenizer):
    grammar = ADDRESS.output.model_copy(update={"extractive": False}).grammar("")
    assert matches(tokenizer, grammar, json.dumps({"StreetName": 'Aldenon "x" \\ é', "ZipCode": "1"}, ensure_ascii=False))
    assert matches(tokenizer, grammar, '{"StreetName":"a","ZipCode":"b"}')  # compact separators
    assert not matches(tokenizer, grammar, '{"StreetName": 5}')


def test_label_grammar_is_exactly_one_label(tokenizer):
    grammar = SPAM.output.grammar("")
    assert matches(tokenizer, grammar, "spam") and matches(tokenizer, grammar, "ham")
    assert not matches(tokenizer, grammar, "spam.") and not matches(tokenizer, grammar, "Spam")


def test_json_schema_states_the_same_contract():
    schema = ADDRESS.output.answer_schema()
    assert set(schema["properties"]) == set(ADDRESS.output.allowed_keys) and schema["additionalProperties"] is False
    assert SPAM.output.answer_schema() == {"type": "string", "enum": ["spam", "ham"]}


def test_params_switch_it_off_and_extractive_is_a_json_option():
    assert grammars_for(SPAM.output.model_copy(update={"constrained": False}), [{}]) is None
    with pytest.raises(ValueError, match="extractive"):
        output_spec(kind="label", labels=["a", "b"], extractive=True)


@pytest.mark.slow  # generates with the model
def test_hf_generation_is_batched_and_stays_inside_the_grammar(base_model_dir, tokenizer):
    """The untuned base model answers addresses with prose; constrained, every answer is a JSON object over allowed
    keys whose values are the input's words, batched generate() with a grammar a row; batches go by prompt length
    (the short SMS first) and the answers come back in record order."""
    from tuneforge.core.modeling import load_causal_lm
    from tuneforge.core.kinds.json_answers import parse_object
    from tuneforge.stages.evaluate import generate

    records = address_records(3) + [{"id": "spam", "messages": [
        {"role": "system", "content": SPAM.system_prompt}, {"role": "user", "content": "WIN a prize, call now"},
        {"role": "assistant", "content": "spam"}]}]
    grammars = grammars_for(ADDRESS.output, records[:3]) + grammars_for(SPAM.output, records[3:])
    model = load_causal_lm(base_model_dir, dtype=__import__("torch").float32, device="cpu")
    out = generate(model, tokenizer, records, output=ADDRESS.output, batch_size=2, max_new_tokens=24, grammars=grammars)
    assert out.outputs[3] in ("spam", "ham")
    for record, answer in zip(records[:3], out.outputs[:3]):
        # 24 tokens may cut an object short; what was written is still a prefix of the grammar's language
        words = record["messages"][-2]["content"].replace(",", " ").split()
        assert answer.startswith('{"') and any(f'"{key}"' in answer for key in ADDRESS.output.allowed_keys), answer
        obj = parse_object(answer)
        if obj is not None:
            assert all(set(v.split()) <= set(words) for v in obj.values()), (answer, words)
    free = generate(model, tokenizer, records[:1], output=ADDRESS.output, batch_size=1, max_new_tokens=24)
    assert parse_object(free.outputs[0]) is None  # the base model left free answers in prose


@pytest.mark.slow  # generates with the model
def test_an_answers_confidence_is_its_tokens_probability_under_the_raw_logits(base_model_dir, tokenizer):
    """generate(confidence=True) records, while decoding under the grammar, each chosen token's probability under
    the model's own (unmasked) logits: the geometric mean is what a teacher-forced pass over the same answer gives,
    the computation a GGUF's logprobs repeat (core/router.py calibrates it)."""
    import math

    import torch
    from transformers import LogitsProcessorList

    from tuneforge.core.chat import prompt_text
    from tuneforge.core.constraints import hf_logits_processor
    from tuneforge.core.modeling import load_causal_lm
    from tuneforge.stages.evaluate import generate

    records = address_records(2)
    model = load_causal_lm(base_model_dir, dtype=torch.float32, device="cpu")
    out = generate(model, tokenizer, records, output=ADDRESS.output, batch_size=2, max_new_tokens=12,
                   grammars=grammars_for(ADDRESS.output, records), confidence=True)
    n_vocab = model.get_output_embeddings().weight.shape[0]
    for record, answer_tokens, confidence in zip(records, out.output_tokens, out.confidences, strict=True):
        enc = tokenizer(prompt_text(tokenizer, record["messages"]), add_special_tokens=False, return_tensors="pt")
        grammar = LogitsProcessorList([hf_logits_processor(tokenizer, n_vocab, grammars_for(ADDRESS.output, [record]))])
        ids = model.generate(**enc, do_sample=False, max_new_tokens=answer_tokens, min_new_tokens=answer_tokens,
                             logits_processor=grammar, pad_token_id=tokenizer.pad_token_id)[0]
        start = enc["input_ids"].shape[1]
        with torch.no_grad():
            log_probs = torch.log_softmax(model(ids[None]).logits[0].float(), -1)
        teacher_forced = math.exp(float(log_probs[start - 1 : -1].gather(1, ids[start:, None]).mean()))
        assert 0 < confidence <= 1 and teacher_forced == pytest.approx(confidence, rel=1e-3)


@pytest.mark.cuda
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_the_grammar_masks_the_logits_of_a_model_on_the_gpu(tokenizer):
    """The mask is built on the CPU and the logits live on the GPU (evaluation on an H200 once failed here with
    `expected self and mask to be on the same device`)."""
    import torch

    from tuneforge.core.constraints import hf_logits_processor

    record = {"messages": [{"role": "system", "content": SPAM.system_prompt},
                           {"role": "user", "content": "WIN a prize, call now"}, {"role": "assistant", "content": "spam"}]}
    processor = hf_logits_processor(tokenizer, len(tokenizer), grammars_for(SPAM.output, [record]))
    scores = processor(torch.zeros(1, 4, dtype=torch.long, device="cuda"), torch.zeros(1, len(tokenizer), device="cuda"))
    allowed = [tokenizer.decode([t]) for t in torch.isfinite(scores[0]).nonzero().flatten().tolist()]
    assert scores.device.type == "cuda" and allowed
    assert all("spam".startswith(t) or "ham".startswith(t) for t in allowed), allowed


@pytest.fixture(scope="module")
def embedded_gguf() -> Path:
    from tuneforge.stages.base_model import EMBEDDED_GGUF, embedded_gguf_folder

    return embedded_gguf_folder() / EMBEDDED_GGUF


@pytest.mark.slow  # generates with the model
def test_llama_cpp_serving_grammar_and_export_runs_give_the_same_answers(embedded_gguf, tokenizer):
    """The GGUF answers the export stage gets (llguidance masking in generate_gguf) are the answers llama.cpp's own
    grammar sampler gives for the request `tuneforge serve` sends (constrain_request): one grammar, two engines."""
    from tuneforge.core.gguf import generate_gguf, load_llama

    llm = load_llama(embedded_gguf, n_threads=2)
    records = address_records(2) + [{"id": "s", "messages": [
        {"role": "system", "content": SPAM.system_prompt}, {"role": "user", "content": "Are we meeting at 6?"},
        {"role": "assistant", "content": "ham"}]}]
    specs = [ADDRESS.output, ADDRESS.output, SPAM.output]
    grammars = [o.grammar(r["messages"][-2]["content"]) for o, r in zip(specs, records, strict=True)]
    exported = generate_gguf(llm, tokenizer, records, 32, grammars=grammars).outputs
    for record, output, expected in zip(records, specs, exported, strict=True):
        request = constrain_request({"messages": record["messages"][:-1]}, output)
        served = llm.create_chat_completion(
            messages=request["messages"], temperature=0.0, repeat_penalty=1.0, max_tokens=32,
            grammar=__import__("llama_cpp").LlamaGrammar.from_string(request["grammar"], verbose=False))
        assert served["choices"][0]["message"]["content"].strip() == expected
    assert exported[2] in ("spam", "ham")


@pytest.mark.slow  # generates with the model
def test_tuneforge_serve_answers_under_the_grammar_what_the_export_stage_measured(tmp_path, repo_root, embedded_gguf,
                                                                                   tokenizer):
    """End to end: the served answer to an address (the server adds the system prompt and the request's grammar)
    is the answer generate_gguf gives the same conversation, and it is JSON over the input's words."""
    import httpx

    from tests.test_serve import start_server
    from tuneforge.core.gguf import generate_gguf, load_llama

    params = yaml.safe_load((repo_root / "params.yaml").read_text())
    params["tasks"]["address_json"]["max_new_tokens"] = 40  # the server's cap: a client may not cut answers shorter
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "models" / "address_json" / "gguf").mkdir(parents=True)
    (tmp_path / "models" / "address_json" / "gguf" / "model-Q8_0.gguf").symlink_to(embedded_gguf)
    (tmp_path / "metrics" / "address_json").mkdir(parents=True)  # the export gate chose that file:
    (tmp_path / "metrics" / "address_json" / "export.json").write_text('{"served_quantization": "Q8_0"}')
    text = "1 West Ohio Street, Altoona, PA 16601"
    proc, url, _ = start_server(tmp_path)
    try:
        reply = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
            "messages": [{"role": "user", "content": text}]})
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    served = reply.json()["choices"][0]["message"]["content"].strip()
    record = {"messages": [{"role": "system", "content": ADDRESS.system_prompt}, {"role": "user", "content": text},
                           {"role": "assistant", "content": ""}]}
    exported = generate_gguf(load_llama(embedded_gguf, n_threads=2), tokenizer, [record], 40,
                             grammars=[ADDRESS.output.grammar(text)]).outputs[0]
    assert served == exported
    assert served.startswith("{") and matches(tokenizer, ADDRESS.output.grammar(text), served, complete=False)
