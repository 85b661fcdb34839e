"""The export gate serves the smallest quantized file that keeps the HF model's metric and next-token choices."""

import pytest

from tuneforge.core.params import ExportSpec
from tuneforge.stages.export import gate


def row(q, size, delta, top1):
    return {"model": f"GGUF {q}", "kept_quantization": q, "size_mb": size, "delta": delta, "top1_agreement": top1}


ROWS = [{"model": "HF", "size_mb": 517, "delta": 0.0, "top1_agreement": 1.0},
        {"model": "GGUF f16", "size_mb": 271, "delta": 0.0, "top1_agreement": 1.0},  # never served: not a kept type
        row("Q8_0", 145, 0.004, 0.99), row("Q4_K_M", 105, -0.005, 0.96)]


def test_the_smallest_passing_file_is_served():
    served, failures, notes = gate(ROWS, "micro_f1", ExportSpec(max_metric_drop=0.01))
    assert served == "Q4_K_M" and not failures and not notes


def test_a_file_short_of_either_bar_falls_back_and_says_by_how_much():
    rows = [*ROWS[:3], row("Q4_K_M", 105, -0.025, 0.93)]
    served, failures, notes = gate(rows, "micro_f1", ExportSpec(max_metric_drop=0.01))
    assert served == "Q8_0" and not failures
    assert notes == [("Q4_K_M (105 MB) does not pass: micro_f1 0.025 below the f16 file's, the fp32 HF model's twin "
                      "(allowed 0.01); top-1 agreement 0.930 < 0.95 (short by 0.020)")]


def test_no_passing_file_fails_the_gate():
    rows = [*ROWS[:2], row("Q8_0", 145, -0.02, 0.99), row("Q4_K_M", 105, -0.04, 0.9)]
    served, failures, _ = gate(rows, "micro_f1", ExportSpec(max_metric_drop=0.01))
    assert served is None and len(failures) == 2 and failures[0].startswith("Q4_K_M")


def test_a_named_gate_type_is_the_only_candidate():
    served, _, _ = gate(ROWS, "micro_f1", ExportSpec(gate_quantization="Q8_0"))
    assert served == "Q8_0"
    with pytest.raises(ValueError, match="neither 'smallest' nor in export.quantizations"):
        ExportSpec(gate_quantization="Q5_K_M")
