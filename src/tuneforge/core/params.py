"""Typed, validated view of params.yaml: every stage reads its settings through here.

A mistake in params.yaml fails fast with a message naming the setting, instead of
surfacing later as a KeyError deep inside a notebook.
"""

from __future__ import annotations

import math
import random
import re
import sys
from collections.abc import Hashable
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    Field,
    StrictBool,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from tuneforge.core.fields import Strict
from tuneforge.core.kinds import KINDS, OutputSpec
from tuneforge.core.paths import ACCELERATE_CONFIGS, repo_root

EMBEDDED_BASE = "smollm2-135m-instruct"


READERS = ("chat_jsonl", "alpaca_jsonl", "prompt_completion_jsonl", "csv", "usaddress_xml", "sms_spam_lines")


def error_location(loc: tuple) -> str:
    """A validation error's location as the setting's path in params.yaml: pydantic puts the output kind's name
    (the union's tag) after `output`, which the file does not have."""
    parts = [str(p) for p in loc]
    for i in range(1, len(parts)):
        if parts[i - 1] == "output" and parts[i] in KINDS:
            del parts[i]
            break
    return ".".join(parts)


class TaskSpec(Strict):
    source: str = Field(description="path of the raw file, relative to the repository root")
    reader: Literal[READERS]  # type: ignore[valid-type]
    columns: dict[str, str] = Field(
        default_factory=dict, description="csv reader only: {'input': <column>, 'output': <column>}"
    )
    system_prompt: str = ""
    output: OutputSpec
    primary_metric: str = Field("", description="the metric gates and summaries use, e.g. micro_f1 or macro_f1; "
                                "empty: the output kind's first metric")
    max_new_tokens: int = Field(96, ge=1, description="generation budget for one answer")
    min_score: float | None = Field(None, ge=0, le=1, description="evaluation gate for this task; default evaluate.min_tuned_score")
    production_fraction: float = Field(
        0.0, ge=0.0, lt=0.5, description="share held out of every split as same-distribution traffic for drift"
    )
    production_source: str = Field(
        "", description="optional raw file of real traffic (JSONL with 'text'); used by the drift demo"
    )

    @field_validator("source", "production_source")
    @classmethod
    def _inside_the_repository(cls, path: str) -> str:
        """A data file is named relative to the repository root and stays inside it (the readers also refuse a
        symlink that leads out): its lines are copied into the quarantine file and the audit report."""
        if PurePosixPath(path).is_absolute() or PureWindowsPath(path).is_absolute() or ".." in PurePosixPath(path).parts:
            raise ValueError(f"{path!r} must be a path inside the repository, relative to its root, without '..'")
        return path

    @model_validator(mode="after")
    def _metric_fits_output(self) -> TaskSpec:
        known = [m for m in self.output.metric_functions() if m not in self.output.NOT_PRIMARY]
        if not self.primary_metric:
            self.primary_metric = known[0]
        if self.primary_metric not in known:
            raise ValueError(f"primary_metric {self.primary_metric!r} is not a {self.output.kind} metric; use one of {known}")
        return self

    @model_validator(mode="after")
    def _csv_needs_columns(self) -> TaskSpec:
        if self.reader == "csv" and not {"input", "output"} <= set(self.columns):
            raise ValueError("reader csv needs columns: {input: <column name>, output: <column name>}")
        if self.reader == "csv" and self.columns["input"] == self.columns["output"]:
            raise ValueError(f"columns.input and columns.output both name {self.columns['input']!r}: the answer would "
                             "be the input itself")
        return self


class ModelSpec(Strict):
    base: str = Field(EMBEDDED_BASE, description="'smollm2-135m-instruct', a local HF folder or a hub id")
    trust_remote_code: StrictBool = False  # StrictBool: a quoted "yes" or "false" must not turn into a bool
    chat_template: str = Field("", description="optional Jinja chat template file (relative to the repository root) "
                               "that replaces the base's own, e.g. one that renders tools= for a tool_call task")

    @field_validator("chat_template")
    @classmethod
    def _template_file_exists(cls, path: str) -> str:
        if path and not (repo_root() / path).is_file():
            raise ValueError(f"{path!r} is not a file under the repository root")
        return path


# NumPy's seeds (transformers' set_seed seeds it too) are 0 .. 2**32 - 1.
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]


class SplitSpec(Strict):
    seed: Seed = 13
    validation_fraction: float = Field(0.1, gt=0, lt=0.5)
    test_fraction: float = Field(0.1, gt=0, lt=0.5)


class AuditSpec(Strict):
    near_duplicate_jaccard: float = Field(0.8, gt=0, le=1, description="MinHash Jaccard above which two inputs are near duplicates")
    max_invalid_fraction: float = Field(0.02, ge=0, le=1, description="quarantined / all raw records")
    max_exact_leakage: int = Field(0, ge=0, description="inputs found verbatim in two splits")
    max_near_leakage_fraction: float = Field(0.05, ge=0, le=1, description="test+validation records with a near twin in train")
    max_over_length_fraction: float = Field(0.01, ge=0, le=1, description="records longer than train.max_seq_len tokens")
    max_pii_fraction: float = Field(0.1, ge=0, le=1, description="records with an email, phone or card-like number")
    min_records: int = Field(50, ge=1)


class LoraSpec(Strict):
    r: int = Field(16, ge=1, le=1024, description="rank: past ~1024 an adapter is no longer low-rank, only large")
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on each adapter's input; on a CPU its random masks "
                           "took a fifth of a training step, 0 ran it 1.4x faster (benchmarks/cpu_lora_dropout.py)")
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class TrainSpec(Strict):
    mode: Literal["auto", "qlora", "lora"] = Field(
        "auto", description="auto: on a GPU, LoRA in bf16 when the base fits comfortably (auto_lora_max_memory_share), "
        "else QLoRA; LoRA on a CPU")
    auto_lora_max_memory_share: float = Field(
        0.25, gt=0, le=1, description="auto: LoRA in bf16 when the bf16 weights take at most this share of free GPU "
        "memory (the rest holds activations, logits and optimizer state); QLoRA otherwise")
    max_seq_len: int = Field(256, ge=16)
    packing: StrictBool = True
    pad_to_multiple_of: int = Field(
        1, ge=1, description="batch widths rounded up to a multiple of this: on a GPU a fixed width lets cuDNN's "
        "attention reuse its plan (the GPU profile's 64); 1 pads to the widest row only")
    lora: LoraSpec = LoraSpec()
    learning_rate: float = Field(3e-3, gt=0)
    warmup_fraction: float = Field(0.05, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(
        1.0, ge=0, description="gradients clipped to this total norm before each optimizer step (transformers' "
        "Trainer's default); 0 or null: no clipping. The pre-clip norm goes into train_history.csv")
    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(144, ge=0, description="0: run the given epochs")
    batch_size: int = Field(4, ge=1, description="rows (packed sequences) per micro-batch, per process")
    grad_accum: int = Field(1, ge=1)
    gradient_checkpointing: Literal["auto"] | StrictBool = Field(
        False, description="recompute activations in the backward pass: less memory, ~25-35% slower. auto: on a GPU, "
        "only when the estimated activations would take more than auto_checkpointing_memory_share of the free memory; "
        "never on a CPU")
    auto_checkpointing_memory_share: float = Field(
        0.5, gt=0, le=1, description="gradient_checkpointing auto: checkpoint when the estimated activations of one "
        "micro-batch exceed this share of the GPU memory left after the weights")
    kernels: Literal["auto", "liger", "none"] = Field(
        "auto", description="auto: Liger's fused kernels (RMSNorm, SwiGLU, RoPE, fused linear cross-entropy) on a GPU "
        "when liger-kernel is installed (pip install 'tuneforge[gpu]'), else PyTorch's; none on a CPU. The choice and "
        "its reason go into train.json")
    attention: Literal["auto", "sdpa", "varlen"] = Field(
        "auto", description="auto: on a CUDA GPU, packed rows go through PyTorch's variable-length Flash attention "
        "(torch.nn.attention.varlen: each example attends within itself, no mask built) where the model's attention "
        "is plain causal; else transformers' SDPA with a block-diagonal mask (the CPU's path). The choice and its "
        "reason go into train.json")
    compile: Literal["auto"] | StrictBool = Field(
        "auto", description="torch.compile each decoder layer (the layers share one compiled graph). auto: on a GPU, "
        "once a few steps are timed, when the rest of the run would take long enough eager for compiling to pay "
        "(stages/train.py, COMPILE_PAYS_AFTER_SECONDS); eager on a CPU. The choice and its reason go into train.json")
    eval_every: int = Field(48, ge=1)
    eval_rows: int = Field(32, ge=1)
    early_stopping_patience: int = Field(3, ge=1)
    checkpoint_every: int = Field(48, ge=1)
    seed: Seed = 13
    num_processes: int = Field(1, ge=1, description=">1: the notebook runs `accelerate launch` on that many GPUs (DDP)")
    accelerate_config: str = Field(
        "", description="optional `accelerate config` file passed to `accelerate launch --config_file` (several GPUs "
        "or machines, DDP; a config that shards the model, FSDP or DeepSpeed, is refused): a file in accelerate/, "
        "which dvc.yaml lists as the training stages' dependency")

    @field_validator("accelerate_config")
    @classmethod
    def _config_in_its_folder(cls, path: str) -> str:
        """In accelerate/, the folder the training stages depend on: a config elsewhere could change without DVC
        rerunning the training it configures."""
        parts = PurePosixPath(path).parts
        if path and (len(parts) < 2 or parts[0] != ACCELERATE_CONFIGS or ".." in parts):
            raise ValueError(f"{path!r} must be a file in {ACCELERATE_CONFIGS}/ (e.g. {ACCELERATE_CONFIGS}/ddp.yaml): "
                             "dvc.yaml lists that folder as the training stages' dependency")
        return path

    task_overrides: dict[str, TrainOverrides] = Field(
        default_factory=dict, description="per task, settings that replace the ones above for that task's training, "
        "e.g. {sms_spam: {learning_rate: 4.0e-3}}: tasks differ in what recipe suits them")


def _optional(field) -> tuple:
    """A field's type with its bounds, made optional (None: unset), for create_model."""
    annotation = field.annotation | None
    return (Annotated[(annotation, *field.metadata)] if field.metadata else annotation,
            Field(None, description=field.description))


# The settings a task may set for itself: TrainSpec's own fields (types, bounds, descriptions), each optional.
OVERRIDABLE = ("learning_rate", "max_steps", "epochs", "warmup_fraction", "weight_decay", "lora",
               "early_stopping_patience")
TrainOverrides = create_model(
    "TrainOverrides", __base__=Strict,
    __doc__="One task's own settings over the train section's (unset: the section's).",
    **{name: _optional(TrainSpec.model_fields[name]) for name in OVERRIDABLE})
TrainSpec.model_rebuild()


def _slice_name(name: str) -> str:
    if name != "input_length" and not (name.startswith("metadata.") and len(name) > len("metadata.")):
        raise ValueError(f"{name!r} is not a slice: use input_length or metadata.<field>")
    return name


SliceName = Annotated[str, AfterValidator(_slice_name)]


class EvaluateSpec(Strict):
    max_rows: int = Field(0, ge=0, description="0: the whole test split")
    batch_size: int = Field(48, ge=1)
    min_tuned_score: float = Field(0.5, ge=0, le=1, description="gate: tuned primary metric at least this")
    max_regression: float = Field(0.0, ge=0, le=1, description="gate: tuned may trail base by at most this")
    compare_free: bool = Field(False, description="true: constrained tasks' tuned model also decodes without the "
                               "grammar (tuned_free_* metrics), one more generation pass")
    slices: list[SliceName] = Field(
        default_factory=lambda: ["input_length"], description="test rows grouped by each of these, the primary metric "
        "per group with its count and interval, the worst group named in the report: input_length (short, medium, "
        "long thirds of the test inputs by words) or metadata.<field> (a field the raw record carried, e.g. "
        "metadata.region)")


# The types llama.cpp's quantizer takes (core/quantize.py looks each up as llama_cpp.LLAMA_FTYPE_MOSTLY_<type>), as
# llama-cpp-python 0.3.36 names them. Written out rather than read from llama_cpp: every stage loads params, and
# training should not load llama.cpp's native libraries for it. tests/test_params.py checks the list against llama_cpp.
LLAMA_QUANTIZATION_TYPES = frozenset({
    "BF16", "F16", "IQ1_M", "IQ1_S", "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ3_M", "IQ3_S", "IQ3_XS", "IQ3_XXS",
    "IQ4_NL", "IQ4_XS", "MXFP4_MOE", "NVFP4", "Q1_0", "Q2_0", "Q2_K", "Q2_K_S", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q4_0",
    "Q4_1", "Q4_K_M", "Q4_K_S", "Q5_0", "Q5_1", "Q5_K_M", "Q5_K_S", "Q6_K", "Q8_0", "TQ1_0", "TQ2_0",
})


def _llama_quantization(name: str) -> str:
    """Refused when params.yaml loads, not when the export stage reaches it after training."""
    if name not in LLAMA_QUANTIZATION_TYPES:
        raise ValueError(f"{name!r} is not a type llama.cpp's quantizer knows; use one of "
                         f"{sorted(LLAMA_QUANTIZATION_TYPES)}")
    return name


QuantizationType = Annotated[str, AfterValidator(_llama_quantization)]


class ExportSpec(Strict):
    quantizations: list[QuantizationType] = Field(
        default_factory=lambda: ["Q8_0", "Q4_K_M"], min_length=1, description="llama.cpp types, e.g. Q8_0, Q4_K_M")
    max_rows: int = Field(80, ge=0, description="test rows each merged GGUF file answers (0: all); fewer rows, wider "
                          "intervals, so the gate below fails a file less readily")
    parity_rows: int = Field(24, ge=1, description="test rows for next-token agreement and KL; also the rows the base "
                             "+ adapter file answers (not gated)")
    gate_quantization: str = Field("smallest", description="'smallest': the gate vouches for (and serve runs) the "
                                   "smallest file that passes; or one type from quantizations")
    max_metric_drop: float = Field(0.03, ge=0, le=1, description="gate: a file fails when its drop of the primary "
                                   "metric below the f16 file (the fp32 HF model's twin), on the same rows, is beyond "
                                   "this at the low end of the paired 95% bootstrap interval; where the task routes, "
                                   "the same for its routed answers")
    min_top1_agreement: float = Field(0.95, ge=0, le=1, description="gate: next-token agreement with the HF model")
    imatrix_rows: int = Field(64, ge=0, description="training rows the importance matrix is collected on (0: none)")
    compare_without_imatrix: bool = Field(False, description="also build and measure each type without the importance "
                                          "matrix (for the report; not kept)")
    tensor_types: dict[str, str] = Field(default_factory=dict, description="per-tensor type overrides for every "
                                         "quantization: regex over GGUF tensor names -> ggml type")
    base_quantization: QuantizationType = Field("Q8_0", description="type of the base GGUF the task adapters run over "
                                   "(`tuneforge serve` without --task)")
    n_threads: int = Field(2, ge=1)

    @model_validator(mode="after")
    def _each_quantization_once(self) -> ExportSpec:
        repeated = sorted({q for q in self.quantizations if self.quantizations.count(q) > 1})
        if repeated:
            raise ValueError(f"export.quantizations lists {repeated} more than once")
        return self

    @model_validator(mode="after")
    def _gate_is_exported(self) -> ExportSpec:
        if self.gate_quantization not in ("smallest", *self.quantizations):
            raise ValueError(f"export.gate_quantization {self.gate_quantization!r} is neither 'smallest' nor in "
                             "export.quantizations")
        return self


class ServeSpec(Strict):
    """What `tuneforge serve` lets a client change. Everything else (system prompt, grammar, greedy decoding, the
    task's max_new_tokens) is served as it was evaluated, so drift judges the model, not the clients."""

    allow_client_max_tokens: StrictBool = Field(
        False, description="true: a client's max_tokens below the task's max_new_tokens is honoured (and logged; drift "
        "does not judge those answers); false: refused with 400")
    route: StrictBool = Field(
        True, description="true: where a task has a router (models/<task>/classical/router.json, label and json_object "
        "kinds), each request is answered by the fine-tune or the classical model, whichever the router expects to "
        "score higher, or deferred; false: the fine-tune answers every request (`tuneforge serve --no-route` for one "
        "run)")


class RouteSpec(Strict):
    """Routing each request between the fine-tune and the output kind's classical model (core/router.py), fitted by
    the evaluation stage on validation rows, for kinds whose classical model gives a confidence (label,
    json_object)."""

    max_deferral: float = Field(0.05, ge=0, lt=1, description="the most requests the router may defer to review "
                                "(set on validation): those where neither answerer is expected to score well")
    calibration_rows: int = Field(160, ge=0, description="validation rows both answerers are calibrated on (the "
                                  "tuned model answers them once more); 0: no routing")


class DriftSpec(Strict):
    max_drift_share: float = Field(0.5, gt=0, le=1, description="retrain when at least this share of columns drifted")
    max_validity_drop: float = Field(0.1, ge=0, le=1, description="retrain when valid answers fall by more than this")
    max_latency_p95_ms: float = Field(5000, gt=0, description="retrain (or rescale) when p95 latency exceeds this")
    min_rows: int = Field(30, ge=1, description="fewer current requests than this: no verdict")
    max_rows: int = Field(300, ge=1, description="judge the most recent requests only")


# Each sweep point is one DVC experiment, minutes to hours of training: past this many a sweep is a mistake (YAML
# aliases make a 10^7-point grid in a few lines), refused before any combination is built.
MAX_SWEEP_POINTS = 1000


class SweepSpec(Strict):
    """`tuneforge sweep`: DVC experiments over named settings, and the page comparing them."""

    method: Literal["grid", "random"] = Field("grid", description="grid: every combination; random: `samples` of them")
    samples: int = Field(4, ge=1, le=MAX_SWEEP_POINTS, description="random: how many distinct combinations to run")
    seed: Seed = Field(13, description="random: which combinations")
    name: str = Field("sweep", pattern=r"^[A-Za-z][A-Za-z0-9_-]*$", description="experiment name prefix: <name>-<i>")
    targets: list[str] = Field(default_factory=list, description="stages each experiment reproduces; empty: all")
    metric: str = Field(description="what 'best' means, as <metrics file>:<name>, e.g. metrics/address_json/eval.json:tuned_micro_f1")
    higher_is_better: bool = True
    settings: dict[str, list[Any]] = Field(description="dotted params.yaml key -> values to try")

    @model_validator(mode="after")
    def _settings_are_real(self) -> SweepSpec:
        if not self.settings:
            raise ValueError("sweep.settings is empty: name at least one setting and its values")
        for key, values in self.settings.items():
            if not values:
                raise ValueError(f"sweep.settings.{key}: give at least one value")
            if key.split(".")[0] == "sweep":
                raise ValueError(f"sweep.settings.{key}: a sweep cannot sweep its own settings")
            setting_path(key)  # raises on a name params.yaml does not have
        if ":" not in self.metric:
            raise ValueError(f"sweep.metric {self.metric!r}: write <metrics file>:<name>")
        return self

    @model_validator(mode="after")
    def _grid_is_runnable(self) -> SweepSpec:
        size = self.grid_size()
        axes = " x ".join(str(len(values)) for values in self.settings.values())
        if self.method == "grid" and size > MAX_SWEEP_POINTS:
            raise ValueError(f"sweep.settings make a grid of {size:,} combinations ({axes}), one experiment each; at "
                             f"most {MAX_SWEEP_POINTS:,}: try fewer values, or method: random with `samples`")
        if size > sys.maxsize:  # random.sample draws indices below len(range(size)), a C ssize_t
            raise ValueError(f"sweep.settings make a grid of {size:,} combinations ({axes}), too many to draw from")
        return self

    def grid_size(self) -> int:
        return math.prod(len(values) for values in self.settings.values())

    def points(self) -> list[dict[str, Any]]:
        """The combinations to run, in a stable order (grid: row-major; random: seeded draw without repeats).

        Built from their indices in the grid, never the whole grid: a random draw from a large grid costs only
        its samples (the same draw random.sample makes from the built grid)."""
        size = self.grid_size()
        if self.method == "grid":
            return [self.point(i) for i in range(size)]
        return [self.point(i) for i in random.Random(self.seed).sample(range(size), min(self.samples, size))]

    def point(self, index: int) -> dict[str, Any]:
        """The grid's combination at `index`, row-major (the last setting varies fastest, as itertools.product)."""
        values = {}
        for key, options in reversed(self.settings.items()):
            index, position = divmod(index, len(options))
            values[key] = options[position]
        return {key: values[key] for key in self.settings}


TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
# Folders other stages write beside the per-task ones (models/<task>, reports/<task>): a task of that name would
# share one with another stage's output, and DVC then refuses the whole pipeline (overlapping outputs).
# tests/test_params.py checks the list against dvc.yaml.
RESERVED_TASK_NAMES = {
    "base": "models/base, the base_model stage's output",
    "base_gguf": "models/base_gguf, the base_gguf stage's output",
    "model_cards": "reports/model_cards, the index stage's output",
}


class Params(Strict):
    model: ModelSpec = ModelSpec()
    split: SplitSpec = SplitSpec()
    tasks: dict[str, TaskSpec]
    audit: AuditSpec = AuditSpec()
    train: TrainSpec = TrainSpec()
    evaluate: EvaluateSpec = EvaluateSpec()
    export: ExportSpec = ExportSpec()
    drift: DriftSpec = DriftSpec()
    serve: ServeSpec = ServeSpec()
    route: RouteSpec = RouteSpec()
    sweep: SweepSpec | None = None

    def train_for(self, task: str) -> TrainSpec:
        """The train section with the task's own overrides (train.task_overrides) applied."""
        override = self.train.task_overrides.get(task)
        if override is None:
            return self.train
        return TrainSpec.model_validate({**self.train.model_dump(), **override.model_dump(exclude_none=True)})

    @model_validator(mode="after")
    def _overrides_name_tasks(self) -> Params:
        unknown = sorted(set(self.train.task_overrides) - set(self.tasks))
        if unknown:
            raise ValueError(f"train.task_overrides names {unknown}, which are not tasks (known: {sorted(self.tasks)})")
        return self

    def with_settings(self, settings: dict[str, Any]) -> Params:
        """A validated copy with dotted settings replaced, e.g. {"train.lora.r": 32}: what `dvc exp run -S` does."""
        raw = self.model_dump()
        for key, value in settings.items():
            *parents, leaf = setting_path(key)
            node, above = raw, None
            for part in parents:
                if part not in node and above == "task_overrides":  # a task's first override (the validator checks it)
                    node[part] = {}
                elif part not in node:
                    raise ParamsError(f"setting {key!r}: there is no task {part!r} under tasks (known: {sorted(node)})")
                node, above = node[part], part
            node[leaf] = value
        try:
            return Params.model_validate(raw)
        except ValidationError as err:
            raise ParamsError(f"settings {settings}: " + "; ".join(
                f"{error_location(e['loc'])}: {e['msg']}" for e in err.errors())) from None

    @field_validator("tasks", mode="before")
    @classmethod
    def _task_names_are_identifiers(cls, tasks: object) -> object:
        # A task name becomes a folder name (data/processed/<task>) and a word on a DVC command line:
        # checked before the specs, so `../x` is named as a bad name whatever its settings.
        if not isinstance(tasks, dict):
            return tasks  # pydantic names the wrong type
        bad = [name for name in tasks if not (isinstance(name, str) and TASK_NAME.fullmatch(name))]
        if bad:
            raise ValueError(f"task name(s) {bad} must match {TASK_NAME.pattern}: letters, digits, '_' and '-', "
                             "starting with a letter or digit, at most 64 characters")
        for name in tasks:
            # casefolded: on macOS' and Windows' file systems `Base` is the folder `base`
            if (taken := RESERVED_TASK_NAMES.get(name.casefold())) is not None:
                raise ValueError(f"task name {name!r} is taken: the task's folders would overlap {taken}; "
                                 "name the task otherwise")
        return tasks

    def task(self, name: str) -> TaskSpec:
        if name not in self.tasks:
            raise KeyError(f"task {name!r} is not declared under 'tasks' in params.yaml (known: {sorted(self.tasks)})")
        return self.tasks[name]


class ParamsError(ValueError):
    pass


def setting_path(key: str) -> list[str]:
    """Split a dotted setting name and check it against the schema, e.g. 'train.lora.r' -> ['train', 'lora', 'r'].

    Names under `tasks` need the task: 'tasks.address_json.system_prompt'.
    """
    parts = key.split(".")
    model: Any = Params
    i = 0
    while i < len(parts):
        fields = getattr(model, "model_fields", None)
        if fields is None or parts[i] not in fields:
            known = sorted(fields) if fields else []
            raise ValueError(f"setting {key!r}: {parts[i]!r} is not a setting here (known: {known})")
        annotation = fields[parts[i]].annotation
        i += 1
        if (model, parts[i - 1]) in ((Params, "tasks"), (TrainSpec, "task_overrides")):
            if i >= len(parts):
                raise ValueError(f"setting {key!r}: name a task and its setting, e.g. {key}.<task>.<setting>")
            i += 1  # the task's name
            annotation = TaskSpec if model is Params else TrainOverrides
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        if model is None and i < len(parts):
            raise ValueError(f"setting {key!r}: {'.'.join(parts[:i])} has no sub-settings")
    if model is not None:
        raise ValueError(f"setting {key!r} is a section; name one of its settings ({sorted(model.model_fields)})")
    return parts


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error: plain YAML keeps the
    last one silently, so a second `train:` section would replace the first."""

    def construct_mapping(self, node, deep=False):
        seen: dict[object, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` merges may repeat keys by design
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if not isinstance(key, Hashable):
                continue  # SafeLoader reports unhashable keys itself
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {seen[key]})", key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; relative paths resolve against the repository root."""
    path = Path(path)
    if not path.is_absolute():
        path = repo_root() / path
    return load_params_text(path.read_text(encoding="utf-8"), path)


def load_params_text(text: str, path: Path) -> Params:
    """Validate params.yaml's text; `path` names the file in error messages."""
    try:
        raw = yaml.load(text, Loader=UniqueKeyLoader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ParamsError(f"{where}: not valid YAML: {err.problem or err.context}") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: the top level must be a mapping of sections (model:, tasks:, train:, ...), "
                          f"got a {type(raw).__name__}")
    unknown = sorted(set(raw) - set(Params.model_fields))
    if unknown:  # a typo such as `trian:` would otherwise run silently with defaults
        raise ParamsError(f"{path}: unknown section(s) {unknown}; known: {sorted(Params.model_fields)}")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        lines = [f"{path}: invalid settings"]
        for e in err.errors():
            where = error_location(e["loc"])
            lines.append(f"  {where}: {e['msg']}")
        raise ParamsError("\n".join(lines)) from None


def only_tasks(raw: dict, names) -> dict:
    """A params.yaml mapping (as loaded by yaml) narrowed to the named tasks, their train.task_overrides with them:
    an override of a task that is gone would be an error."""
    names = list(names)
    raw["tasks"] = {name: raw["tasks"][name] for name in names}
    overrides = raw.get("train", {}).get("task_overrides")
    if overrides:
        raw["train"]["task_overrides"] = {name: v for name, v in overrides.items() if name in names}
    return raw


def profiles_dir() -> Path:
    return repo_root() / "profiles"


def _key_line(lines: list[str], section: str, key: str, where: Path) -> int:
    """Index of the one line holding `key:` inside the top-level `section`, located by ruamel.yaml's parser (which
    records where each key sits), so comments, flow mappings and quoting never confuse it."""
    from ruamel.yaml import YAML

    document = YAML().load("".join(lines))
    mapping = document.get(section) if isinstance(document, dict) else None
    if not isinstance(mapping, dict):
        raise ParamsError(f"{where}: no section {section!r}")
    if key not in mapping:
        raise ParamsError(f"{where}: no setting {section}.{key}")
    keys, sections = list(mapping), list(document)
    line = mapping.lc.key(key)[0]
    later = keys.index(key) + 1
    if later < len(keys):
        end = mapping.lc.key(keys[later])[0]
    elif sections.index(section) + 1 < len(sections):
        end = document.lc.key(sections[sections.index(section) + 1])[0]
    else:
        end = len(lines)
    if any(text.strip() and not text.lstrip().startswith("#") for text in lines[line + 1 : end]):
        raise ParamsError(f"{where}:{line + 1}: {section}.{key} spans several lines; profiles replace one-line settings")
    return line


def apply_profile(name: str, path: str | Path = "params.yaml") -> list[str]:
    """Write the settings of profiles/<name>.yaml into params.yaml.

    Each setting the profile lists (`section: {key: value}`) replaces that setting's line in params.yaml,
    comment included; every other line stays byte for byte. The result is validated before it is
    written. Returns the changes, as `section.key: old -> new`.
    """
    path = Path(path) if Path(path).is_absolute() else repo_root() / path
    profile_file = profiles_dir() / f"{name}.yaml"
    if not profile_file.exists():
        known = sorted(p.stem for p in profiles_dir().glob("*.yaml"))
        raise ParamsError(f"{profile_file}: no such profile (known: {known})")
    profile_lines = profile_file.read_text(encoding="utf-8").splitlines(keepends=True)
    profile = yaml.safe_load("".join(profile_lines)) or {}
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    before = yaml.safe_load("".join(lines))
    changed = []
    for section, settings in profile.items():
        for key, value in settings.items():
            new_line = profile_lines[_key_line(profile_lines, section, key, profile_file)]
            lines[_key_line(lines, section, key, path)] = new_line if new_line.endswith("\n") else new_line + "\n"
            if before[section][key] != value:
                changed.append(f"{section}.{key}: {before[section][key]} -> {value}")
    text = "".join(lines)
    load_params_text(text, path)
    after = yaml.safe_load(text)
    assert all(after[s][k] == v for s, settings in profile.items() for k, v in settings.items())
    path.write_text(text, encoding="utf-8")
    return changed
