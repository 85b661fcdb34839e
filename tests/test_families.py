"""The models users bring: tiny random-weight folders of real families (Llama 3, Qwen2, Mistral, Phi-3), each with
its real tokenizer and chat template (scripts/make_random_model.py), through base_model -> train -> evaluate ->
export (f16, Q8_0, Q4_K_M) with the stage functions; and a base the GGUF converter refuses fails at base_model.
"""

import shutil

import pytest
import yaml

pytest.importorskip("llama_cpp", reason="llama_cpp is not importable: scripts/setup.sh installs llama-cpp-python")

from tuneforge.core.chat import IGNORE, end_of_turn, prompt_text, render  # noqa: E402
from tuneforge.core.modeling import load_tokenizer  # noqa: E402
from tuneforge.core.params import ModelSpec, load_params, only_tasks  # noqa: E402
from tuneforge.core.paths import (  # noqa: E402
    base_gguf_dir,
    base_model_dir,
    models_dir,
    predictions_file,
    processed_dir,
)
from tuneforge.core.records import read_jsonl, write_jsonl  # noqa: E402
from tuneforge.stages.base_gguf import export_base_gguf  # noqa: E402
from tuneforge.stages.base_model import NotExportableError, save_base_model  # noqa: E402
from tuneforge.stages.evaluate import run_evaluation  # noqa: E402
from tuneforge.stages.export import run_export  # noqa: E402
from tuneforge.stages.prepare import prepare, write_prepared  # noqa: E402
from tuneforge.stages.train import train_task  # noqa: E402

from .conftest import load_script  # noqa: E402

pytestmark = pytest.mark.slow  # four model families through every stage

TASK = "address_json"
SETTINGS = {
    "train": {"max_seq_len": 128, "batch_size": 2, "max_steps": 2, "eval_every": 2, "eval_rows": 4,
              "checkpoint_every": 10, "early_stopping_patience": 10,
              "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}},
    "evaluate": {"batch_size": 4},
    "export": {"quantizations": ["Q8_0", "Q4_K_M"], "max_rows": 2, "parity_rows": 2, "gate_quantization": "Q8_0",
               "imatrix_rows": 4, "compare_without_imatrix": False, "max_metric_drop": 1.0, "min_top1_agreement": 0.0,
               "n_threads": 2},
}


builder = load_script("make_random_model")
if not builder.VOCAB_DIR.exists():
    pytest.skip("the vocabulary GGUFs are fetched by scripts/fetch_gguf_converter.sh", allow_module_level=True)


@pytest.fixture(scope="module")
def prepared(module_tmp, repo_root):
    """address_json's processed splits, cut to a few records (24 train, 4 validation, 3 test)."""
    root = module_tmp
    shutil.copytree(repo_root / "data" / "raw" / TASK, root / "data" / "raw" / TASK)
    params = load_params(repo_root / "params.yaml")
    result = prepare(params.task(TASK), params.split, root)
    for name, keep in (("train", 24), ("validation", 4), ("test", 3)):
        result.splits[name] = result.splits[name][:keep]
    folder = root / "processed"
    write_prepared(result, folder, root / "quarantine.jsonl")
    return folder


def project(root, base, prepared, repo_root, monkeypatch):
    """A project folder whose model.base is `base`, with tiny settings and the prepared data."""
    params = yaml.safe_load((repo_root / "params.yaml").read_text())
    params["model"]["base"] = str(base)
    only_tasks(params, [TASK])["tasks"][TASK].update(max_new_tokens=8, production_fraction=0.0)
    for section, values in SETTINGS.items():
        params[section].update(values)
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / "dvc.yaml").write_text("stages: {}\n")
    (root / "vendor").symlink_to(repo_root / "vendor")
    shutil.copytree(prepared, root / "data" / "processed" / TASK)
    monkeypatch.setenv("TUNEFORGE_ROOT", str(root))
    return load_params(root / "params.yaml")


@pytest.mark.parametrize("family", sorted(builder.FAMILIES))
def test_every_answer_is_trained_up_to_its_familys_end_of_turn(family):
    """Multi-turn masking with each family's template: ChatML, Llama 3 headers, Mistral [INST], Phi-3 <|user|>."""
    tokenizer = builder.family_tokenizer(family)
    eot = builder.FAMILIES[family].end_of_turn
    assert end_of_turn(tokenizer) == eot
    messages = [{"role": "system", "content": "Classify the SMS as spam or ham."},
                {"role": "user", "content": "see you at 5"}, {"role": "assistant", "content": "ham"},
                {"role": "user", "content": "WINNER!! Claim your prize"}, {"role": "assistant", "content": "spam"}]
    rendered = render(tokenizer, messages)
    trained = tokenizer.decode([t for t, label in zip(rendered.input_ids, rendered.labels) if label != IGNORE])
    assert trained.replace(" ", "") == f"ham{eot}spam{eot}"  # SentencePiece decodes a word start as a space
    # Token for token what the whole conversation tokenizes to, and what the model reads at inference.
    whole = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    assert rendered.input_ids == whole
    prompt = tokenizer(prompt_text(tokenizer, messages), add_special_tokens=False)["input_ids"]
    assert rendered.input_ids[: len(prompt)] == prompt


@pytest.mark.parametrize("family", sorted(builder.FAMILIES))
def test_a_family_goes_through_every_stage(family, tmp_path, prepared, repo_root, monkeypatch):
    source = builder.make_random_model(family, tmp_path / "source")
    params = project(tmp_path / "project", source, prepared, repo_root, monkeypatch)

    save_base_model(params.model, base_model_dir())
    tokenizer = load_tokenizer(base_model_dir())
    assert tokenizer.chat_template == builder.family_tokenizer(family).chat_template
    eot = end_of_turn(tokenizer)
    assert eot == builder.FAMILIES[family].end_of_turn
    if builder.FAMILIES[family].sentencepiece:
        assert (base_model_dir() / "tokenizer.model").exists()

    # The loss mask: the answer and its end-of-turn token, after exactly the inference prompt.
    record = read_jsonl(processed_dir(TASK) / "train.jsonl")[0]
    rendered = render(tokenizer, record["messages"])
    trained = [t for t, label in zip(rendered.input_ids, rendered.labels) if label != IGNORE]
    assert tokenizer.decode(trained).strip() == record["messages"][-1]["content"] + eot
    prompt = tokenizer(prompt_text(tokenizer, record["messages"]), add_special_tokens=False)["input_ids"]
    assert rendered.input_ids[: len(prompt)] == prompt and set(rendered.labels[: len(prompt)]) == {IGNORE}

    train = train_task(TASK, params)
    assert train["steps"] == 2 and train["mode"] == "lora"
    assert (models_dir(TASK) / "adapter" / "adapter_model.safetensors").exists()

    spec = params.task(TASK)
    train_records, test, validation = (read_jsonl(processed_dir(TASK) / f"{name}.jsonl")
                                       for name in ("train", "test", "validation"))
    evaluation = run_evaluation(spec, params.evaluate, params.train.max_seq_len, train_records, test, validation,
                                base_model_dir(), models_dir(TASK) / "adapter")
    assert len(evaluation.tuned.outputs) == 3 and evaluation.tuned_perplexity > 1
    write_jsonl(predictions_file(TASK), evaluation.prediction_rows())

    export_base_gguf(params, base_model_dir(), base_gguf_dir())  # the file the task's GGUF adapter runs over
    export = run_export(TASK, params)
    rows = {row["label"]: row for row in export.rows}
    assert list(rows) == ["hf", "f16", "Q8_0", "Q4_K_M", "adapter"]
    # The f16 file computes what the HF model computes (random weights: near-ties may flip a top-1 token).
    assert rows["f16"]["mean_kl"] < 0.01 and rows["f16"]["top1_agreement"] >= 0.8
    assert rows["Q4_K_M"]["size_mb"] < rows["Q8_0"]["size_mb"] < rows["f16"]["size_mb"]
    assert all(len(outputs) == 2 for outputs in export.outputs.values())
    # Rows of 256 (hidden) and 512 (intermediate): every layer weight takes a real k-quant, none falls back.
    from gguf import GGUFReader

    q4 = GGUFReader(str(models_dir(TASK) / "gguf" / "model-Q4_K_M.gguf"))
    types = {t.name: t.tensor_type.name for t in q4.tensors}
    layer_types = {v for k, v in types.items() if k.startswith("blk.") and k.endswith(".weight") and "norm" not in k}
    assert layer_types <= {"Q4_K", "Q5_K", "Q6_K"}, types


def test_a_tokenizer_the_converter_does_not_know_fails_at_base_model(tmp_path, base_model_dir, repo_root, monkeypatch):
    """SmolLM2's tokenizer on a Qwen2 config: transformers would train it, llama.cpp's converter cannot export it."""
    from transformers import AutoConfig

    source = tmp_path / "source"
    source.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (base_model_dir / name).exists():
            shutil.copy2(base_model_dir / name, source / name)
    AutoConfig.for_model("qwen2", vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1).save_pretrained(source)
    # No weights in the folder: the pre-flight must refuse the base before anything loads them.
    monkeypatch.setenv("TUNEFORGE_ROOT", str(repo_root))
    with pytest.raises(NotExportableError) as failure:
        save_base_model(ModelSpec(base=str(source)), tmp_path / "base")
    message = str(failure.value)
    assert "llama.cpp does not know this tokenizer" in message and "BPE pre-tokenizer was not recognized" in message
    assert not (tmp_path / "base").exists()
