"""GGUF export on the real model: merge a real adapter, convert with llama.cpp's converter, quantize, run, compare."""

import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is installed by scripts/setup.sh")

from tuneforge import export  # noqa: E402
from tuneforge.metrics import parse_object  # noqa: E402

MESSAGES = [
    {"messages": [{"role": "system", "content": "Parse the US address into JSON."},
                  {"role": "user", "content": "1600 Pennsylvania Ave NW, Washington, DC 20500"},
                  {"role": "assistant", "content": '{"AddressNumber": "1600", "StreetName": "Pennsylvania"}'}]},
    {"messages": [{"role": "system", "content": "Classify the SMS as spam or ham."},
                  {"role": "user", "content": "WINNER!! Claim your prize now"},
                  {"role": "assistant", "content": "spam"}]},
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, base_model_dir):
    """A non-trivial LoRA adapter (random B, so merging changes the weights), merged and exported."""
    if not (export.repo_root() / "vendor" / "llama.cpp-converter" / "convert_hf_to_gguf.py").exists():
        pytest.skip("the GGUF converter is fetched by scripts/setup.sh (scripts/fetch_gguf_converter.sh)")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    tmp = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    peft_model.save_pretrained(tmp / "adapter")
    merged = export.merge_adapter(base_model_dir, tmp / "adapter", tmp / "merged")
    files = export.export_all(merged, tmp / "gguf", ["Q4_K_M"])
    return tmp, files


def test_merge_changes_weights_and_keeps_the_chat_template(exported, base_model_dir):
    from safetensors.torch import load_file

    tmp, _ = exported
    merged = load_file(tmp / "merged" / "model.safetensors")
    base = load_file(base_model_dir / "model.safetensors")
    name = next(k for k in merged if k.endswith("layers.0.self_attn.q_proj.weight"))
    assert not torch.equal(merged[name], base[name])
    assert (tmp / "merged" / "chat_template.jinja").exists() or "chat_template" in (tmp / "merged" / "tokenizer_config.json").read_text()


def test_q4_k_m_is_a_real_quantized_gguf_that_generates(exported):
    from tuneforge.modeling import load_tokenizer

    tmp, files = exported
    assert files["Q4_K_M"].read_bytes()[:4] == b"GGUF"
    assert files["Q4_K_M"].stat().st_size < 0.5 * files["f16"].stat().st_size
    tokenizer = load_tokenizer(tmp / "merged")
    run = export.generate_gguf(export.load_llama(files["Q4_K_M"], n_threads=2), tokenizer, MESSAGES, 12)
    assert len(run.outputs) == 2 and all(isinstance(o, str) for o in run.outputs)
    assert run.generated_tokens > 0 and run.generation_tokens_per_second > 0


def test_f16_matches_the_hf_model_next_token_for_token(exported):
    from transformers import AutoModelForCausalLM

    from tuneforge.modeling import load_tokenizer

    tmp, files = exported
    tokenizer = load_tokenizer(tmp / "merged")
    hf = AutoModelForCausalLM.from_pretrained(tmp / "merged", dtype=torch.float32)
    parity = export.next_token_parity(hf, tokenizer, export.load_llama(files["f16"], logits_all=True, n_threads=2), MESSAGES)
    assert parity["answer_tokens"] > 10
    assert parity["top1_agreement"] >= 0.9 and parity["mean_kl"] < 0.01
    q4 = export.next_token_parity(hf, tokenizer, export.load_llama(files["Q4_K_M"], logits_all=True, n_threads=2), MESSAGES)
    assert q4["mean_kl"] > parity["mean_kl"]  # quantization costs something, and the check can see it


def test_unknown_quantization_type_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown quantization type 'Q9_X'"):
        export.quantize_gguf(tmp_path / "in.gguf", tmp_path / "out.gguf", "Q9_X")
    assert parse_object('{"a": "b"}') == {"a": "b"}
