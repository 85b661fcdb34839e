"""reports/index.html, the page a stakeholder opens first, and a model card per task (Hugging Face format).

Per task the page answers three questions, each from the metrics JSON the stages wrote (metrics/<task>/*.json):
is it good (one plain sentence, a chart of base vs classical baseline vs tuned), is it safe to ship (the gates),
what changed (every headline number against the metrics committed at HEAD). Plain HTML and inline SVG, no
scripts: it renders offline. Templates are in report/templates/.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import yaml
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup

from tuneforge.core.metrics import Interval
from tuneforge.core.params import EMBEDDED_BASE, Params, TaskSpec, load_params
from tuneforge.core.paths import PIPELINE, STAGE_METRICS, repo_root, task_gguf_file

TEMPLATES = Path(__file__).parent / "templates"
MODEL_CARDS = Path("reports") / "model_cards"  # <task>/README.md (the card) and <task>/model_card.html

# (report file, title): each per-task stage's report, in pipeline order, and the drift stage's full Evidently page.
STAGES = [*((f"{s.notebook}.html", s.title) for s in PIPELINE if s.notebook),
          ("05_drift_evidently.html", "Drift (Evidently, full)")]

# The params.yaml sections the page shows: the index stage's params in dvc.yaml, so the page is never stale. (Audit
# and drift thresholds are in those stages' reports; a change there reruns the stage, not necessarily the index.)
PARAMS_SHOWN = ("model", "tasks", "train", "evaluate", "export", "route", "serve")

# The embedded default is a GGUF conversion of this hub model (Apache-2.0, as its model card says).
EMBEDDED_HUB_ID, EMBEDDED_LICENSE = "HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"

METRIC_NAMES = {"micro_f1": "micro-F1", "macro_f1": "macro-F1", "exact_match": "exact match", "accuracy": "accuracy",
                "valid_json": "valid JSON", "valid_label": "valid label", "allowed_keys_only": "allowed keys only",
                "micro_precision": "micro precision", "micro_recall": "micro recall",
                "hallucination_rate": "invented values", "valid_answer": "valid answers",
                "chrf": "chrF", "bleu": "BLEU", "rouge_l": "ROUGE-L", "length_ratio": "length ratio",
                "format_pass": "format rules met", "field_f1": "field F1", "schema_valid": "schema-valid",
                "field_precision": "field precision", "field_recall": "field recall", "invented_values": "invented values",
                "tool_accuracy": "right tool", "arguments_exact": "exact arguments", "arguments_f1": "arguments F1",
                "valid_call": "valid calls", "no_call_accuracy": "right no-call"}
# Shares of the test records, shown as percentages; the others (F1, precision, recall) as 0-1 scores.
SHARES = {"exact_match", "accuracy", "valid_json", "valid_label", "valid_answer", "allowed_keys_only", "format_pass",
          "schema_valid", "invented_values", "tool_accuracy", "arguments_exact", "valid_call", "no_call_accuracy",
          "hallucination_rate", "drift_share", "invalid_fraction", "near_leakage_fraction", "pii_fraction",
          "over_length_fraction", "share"}  # "share": any other fraction shown as a percentage
# The share of answers that fit the task's output contract (the output kind's answer_problem), for every kind.
VALIDITY = "valid_answer"
SERIES_COLORS = {"base": "#9aa0a6", "baseline": "#e0a030", "tuned": "#1f6feb"}


def chart_layout(groups: list[dict], subject: str) -> dict:
    """Positions for report/templates/_chart.html: metric names on the left, one bar a model, 0-1 scale."""
    left, bar_width, bar_height, gap, group_gap = 110, 260, 14, 3, 14

    def x(value: float) -> float:
        return round(max(0.0, min(1.0, value)) * bar_width, 1)

    y, placed = 34, []
    for group in groups:
        bars = []
        for i, bar in enumerate(group["bars"]):
            interval = bar.get("interval")
            whisker = None if interval is None else (left + x(interval.low), left + x(interval.high))
            bars.append({**bar, "y": y + i * (bar_height + gap), "width": x(bar["value"]), "whisker": whisker,
                         "text_x": max(left + x(bar["value"]), whisker[1] if whisker else 0) + 4,
                         "color": SERIES_COLORS[bar["series"]]})
        bottom = y + len(bars) * (bar_height + gap) - gap
        placed.append({**group, "bars": bars, "top": y, "bottom": bottom, "label_y": (y + bottom) / 2 + 4,
                       "gate_x": None if group["gate"] is None else left + group["gate"] * bar_width})
        y = bottom + group_gap
    series = list(dict.fromkeys(bar["series"] for group in groups for bar in group["bars"]))
    labels = {bar["series"]: bar["label"] for group in groups for bar in group["bars"]}
    legend, x = [], 0
    for s in series:  # side by side, each as wide as its label (about 7 pixels a character at 12 px)
        legend.append({"series": s, "label": labels[s], "color": SERIES_COLORS[s], "x": x})
        x += 15 + 7 * len(labels[s]) + 16
    title = f"{subject}: {', '.join(labels[s] for s in series)} on the test split"
    return {"title": title, "groups": placed, "legend": legend, "left": left, "top": 34, "bar_width": bar_width,
            "bar_height": bar_height, "width": max(left + bar_width + 70, x), "height": y + 4}


def metric_name(metric: str) -> str:
    return METRIC_NAMES.get(metric, metric.replace("_", " "))


def fmt(value, metric: str = "") -> str:
    """A metric's value as a stakeholder reads it: 52%, 0.48; '–' when missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if metric in SHARES:
        return f"{value:.0%}" if value in (0, 1) or 0.1 <= value <= 0.99 else f"{value:.1%}"  # 99.5% is not 100%
    if isinstance(value, int):
        return f"{value:,}"
    size = abs(value)  # about three significant digits: 0.484, 2.01, 88.1, 381
    return f"{value:.3f}" if size < 1 else f"{value:.2f}" if size < 10 else f"{value:.1f}" if size < 100 else f"{value:,.0f}"


def with_interval(value, interval: Interval | None, metric: str = "") -> str:
    """A headline number and, when its metrics file has one, its interval: "0.787 (95% CI 0.742–0.831)"."""
    if interval is None:
        return fmt(value, metric)
    return interval.describe(lambda v: fmt(v, metric))


def signed(value, interval: Interval | None = None) -> str:
    """A difference with its sign, and its interval when there is one: "-0.030 (95% CI -0.061 to +0.000)"."""
    if value is None:
        return "–"
    form = "{:+.3f}".format
    return form(value) if interval is None else interval.describe(form)


def metric_of(key: str) -> str:
    """The metric a metrics-file key holds ("Q8_0_micro_f1" -> "micro_f1"), for formatting."""
    return next((m for m in sorted(SHARES | set(METRIC_NAMES), key=len, reverse=True) if key.endswith(m)), key)


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _git(root: Path, *args: str) -> str | None:
    if shutil.which("git") is None:  # no git on the machine: nothing committed to compare with
        return None
    result = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    return result.stdout if result.returncode == 0 else None


def committed_metrics(root: Path, task: str) -> tuple[str | None, dict[str, dict]]:
    """(HEAD's short hash, {stage: metrics}) as committed at HEAD; (None, {}) outside git or before any commit.

    Read with git, not `dvc metrics diff`: the index runs inside `dvc repro`, which holds DVC's lock.
    """
    head = _git(root, "rev-parse", "--short", "HEAD")
    if head is None:
        return None, {}
    found = {}
    for name in STAGE_METRICS:
        text = _git(root, "show", f"HEAD:./metrics/{task}/{name}.json")
        if text:
            found[name] = json.loads(text)
    return head.strip(), found


@dataclass
class Row:
    """One headline number, now and at HEAD."""

    label: str
    now: object
    before: object = None
    metric: str = ""          # decides the format (shares as %)
    better: str | None = None  # "higher", "lower" or None (neither is better: speed on a shared CPU, sizes)
    unit: str = ""
    interval: Interval | None = None  # the number's interval now, when its metrics file has one

    @property
    def ci(self) -> str:
        """"95% CI 0.742–0.831", or '' without an interval."""
        return self.interval.bounds(lambda v: fmt(v, self.metric)) if self.interval else ""

    @property
    def changed(self) -> bool:
        return self.before is not None and self.now is not None and self.before != self.now

    @property
    def change(self) -> str:
        if self.before is None or self.now is None:
            return ""
        if isinstance(self.now, bool) or not isinstance(self.now, (int, float)):
            return "" if self.now == self.before else f"was {fmt(self.before, self.metric)}"
        delta = self.now - self.before
        if abs(delta) < 1e-12:
            return "same"
        if self.metric in SHARES:
            return f"{delta * 100:+.1f} points"
        return f"{delta:+,.3f}" if abs(delta) < 10 else f"{delta:+,.0f}"

    @property
    def tone(self) -> str:
        """good / bad / same / '' (not comparable or neither direction is better)."""
        if not self.changed or isinstance(self.now, bool) or not isinstance(self.now, (int, float)):
            return "same" if self.before is not None and self.now == self.before else ""
        if self.better is None:
            return ""
        return "good" if (self.now > self.before) == (self.better == "higher") else "bad"


@dataclass
class Gate:
    name: str
    passed: bool | None  # None: the stage has not run
    detail: str
    before: bool | None = None
    reasons: list[str] = field(default_factory=list)
    labels: tuple[str, str] = ("PASS", "FAIL")


@dataclass
class TaskReport:
    """Everything the page and the model card say about one task, derived from its metrics and params."""

    root: Path
    name: str
    spec: TaskSpec
    params: Params
    metrics: dict[str, dict]
    previous: dict[str, dict]
    head: str | None

    @property
    def recipe(self):
        """The train settings this task trained with (the train section and its task_overrides)."""
        return self.params.train_for(self.name)

    def committed(self, stage: str, key: str):
        """A number as committed at HEAD (None when it was not)."""
        return self.previous.get(stage, {}).get(key)

    def interval(self, stage: str, key: str) -> Interval | None:
        """A number's interval as its stage wrote it; None for metrics written before intervals were."""
        return Interval.from_metrics(self.metrics[stage], key)

    @property
    def audit(self) -> dict:
        return self.metrics["audit"]

    @property
    def train(self) -> dict:
        return self.metrics["train"]

    @property
    def eval(self) -> dict:
        return self.metrics["eval"]

    @property
    def export(self) -> dict:
        return self.metrics["export"]

    @property
    def drift(self) -> dict:
        return self.metrics["drift"]

    @property
    def primary(self) -> str:
        return self.spec.primary_metric

    @property
    def served(self) -> str:
        """The file the export gate vouched for (the smallest that passed, unless params name one)."""
        return self.export.get("served_quantization") or self.params.export.quantizations[0]

    @property
    def plain_metric(self) -> str:
        metric = self.spec.output.plain_metric
        return metric if f"tuned_{metric}" in self.eval else self.primary

    @property
    def min_score(self) -> float:
        return self.spec.min_score if self.spec.min_score is not None else self.params.evaluate.min_tuned_score

    # --- is it good ---

    def headline(self) -> str:
        """One plain sentence: the served system's whole-answer quality where the task routes, the tuned model's
        against the base (and the baseline), then whether the file for phones and laptops keeps the gated score."""
        ev, ex = self.eval, self.export
        if f"tuned_{self.primary}" not in ev:
            return "Not evaluated yet: run `dvc repro` to train and evaluate this task."
        metric = self.plain_metric
        tuned, base = ev[f"tuned_{metric}"], ev.get(f"base_{metric}")
        tuned_text = with_interval(tuned, self.interval("eval", f"tuned_{metric}"), metric)
        if metric == self.spec.output.plain_metric:
            what = self.spec.output.plain_sentence.format(share=tuned_text, n=fmt(ev.get("test_rows")))
        else:
            what = f"scores {tuned_text} {metric_name(metric)} on {fmt(ev.get('test_rows'))} test inputs"
        sentence = f"The fine-tuned model {what}"
        routed = ev.get(f"routed_{metric}") if self.params.serve.route else None
        if routed is not None:  # the served system first: serve routes each request (core/router.py)
            routed_text = with_interval(routed, self.interval("eval", f"routed_{metric}"), metric)
            routed_what = (self.spec.output.plain_sentence.format(share=routed_text, n=fmt(ev.get("test_rows")))
                           if metric == self.spec.output.plain_metric else
                           f"scores {routed_text} {metric_name(metric)} on {fmt(ev.get('test_rows'))} test inputs")
            sentence = (f"As served, each request answered by the fine-tune or the classical model, whichever is expected "
                        f"to score higher, the system {routed_what} when it answers every one (it defers "
                        f"{fmt(ev.get('routed_deferred_share'), 'share')} of them to review at route.max_deferral); the "
                        f"fine-tuned model alone {what}")
        if base is not None:
            sentence += (", the same as before fine-tuning" if fmt(base, metric) == fmt(tuned, metric)
                         else f", {'up' if tuned > base else 'down'} from {fmt(base, metric)} before fine-tuning")
        baseline = ev.get(f"baseline_{metric}")
        if baseline is not None:
            sentence += f" (a classical model without an LLM: {fmt(baseline, metric)})"
        size, q_score, hf = ex.get(f"{self.served}_size_mb"), ex.get(f"{self.served}_{self.primary}"), ex.get(f"hf_{self.primary}")
        if size is not None and q_score is not None and hf is not None:
            name = metric_name(self.primary)
            sentence += (f"; the {size:.0f} MB {self.served} file for phones and laptops "
                         + ("keeps that quality" if ex.get("gate_passed") else "loses quality")
                         + f" ({name} {fmt(q_score)} against the full model's {fmt(hf)} on {self.export_rows()} inputs")
            delta = self.interval("export", f"{self.served}_delta")
            if delta is not None:
                sentence += f"; {signed(delta.estimate)} against its f16 twin, {delta.bounds('{:+.3f}'.format)}"
            routed_delta = self.interval("export", f"{self.served}_routed_delta")
            if routed_delta is not None:
                sentence += (f"; routed as served, {signed(routed_delta.estimate)} against the f16 twin's routed answers, "
                             f"{routed_delta.bounds('{:+.3f}'.format)}")
            sentence += ")"
        return sentence + "."

    def export_rows(self) -> str:
        """How many test rows decided the export gate: "80 of the 141" (export.max_rows), or "141"."""
        rows, of = self.export.get("rows"), self.export.get("test_rows")
        return f"{fmt(rows)} of the {fmt(of)}" if of is not None and of != rows else fmt(rows)

    def chart(self) -> dict:
        """The bar chart: the primary metric, the plain one and answer validity, each as base / classical baseline
        (when evaluated) / tuned, all on a 0-1 scale, with a whisker for each interval in eval.json; the evaluation
        gate marked on the primary metric."""
        metrics = list(dict.fromkeys([self.primary, self.plain_metric, VALIDITY]))
        groups = []
        for metric in metrics:
            bars = [(who, label, self.eval.get(f"{who}_{metric}")) for who, label in
                    (("base", "base model"), ("baseline", "classical baseline"), ("tuned", "fine-tuned"))]
            bars = [{"series": who, "label": label, "value": v, "text": fmt(v, metric),
                     "interval": self.interval("eval", f"{who}_{metric}"),
                     "detail": with_interval(v, self.interval("eval", f"{who}_{metric}"), metric)}
                    for who, label, v in bars if isinstance(v, (int, float))]
            if bars:
                groups.append({"metric": metric_name(metric), "bars": bars,
                               "gate": self.min_score if metric == self.primary else None})
        return chart_layout(groups, self.name)

    # --- is it safe to ship ---

    def gates(self) -> list[Gate]:
        audit, ev, ex, dr, old = self.audit, self.eval, self.export, self.drift, self.committed
        gates = [
            Gate("Data audit", audit.get("gate_passed"),
                 f"{fmt(audit.get('train_records'))} training records, {fmt(audit.get('quarantined'))} quarantined, "
                 f"{fmt(audit.get('exact_leakage'))} test inputs also in train" if audit else "",
                 old("audit", "gate_passed")),
            Gate("Evaluation", ev.get("gate_passed"), self._evaluation_gate() if ev else "", old("eval", "gate_passed")),
            Gate(f"GGUF {self.served} file", ex.get("gate_passed"),
                 self._export_gate() if f"{self.served}_{self.primary}" in ex else "", old("export", "gate_passed")),
        ]
        retrain, before = dr.get("retrain"), old("drift", "retrain")
        detail = (f"{fmt(dr.get('drifted_columns'))} of {fmt(dr.get('columns_checked'))} monitored columns drifted "
                  f"over the last {fmt(dr.get('current_rows'))} requests" if dr.get("columns_checked") else "")
        if dr and dr.get("current_rows", 0) < self.params.drift.min_rows:  # the drift stage judged nothing
            retrain, detail = None, f"{fmt(dr.get('current_rows', 0))} requests logged: too few to judge"
        gates.append(Gate("Live traffic (drift)", None if retrain is None else not retrain, detail,
                          None if before is None else not before, dr.get("reasons", []), ("no drift", "RETRAIN")))
        return gates

    def _evaluation_gate(self) -> str:
        name, ev = self.primary, self.eval
        tuned = self.interval("eval", f"tuned_{name}")
        detail = (f"tuned {metric_name(name)} {with_interval(ev.get(f'tuned_{name}'), tuned)}, at least "
                  f"{fmt(self.min_score)} required")
        delta = self.interval("eval", f"delta_{name}")
        if delta is not None:
            detail += f"; tuned − base {signed(delta.estimate, delta)}"
        return detail + ("; fails only when the whole interval misses" if tuned is not None else "")

    def _export_gate(self) -> str:
        ex, served, allowed = self.export, self.served, fmt(self.params.export.max_metric_drop)
        detail = (f"{metric_name(self.primary)} {fmt(ex.get(f'{served}_{self.primary}'))} against the full model's "
                  f"{fmt(ex.get(f'hf_{self.primary}'))}")
        delta = self.interval("export", f"{served}_delta")
        if delta is None:
            return detail + f", at most {allowed} lower allowed"
        return (detail + f"; {signed(delta.estimate, delta)} against the f16 file on {self.export_rows()} test rows: "
                f"fails only when the whole interval is more than {allowed} lower")

    def verdict(self) -> str:
        gates = self.gates()
        failed = [g.name.lower() for g in gates[:3] if g.passed is False]
        missing = [g.name.lower() for g in gates[:3] if g.passed is None]
        if failed:
            return f"Not ready to ship: the {', '.join(failed)} gate{'s' if len(failed) > 1 else ''} failed."
        if missing:
            return f"Not ready to ship: {', '.join(missing)} not run yet."
        if gates[3].passed is False:
            return "Shipped model needs attention: live traffic has drifted from the test data; retrain on recent traffic."
        return "Safe to ship: every gate passes" + (" and live traffic looks like the test data." if gates[3].passed
                                                    else "; no verdict on live traffic yet.")

    # --- what changed ---

    def rows(self) -> list[Row]:
        ev, ex, tr, au, dr, old = self.eval, self.export, self.train, self.audit, self.drift, self.committed
        primary, plain, served = self.primary, self.plain_metric, self.served

        def evaluated(label: str, key: str, metric: str, better: str | None = None) -> Row:
            return Row(label, ev.get(key), old("eval", key), metric, better, interval=self.interval("eval", key))

        rows = [evaluated(f"fine-tuned {metric_name(primary)}", f"tuned_{primary}", primary, "higher")]
        if plain != primary:
            rows.append(evaluated(f"fine-tuned {metric_name(plain)}", f"tuned_{plain}", plain, "higher"))
        if f"baseline_{primary}" in ev:
            rows.append(evaluated(f"classical baseline {metric_name(primary)}", f"baseline_{primary}", primary))
        if f"routed_{primary}" in ev:
            rows.append(evaluated(f"routed, fine-tune or classical {metric_name(primary)}", f"routed_{primary}", primary))
        rows += [
            evaluated(f"base model {metric_name(primary)}", f"base_{primary}", primary),
            Row("validation loss after training", tr.get("best_eval_loss"), old("train", "best_eval_loss"), better="lower"),
            Row("training time", tr.get("wall_seconds"), old("train", "wall_seconds"), unit="s"),
            Row("training records", au.get("train_records"), old("audit", "train_records")),
            Row("quarantined records", au.get("quarantined"), old("audit", "quarantined"), better="lower"),
            Row(f"GGUF {served} {metric_name(primary)}", ex.get(f"{served}_{primary}"), old("export", f"{served}_{primary}"),
                primary, "higher"),
            Row(f"GGUF {served} against the f16 file", ex.get(f"{served}_delta"), old("export", f"{served}_delta"),
                better="higher", interval=self.interval("export", f"{served}_delta")),
            Row(f"GGUF {served} size", ex.get(f"{served}_size_mb"), old("export", f"{served}_size_mb"), unit="MB"),
            Row(f"GGUF {served} generation speed (CPU)", ex.get(f"{served}_generation_tokens_per_second"),
                old("export", f"{served}_generation_tokens_per_second"), unit="tokens/s"),
            Row("monitored columns drifted", dr.get("drift_share"), old("drift", "drift_share"), "drift_share", "lower"),
        ]
        return rows

    def all_changes(self) -> list[tuple[str, str, str]]:
        """Every number in the metrics files that differs from HEAD's: (stage.key, before, now)."""
        out = []
        for stage in STAGE_METRICS:
            now, before = self.metrics[stage], self.previous.get(stage, {})
            for key in sorted(set(now) | set(before)):
                a, b = before.get(key), now.get(key)
                if a != b and all(isinstance(v, (int, float, bool, type(None))) for v in (a, b)):
                    out.append((f"{stage}.{key}", fmt(a, metric_of(key)), fmt(b, metric_of(key))))
        return out

    def change_summary(self) -> str:
        if self.head is None:
            return "Not a git checkout: nothing to compare with."
        if not self.previous:
            return f"No metrics committed at {self.head} (HEAD): this is the first run to compare against."
        n = len(self.all_changes())
        return (f"Against the metrics committed at {self.head} (HEAD): "
                + ("nothing changed." if n == 0 else f"{n} number{'s' if n > 1 else ''} changed."))

    # --- the model card ---

    def card_metadata(self) -> dict:
        """The model card's YAML header: the keys the Hugging Face hub reads."""
        base = self.params.model.base
        meta: dict = {}
        if base == EMBEDDED_BASE:
            meta["base_model"], meta["license"] = EMBEDDED_HUB_ID, EMBEDDED_LICENSE
        elif not ((self.root / base).exists() or base.startswith((".", "/", "~"))):
            meta["base_model"], meta["license"] = base, "other"  # a hub id: its licence binds this fine-tune
        else:
            meta["license"] = "other"
        meta["library_name"] = "gguf"
        meta["pipeline_tag"] = "text-generation"
        meta["tags"] = ["tuneforge", "lora", "gguf", self.name]
        meta["datasets"] = [self.spec.source]
        measured = [m for m in dict.fromkeys([self.primary, self.plain_metric, VALIDITY])
                    if f"tuned_{m}" in self.eval]
        meta["metrics"] = measured
        if measured:
            results = [{"task": {"type": "text-generation", "name": self.spec.system_prompt or self.name},
                        "dataset": {"name": f"{self.name} test split", "type": self.spec.source, "split": "test"},
                        "metrics": [{"type": m, "name": f"{metric_name(m)} (fine-tuned)", "value": round(self.eval[f"tuned_{m}"], 4)}
                                    for m in measured]}]
            if f"{self.served}_{self.primary}" in self.export:
                results.append({"task": {"type": "text-generation", "name": f"{self.name}, GGUF {self.served}"},
                                "dataset": {"name": f"{self.name} test split, first {self.export.get('rows')} rows",
                                            "type": self.spec.source, "split": "test"},
                                "metrics": [{"type": self.primary, "name": f"{metric_name(self.primary)} ({self.served})",
                                             "value": round(self.export[f"{self.served}_{self.primary}"], 4)}]})
            meta["model-index"] = [{"name": f"tuneforge-{self.name}", "results": results}]
        return meta

    @property
    def has_baseline(self) -> bool:
        return f"baseline_{self.primary}" in self.eval

    def eval_table(self) -> list[dict]:
        """Every 0-1 metric of the evaluation: base, classical baseline (when evaluated), fine-tuned; with its interval
        where eval.json has one (the primary and the plain metric)."""
        names = [k.removeprefix("tuned_") for k, v in self.eval.items()
                 if k.startswith("tuned_") and not k.startswith("tuned_free_") and isinstance(v, (int, float))
                 and 0 <= v <= 1 and f"base_{k.removeprefix('tuned_')}" in self.eval]
        return [{"metric": metric_name(m), **{who: with_interval(self.eval.get(f"{who}_{m}"),
                                                                 self.interval("eval", f"{who}_{m}"), m)
                                              for who in ("base", "baseline", "tuned")}}
                for m in names]

    def tuning_effect(self) -> str:
        """The paired difference tuned - base of the primary metric, with its interval ('' before intervals)."""
        delta = self.interval("eval", f"delta_{self.primary}")
        return "" if delta is None else signed(delta.estimate, delta)

    def gguf_files(self) -> list[dict]:
        ex = self.export
        return [{"name": q, "file": task_gguf_file(self.name, q).relative_to(repo_root()).as_posix(),
                 "size_mb": ex[f"{q}_size_mb"],
                 "score": fmt(ex.get(f"{q}_{self.primary}")),
                 "delta": signed(ex.get(f"{q}_delta"), self.interval("export", f"{q}_delta")),
                 "agreement": ex.get(f"{q}_top1_agreement"), "tokens_per_second": ex.get(f"{q}_generation_tokens_per_second"),
                 "served": q == self.served}
                for q in ["f16", *self.params.export.quantizations] if f"{q}_size_mb" in ex]

    def weakest_slices(self) -> list[str]:
        """A sentence for each evaluation slice (evaluate.slices): the group the fine-tuned model does worst on."""
        out, metric = [], self.primary
        for name, found in (self.eval.get("slices") or {}).items():
            worst = found.get("worst")
            if worst is None:
                continue
            group = found["groups"][worst]
            others = ", ".join(f"{g} {fmt(v[metric], metric)}" for g, v in found["groups"].items() if g != worst)
            out.append(f"By {name.replace('_', ' ')}, it does worst on {worst}: {metric_name(metric)} "
                       f"{with_interval(group[metric], Interval.from_metrics(group, metric), metric)} on {group['n']} "
                       f"rows (other groups: {others}).")
        return out

    def routing(self) -> str:
        """What routing each request between the fine-tune and the classical model achieved on the test split
        (evaluation stage, core/router.py), or "" where the task has no router."""
        ev, metric = self.eval, self.primary
        if f"routed_{metric}" not in ev:
            return ""
        name = metric_name(metric)
        gain = self.interval("eval", f"routed_gain_{metric}")
        better = "the fine-tune" if ev.get("routed_better_part") == "tuned" else "the classical model"
        sentence = (f"Routing each request to the fine-tune or the classical model, whichever is expected to score "
                    f"higher, scores {name} {with_interval(ev[f'routed_{metric}'], self.interval('eval', f'routed_{metric}'), metric)}"
                    f", {ev[f'routed_gain_{metric}']:+.3f} against {better} alone"
                    + (f" (paired 95% CI {gain.low:+.3f} to {gain.high:+.3f})" if gain else "")
                    + f"; the fine-tune answers {fmt(ev.get('routed_fine_tune_share'), 'share')} of requests")
        oracle = ev.get(f"routed_oracle_{metric}")
        if oracle is not None:  # the headroom: the two answers differ on few requests, or the router chose badly
            sentence += (f" (choosing the better of the two answers for every request would reach {fmt(oracle)}; they "
                         f"score differently on {fmt(ev.get('routed_scores_differ_share'), 'share')} of requests)")
        answered = ev.get(f"routed_answered_{metric}")
        if answered is not None:
            sentence += (f"; deferring up to {fmt(ev.get('routed_max_deferral'), 'share')} to review defers "
                         f"{fmt(ev.get('routed_deferred_share'), 'share')} of test requests and scores "
                         f"{with_interval(answered, self.interval('eval', f'routed_answered_{metric}'), metric)} on the rest")
        return sentence + (". `tuneforge serve` routes the same way, with the file the export gate chose." if
                           self.params.serve.route else ". `tuneforge serve` does not route: serve.route is off.")

    def limitations(self) -> list[str]:
        """What a user should know before relying on the model, each from a measured number."""
        ev, ex, tr, out = self.eval, self.export, self.train, []
        n, plain = ev.get("test_rows"), self.plain_metric
        tuned = ev.get(f"tuned_{plain}")
        if n and tuned is not None:
            interval = self.interval("eval", f"tuned_{plain}")
            out.append(f"The test split has {n:,} records: {metric_name(plain)} {with_interval(tuned, interval, plain)}"
                       + (", a bootstrap interval over the test rows; differences inside it are noise." if interval else
                          "; these metrics carry no interval yet (rerun the evaluation for one), so small differences "
                          "may be noise."))
        valid = ev.get(f"tuned_{VALIDITY}")
        if valid is not None and valid < 1:
            out.append(f"{fmt(1 - valid, VALIDITY)} of the fine-tuned model's answers are not a valid "
                       f"{self.spec.output.answer_noun}: check answers before use.")
        for invented in ("hallucination_rate", "invented_values"):  # json_object's and json_schema's name for it
            if ev.get(f"tuned_{invented}"):
                out.append(f"{fmt(ev[f'tuned_{invented}'], invented)} of the values it writes do not appear in the "
                           "input (invented or misspelt).")
        out.extend(self.weakest_slices())
        baseline = ev.get(f"baseline_{self.primary}")
        if baseline is not None and ev.get(f"tuned_{self.primary}") is not None and baseline > ev[f"tuned_{self.primary}"]:
            out.append(f"A classical model without an LLM scores higher ({metric_name(self.primary)} {fmt(baseline)} against "
                       f"{fmt(ev[f'tuned_{self.primary}'])}).")
        if tr.get("stop_reason") == "max_steps":
            out.append(f"Training stopped at its step budget ({tr.get('steps')} steps, {fmt(tr.get('train_examples'))} "
                       "training examples), not because the validation loss stopped improving.")
        allowed = self.params.export.max_metric_drop
        for q in self.params.export.quantizations:
            if f"{q}_delta" not in ex:
                continue
            # Metrics from before intervals: the point estimate stands for its own interval.
            delta = self.interval("export", f"{q}_delta") or Interval(ex[f"{q}_delta"], ex[f"{q}_delta"], ex[f"{q}_delta"])
            drop = f"loses {(-delta).describe()} {metric_name(self.primary)} against the f16 file"
            if delta.high < -allowed:
                out.append(f"The {q} file {drop}, beyond the {fmt(allowed)} allowed; use {self.served}.")
            elif delta.estimate < -allowed:
                out.append(f"The {q} file {drop} on {self.export_rows()} test rows: more than the {fmt(allowed)} "
                           "allowed, but within their noise; more rows (export.max_rows) would settle it.")
        out.append(f"Speeds were measured on the machine that ran the pipeline ({tr.get('device', 'cpu')}); "
                   "expect different figures elsewhere.")
        return out

    def data_provenance(self) -> str:
        """The LICENSE.md kept next to the task's raw source (where it came from, its licence), if any."""
        notes = self.root / Path(self.spec.source).parent / "LICENSE.md"
        if not notes.exists():
            return ""
        lines = notes.read_text(encoding="utf-8").strip().splitlines()
        return "\n".join(lines[1:] if lines and lines[0].startswith("#") else lines).strip()  # its title: the file name


def task_report(root: Path, params: Params, task: str) -> TaskReport:
    head, previous = committed_metrics(root, task)
    metrics = {name: _load(root / "metrics" / task / f"{name}.json") for name in STAGE_METRICS}
    return TaskReport(root, task, params.task(task), params, metrics, previous, head)


def _environment() -> Environment:
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html", "html.j2", "svg"]),
                      trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["fmt"] = fmt
    env.filters["metric_name"] = metric_name
    return env


def _revision(root: Path) -> str:
    commit = (_git(root, "rev-parse", "--short", "HEAD") or "").strip() or "(not a git checkout)"
    dirty = " + uncommitted changes" if (_git(root, "status", "--porcelain", "--untracked-files=no") or "").strip() else ""
    return commit + dirty


def write_model_card(report: TaskReport, root: Path, env: Environment) -> Path:
    """reports/model_cards/<task>/README.md (upload it next to the GGUF files) and its offline HTML rendering."""
    import mistune

    folder = root / MODEL_CARDS / report.name
    folder.mkdir(parents=True, exist_ok=True)
    metadata = yaml.safe_dump(report.card_metadata(), sort_keys=False, allow_unicode=True, width=120)
    body = env.get_template("model_card.md.j2").render(r=report)
    (folder / "README.md").write_text(f"---\n{metadata}---\n\n{body}", encoding="utf-8")
    to_html = mistune.create_markdown(escape=True, plugins=["table"])
    html = env.get_template("model_card.html.j2").render(r=report, metadata=metadata, body=Markup(to_html(body)))
    (folder / "model_card.html").write_text(html, encoding="utf-8")
    return folder / "README.md"


def build_index(root: Path | None = None) -> Path:
    """Write reports/index.html and every task's model card; return the index's path."""
    root = root or repo_root()
    params = load_params(root / "params.yaml")
    env = _environment()
    reports = [task_report(root, params, task) for task in params.tasks]
    for report in reports:
        write_model_card(report, root, env)
    links = {r.name: [(f"{r.name}/{name}", title) for name, title in STAGES if (root / "reports" / r.name / name).exists()]
             for r in reports}
    page = env.get_template("index.html.j2").render(
        reports=reports, links=links, cards=MODEL_CARDS.relative_to("reports"), revision=_revision(root),
        built=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        params_yaml=yaml.safe_dump({k: v for k, v in yaml.safe_load((root / "params.yaml").read_text()).items()
                                    if k in PARAMS_SHOWN}, sort_keys=False, width=110))
    out = root / "reports" / "index.html"
    out.write_text(page, encoding="utf-8")
    return out


if __name__ == "__main__":  # the DVC stage's command: python -m tuneforge.report.index
    print(f"wrote {build_index()}")
