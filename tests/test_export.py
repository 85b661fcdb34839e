"""GGUF export end to end: merge a real LoRA adapter, convert with llama.cpp's converter, quantize, run, compare.

The base model is $TUNEFORGE_TEST_BASE when set, else the `base_model_dir` fixture (models/base).
"""

import os
from pathlib import Path

import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp", reason="llama_cpp is not importable: scripts/setup.sh installs llama-cpp-python")

from tests.conftest import CHAT_RECORDS  # noqa: E402
from tuneforge.core.kinds import output_spec  # noqa: E402
from tuneforge.stages import export  # noqa: E402

pytestmark = pytest.mark.slow  # merges, converts and quantizes GGUF files

RECORDS = CHAT_RECORDS


@pytest.fixture(scope="module")
def test_base(request) -> Path:
    if env := os.environ.get("TUNEFORGE_TEST_BASE"):
        folder = Path(env)
        if not (folder / "model.safetensors").exists():
            pytest.skip(f"TUNEFORGE_TEST_BASE={env} holds no model.safetensors")
        return folder
    return request.getfixturevalue("base_model_dir")


@pytest.fixture(scope="module")
def exported(module_tmp, test_base):
    """A non-trivial LoRA adapter (random B, so merging changes the weights), merged and exported."""
    try:
        export.converter_dir()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    tmp = module_tmp
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(test_base, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    peft_model.save_pretrained(tmp / "adapter")
    merged = export.merge_adapter(test_base, tmp / "adapter", tmp / "merged")
    files = export.export_all(merged, tmp / "gguf", ["Q4_K_M"])
    return tmp, files


@pytest.fixture(scope="module")
def tokenizer(exported):
    from tuneforge.core.modeling import load_tokenizer

    return load_tokenizer(exported[0] / "merged")


def test_merge_changes_weights_and_keeps_the_chat_template(exported, test_base):
    from safetensors.torch import load_file

    tmp, _ = exported
    merged = load_file(tmp / "merged" / "model.safetensors")
    base = load_file(test_base / "model.safetensors")
    name = next(k for k in merged if k.endswith("layers.0.self_attn.q_proj.weight"))
    assert merged[name].dtype == torch.float32
    assert not torch.equal(merged[name], base[name])
    assert not any("lora" in k for k in merged)
    assert (tmp / "merged" / "chat_template.jinja").exists() or "chat_template" in (tmp / "merged" / "tokenizer_config.json").read_text()


def test_q4_k_m_generates_from_the_same_prompt_tokens_as_the_hf_model(exported, tokenizer):
    _, files = exported
    assert files["Q4_K_M"].read_bytes()[:4] == b"GGUF"
    assert files["Q4_K_M"].stat().st_size < 0.5 * files["f16"].stat().st_size
    llm = export.load_llama(files["Q4_K_M"], n_threads=2)
    run = export.generate_gguf(llm, tokenizer, RECORDS, 12)
    assert len(run.results) == 2 and run.generated_tokens > 0 and run.generation_tokens_per_second > 0
    for record, result in zip(RECORDS, run.results):
        hf_ids = tokenizer.apply_chat_template(record["messages"][:-1], add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
        assert result["prompt_tokens"] == len(hf_ids)
        assert result["prompt_seconds"] > 0 and result["generation_seconds"] > 0
        # What an edge user runs (the GGUF's embedded template, llama.cpp's tokenizer) gives the same prompt and answer.
        llm.reset()  # else it reuses the cached prefix, and other batch shapes can flip a near-tie (seen on Q4_K_M)
        reply = llm.create_chat_completion(messages=record["messages"][:-1], temperature=0, max_tokens=12)
        assert reply["usage"]["prompt_tokens"] == len(hf_ids)
        assert reply["choices"][0]["message"]["content"].strip() == result["output"]


def test_f16_matches_the_hf_model_next_token_for_token(exported, tokenizer):
    from transformers import AutoModelForCausalLM

    tmp, files = exported
    hf = AutoModelForCausalLM.from_pretrained(tmp / "merged", dtype=torch.float32)
    # computed once, compared with each file; a text kind: the records' answers rendered as they are
    reference = export.parity_reference(hf, tokenizer, RECORDS, output_spec(kind="text"))
    parity = export.next_token_parity(reference, export.load_llama(files["f16"], logits_all=True, n_threads=2))
    assert parity["answer_tokens"] > 10
    assert parity["top1_agreement"] >= 0.8 and parity["mean_kl"] < 0.01
    q4 = export.next_token_parity(reference, export.load_llama(files["Q4_K_M"], logits_all=True, n_threads=2))
    assert q4["mean_kl"] > parity["mean_kl"]  # quantization costs something, and the check can see it


def test_parity_refuses_a_model_without_all_logits(exported, tokenizer):
    with pytest.raises(ValueError, match="logits_all=True"):
        export.next_token_parity(export.ParityReference([], [], []), export.load_llama(exported[1]["Q4_K_M"], n_threads=2))


def test_a_failed_quantization_says_why(exported, tmp_path):
    with pytest.raises(RuntimeError, match="importance matrix"):  # llama.cpp's own message, not just "returned 1"
        export.quantize_gguf(exported[1]["f16"], tmp_path / "model-IQ2_XXS.gguf", "IQ2_XXS")


def test_bad_inputs_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown quantization type 'Q9_X'"):
        export.quantize_gguf(tmp_path / "in.gguf", tmp_path / "out.gguf", "Q9_X")
    with pytest.raises(FileNotFoundError, match="convert the model to GGUF first"):
        export.quantize_gguf(tmp_path / "in.gguf", tmp_path / "out.gguf", "Q8_0")
    monkeypatch.setenv("TUNEFORGE_ROOT", str(tmp_path))  # a checkout without vendor/
    with pytest.raises(FileNotFoundError, match="run scripts/fetch_gguf_converter.sh"):
        export.convert_to_gguf(tmp_path, tmp_path / "model-f16.gguf")
