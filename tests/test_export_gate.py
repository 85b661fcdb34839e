"""The export gate serves the smallest quantized file that keeps the HF model's metric and next-token choices; a
metric drop fails a file only when its paired interval against the f16 file is beyond the allowance."""

import json

import pytest

from tuneforge.core.metrics import paired_difference
from tuneforge.core.params import ExportSpec, load_params
from tuneforge.stages.export import gate


def row(q, size, delta, top1, ci, rows=80):
    """A gate row as export's _Evaluator writes it: delta = file - f16 and its interval `delta_ci`."""
    return {"model": f"GGUF {q}", "kept_quantization": q, "size_mb": size, "delta": delta, "delta_ci": list(ci),
            "rows": rows, "top1_agreement": top1}


ROWS = [{"model": "HF", "size_mb": 517, "delta": 0.0, "top1_agreement": 1.0},
        {"model": "GGUF f16", "size_mb": 271, "delta": 0.0, "top1_agreement": 1.0},  # never served: not a kept type
        row("Q8_0", 145, 0.004, 0.99, (-0.01, 0.02)), row("Q4_K_M", 105, -0.005, 0.96, (-0.03, 0.02))]


def test_the_smallest_passing_file_is_served():
    served, failures, notes = gate(ROWS, "micro_f1", ExportSpec(max_metric_drop=0.01))
    assert served == "Q4_K_M" and not failures and not notes


def test_a_file_short_of_either_bar_falls_back_and_says_by_how_much():
    rows = [*ROWS[:3], row("Q4_K_M", 105, -0.025, 0.93, (-0.04, -0.012))]
    served, failures, notes = gate(rows, "micro_f1", ExportSpec(max_metric_drop=0.01))
    assert served == "Q8_0" and not failures
    assert notes == [("Q4_K_M (105 MB) does not pass: micro_f1 0.025 (95% CI 0.012–0.040) below the f16 file's, the "
                      "fp32 HF model's twin, on 80 rows: beyond the 0.01 allowed even at the interval's low end; "
                      "top-1 agreement 0.930 < 0.95 (short by 0.020)")]


def test_no_passing_file_fails_the_gate():
    rows = [*ROWS[:2], row("Q8_0", 145, -0.02, 0.99, (-0.03, -0.015)), row("Q4_K_M", 105, -0.04, 0.9, (-0.06, -0.02))]
    served, failures, _ = gate(rows, "micro_f1", ExportSpec(max_metric_drop=0.01))
    assert served is None and len(failures) == 2 and failures[0].startswith("Q4_K_M")


def test_a_named_gate_type_is_the_only_candidate():
    served, _, _ = gate(ROWS, "micro_f1", ExportSpec(gate_quantization="Q8_0"))
    assert served == "Q8_0"
    with pytest.raises(ValueError, match="neither 'smallest' nor in export.quantizations"):
        ExportSpec(gate_quantization="Q5_K_M")


def test_a_drop_within_the_noise_of_the_rows_passes_and_one_clearly_beyond_fails():
    """80 sms_spam-like rows (16 spam) scored by the task's macro-F1: a file that answers 2 rows differently from the
    f16 file drops more than the allowance, but by less than the noise of 80 rows; one that answers 8 differently
    drops beyond it whatever rows are drawn."""
    spec = load_params().task("sms_spam")
    references = ["spam"] * 16 + ["ham"] * 64
    records = [{"messages": [{"role": "user", "content": f"message {i}"}, {"role": "assistant", "content": label}]}
               for i, label in enumerate(references)]
    f16 = list(references)

    def file_row(q, size, wrong):  # `wrong` rows answered with the other label, half spam, half ham
        answers = list(f16)
        for i in [*range(wrong // 2), *range(16, 16 + wrong - wrong // 2)]:
            answers[i] = "ham" if answers[i] == "spam" else "spam"
        delta = paired_difference(spec, records, answers, f16, spec.primary_metric)
        return row(q, size, delta.estimate, 0.99, (delta.low, delta.high))

    allowance = ExportSpec().max_metric_drop
    noisy, bad = file_row("Q4_K_M", 105, wrong=2), file_row("Q4_K_M", 105, wrong=8)
    assert -noisy["delta"] > allowance and -noisy["delta_ci"][1] < allowance  # beyond it, but not significantly
    served, failures, notes = gate([*ROWS[:2], file_row("Q8_0", 145, wrong=0), noisy], "macro_f1", ExportSpec())
    assert served == "Q4_K_M" and not failures
    assert len(notes) == 1 and "within the noise of these rows" in notes[0] and "on 80 rows" in notes[0]

    served, failures, notes = gate([*ROWS[:2], file_row("Q8_0", 145, wrong=0), bad], "macro_f1", ExportSpec())
    assert served == "Q8_0" and not failures
    assert notes[0].startswith("Q4_K_M (105 MB) does not pass: macro_f1 0.156 (95% CI ")
    assert "beyond the 0.03 allowed even at the interval's low end" in notes[0]


def test_a_routed_task_gates_the_served_system_too():
    """Where the task routes (the evaluation saved a router), the file also fails when the answers routed with the
    classical model, as `tuneforge serve` gives them, drop beyond the allowance against the f16 file's routed ones."""
    routed_ok = {**row("Q4_K_M", 105, -0.005, 0.96, (-0.03, 0.02)), "routed_delta": -0.002, "routed_delta_ci": [-0.01, 0.005]}
    served, failures, _ = gate([*ROWS[:3], routed_ok], "micro_f1", ExportSpec(max_metric_drop=0.01))
    assert served == "Q4_K_M" and not failures
    routed_bad = {**routed_ok, "routed_delta": -0.03, "routed_delta_ci": [-0.05, -0.015]}
    served, failures, notes = gate([*ROWS[:3], routed_bad], "micro_f1", ExportSpec(max_metric_drop=0.01))
    assert served == "Q8_0" and not failures
    assert "routed (fine-tune or classical model, as served) micro_f1 0.030 (95% CI 0.015–0.050)" in notes[0]


def test_export_routes_each_file_with_the_evaluation_router(tmp_path, monkeypatch):
    """ExportRouting takes the router the evaluation saved and the classical model's answers from its predictions,
    and routes a file's answers by their confidences exactly as Router.route does (serve calls the same)."""
    from tuneforge.core.router import ROUTER_FILE, Router
    from tuneforge.stages import export

    router = Router.fit([0.2, 0.4, 0.6, 0.8] * 5, [0, 0, 1, 1] * 5, [0.3, 0.5, 0.7, 0.9] * 5, [0, 1, 0, 1] * 5, 0.1)
    folder = tmp_path / "classical"
    folder.mkdir()
    (folder / ROUTER_FILE).write_text(json.dumps(router.to_json()))
    monkeypatch.setattr(export, "classical_dir", lambda task: folder)
    predictions = [{"baseline_output": f"c{i}", "baseline_confidence": c, "routed_output": f"r{i}"}
                   for i, c in enumerate([0.3, 0.9, 0.5, 0.7])]
    routing = export.ExportRouting.load("task", predictions)
    fine_tune, confidences = ["f0", "f1", "f2", "f3"], [0.8, 0.2, 0.6, 0.4]
    answers, deferred = routing.route(fine_tune, confidences)
    routes = router.route(confidences, [0.3, 0.9, 0.5, 0.7])
    assert answers == Router.answers(routes, fine_tune, ["c0", "c1", "c2", "c3"])
    assert deferred == sum(r.deferred for r in routes) / 4
    monkeypatch.setattr(export, "classical_dir", lambda task: tmp_path / "none")
    assert export.ExportRouting.load("task", predictions) is None  # kinds without a classical model: no routing
