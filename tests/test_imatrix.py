"""Task-calibrated quantization and GGUF adapters with the real base model, converter and llama.cpp.

An importance matrix from real conversations reaches llama_model_quantize under the GGUF tensor names and changes
the k-quant file; a LoRA adapter converted to GGUF and applied over the base file answers like the merged model.
"""


import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp", reason="llama_cpp is not importable: scripts/setup.sh installs llama-cpp-python")

from tests.conftest import CHAT_RECORDS
from tuneforge.core import quantize
from tuneforge.core.adapters import AdapterSwitch
from tuneforge.core.gguf import file_sha256, generate_gguf, load_llama

pytestmark = pytest.mark.slow  # collects importance matrices and quantizes

RECORDS = CHAT_RECORDS


@pytest.fixture(scope="module")
def built(module_tmp, base_model_dir):
    """The base as f16 GGUF, an imatrix from RECORDS, and a random (non-trivial) LoRA adapter as PEFT and GGUF."""
    try:
        quantize.converter_dir("convert_lora_to_gguf.py")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tuneforge.core.modeling import load_tokenizer

    tmp = module_tmp
    tokenizer = load_tokenizer(base_model_dir)
    f16 = quantize.convert_to_gguf(base_model_dir, tmp / "base-f16.gguf")
    model = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
    imatrix = quantize.collect_imatrix(model, tokenizer, RECORDS, f16, 256)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                  init_lora_weights=False))
    with torch.no_grad():  # random B, scaled so the adapter changes answers without wrecking the model
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.05)
    peft_model.save_pretrained(tmp / "adapter")
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(tmp / "merged")
    tokenizer.save_pretrained(tmp / "merged")
    adapter = quantize.convert_lora_to_gguf(tmp / "adapter", base_model_dir, tmp / "adapter-f16.gguf")
    merged_f16 = quantize.convert_to_gguf(tmp / "merged", tmp / "merged-f16.gguf")
    return {"tmp": tmp, "f16": f16, "imatrix": imatrix, "tokenizer": tokenizer, "adapter": adapter,
            "merged_f16": merged_f16}


def test_imatrix_covers_every_linear_weight_under_its_gguf_name(built):
    shapes = quantize.gguf_tensor_names(built["f16"])
    imatrix = built["imatrix"]
    assert "blk.0.attn_q.weight" in imatrix and "blk.29.ffn_down.weight" in imatrix
    assert len(imatrix) == 30 * 7  # q, k, v, o, gate, up, down in each of SmolLM2-135M's 30 blocks
    for name, values in imatrix.items():
        assert values.shape == (shapes[name][0],), name  # one value per input column (ne[0])
        assert values.dtype == np.float32 and np.all(values >= 0) and values.max() > 0
    # ffn_down reads the MLP's 1536-wide activations, the others the 576-wide hidden state
    assert imatrix["blk.3.ffn_down.weight"].shape == (1536,) and imatrix["blk.3.attn_k.weight"].shape == (576,)


def test_the_imatrix_changes_k_quants_but_not_q8_0(built):
    tmp, f16, imatrix = built["tmp"], built["f16"], built["imatrix"]
    plain = quantize.quantize_gguf(f16, tmp / "q4.gguf", "Q4_K_M")
    calibrated = quantize.quantize_gguf(f16, tmp / "q4-imatrix.gguf", "Q4_K_M", imatrix=imatrix)
    assert file_sha256(plain) != file_sha256(calibrated)
    assert plain.stat().st_size == calibrated.stat().st_size  # same types, other rounding
    q8 = quantize.quantize_gguf(f16, tmp / "q8.gguf", "Q8_0")
    q8_calibrated = quantize.quantize_gguf(f16, tmp / "q8-imatrix.gguf", "Q8_0", imatrix=imatrix)
    assert file_sha256(q8) == file_sha256(q8_calibrated)
    run = generate_gguf(load_llama(calibrated, n_threads=2), built["tokenizer"], RECORDS[:1], 8)
    assert run.generated_tokens > 0


def test_tensor_type_overrides_reach_llama_cpp(built):
    from gguf import GGUFReader

    out = quantize.quantize_gguf(built["f16"], built["tmp"] / "q8-emb.gguf", "Q8_0", tensor_types={"token_embd": "Q4_0"})
    types = {t.name: t.tensor_type.name for t in GGUFReader(str(out)).tensors}
    assert types["token_embd.weight"] == "Q4_0" and types["blk.0.attn_q.weight"] == "Q8_0"


def test_bad_imatrix_and_types_are_clear_errors(built, tmp_path):
    with pytest.raises(ValueError, match="unknown tensor type 'Q9_X'"):
        quantize.quantize_gguf(built["f16"], tmp_path / "x.gguf", "Q8_0", tensor_types={"token_embd": "Q9_X"})
    with pytest.raises(ValueError, match="non-finite"):
        quantize.quantize_gguf(built["f16"], tmp_path / "x.gguf", "Q4_K_M",
                               imatrix={"blk.0.attn_q.weight": np.full(576, np.nan, dtype=np.float32)})
    with pytest.raises(RuntimeError, match="imatrix size 100 is different from tensor size 576"):
        quantize.quantize_gguf(built["f16"], tmp_path / "x.gguf", "Q4_K_M",
                               imatrix={"blk.0.attn_q.weight": np.ones(100, dtype=np.float32)})
    with pytest.raises(FileNotFoundError, match="train the task first"):
        quantize.convert_lora_to_gguf(tmp_path, tmp_path, tmp_path / "a.gguf")


def test_adapter_over_the_base_answers_like_the_merged_model(built):
    tokenizer = built["tokenizer"]
    merged = generate_gguf(load_llama(built["merged_f16"], n_threads=2), tokenizer, RECORDS, 16).outputs
    base = generate_gguf(load_llama(built["f16"], n_threads=2), tokenizer, RECORDS, 16).outputs
    switch = AdapterSwitch.load(built["f16"], {"task": built["adapter"]}, n_threads=2)
    assert switch.use("task") >= 0 and switch.use("task") == 0.0  # a second use() of the same adapter is free
    with_adapter = generate_gguf(switch.llm, tokenizer, RECORDS, 16).outputs
    switch.use(None)
    bare = generate_gguf(switch.llm, tokenizer, RECORDS, 16).outputs
    switch.close()
    assert with_adapter == merged
    assert bare == base
    assert merged != base  # the adapter changes the answers, so the comparison above means something


def test_adapter_errors_name_the_file(built, tmp_path):
    with pytest.raises(FileNotFoundError, match="base_gguf"):
        AdapterSwitch.load(tmp_path / "missing.gguf", {})
    with pytest.raises(FileNotFoundError, match="export@task"):
        AdapterSwitch.load(built["f16"], {"task": tmp_path / "missing.gguf"}, n_threads=1)
    switch = AdapterSwitch.load(built["f16"], {}, n_threads=1)
    with pytest.raises(KeyError, match="no adapter loaded for 'other'"):
        switch.use("other")
    switch.close()
