"""One base GGUF + every task's adapter vs one merged GGUF per task: resident memory, task-switch time, answers.

Run after `dvc repro` (it reads models/base_gguf and each task's models/<task>/gguf):
    python benchmarks/multi_task_memory.py [--rows 5]
Each setup runs in a fresh process that loads its files and answers `--rows` test prompts of every task (so every
weight page has been read), then reports its resident set (VmRSS, mmapped weights included) and peak (VmHWM).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

CHILD = r"""
import json, sys, time
from tuneforge.core.adapters import AdapterSwitch
from tuneforge.core.gguf import adapter_gguf, generate_gguf, load_llama
from tuneforge.core.modeling import load_tokenizer
from tuneforge.core.params import load_params
from tuneforge.core.paths import base_gguf_dir, base_model_dir, models_dir, processed_dir
from tuneforge.core.records import read_jsonl

def status():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM")}

mode, rows = sys.argv[1], int(sys.argv[2])
params = load_params()
tasks = list(params.tasks)
tokenizer = load_tokenizer(base_model_dir())
records = {t: read_jsonl(processed_dir(t) / "test.jsonl")[:rows] for t in tasks}
before = status()
out = {"mode": mode, "tasks": tasks, "before_mb": before["VmRSS"]}
answers = {}
if mode == "adapters":
    switch = AdapterSwitch.load(base_gguf_dir() / f"model-{params.export.base_quantization}.gguf",
                                {t: adapter_gguf(t) for t in tasks}, n_threads=params.export.n_threads)
    for t in tasks:
        switch.use(t)
        answers[t] = generate_gguf(switch.llm, tokenizer, records[t], params.tasks[t].max_new_tokens).outputs
    switches = []
    for i in range(50):
        start = time.perf_counter(); switch.use(tasks[i % len(tasks)]); switches.append(time.perf_counter() - start)
    out["switch_ms_median"] = 1000 * sorted(switches)[len(switches) // 2]
    # What a switch costs a request, as the server answers it (create_chat_completion reuses the cached prompt
    # prefix, e.g. the system prompt, between requests of one task; a switch drops that cache).
    t = tasks[0]; switch.use(t)
    same, other = [], []
    for record in records[t]:
        for times, flip in ((same, False), (other, True)):
            if flip:
                switch.use(tasks[1 % len(tasks)]); switch.use(t)
            start = time.perf_counter()
            switch.llm.create_chat_completion(messages=record["messages"][:-1], temperature=0,
                                              max_tokens=params.tasks[t].max_new_tokens)
            times.append(time.perf_counter() - start)
    out["request_s_same_task"] = sum(same) / len(same)
    out["request_s_after_switch"] = sum(other) / len(other)
else:
    for t in tasks:
        llm = load_llama(models_dir(t) / "gguf" / f"model-{params.export.base_quantization}.gguf",
                         n_threads=params.export.n_threads)
        answers[t] = generate_gguf(llm, tokenizer, records[t], params.tasks[t].max_new_tokens).outputs
        globals()[f"keep_{t}"] = llm  # every task's model stays loaded, as N servers would hold them
after = status()
out.update(rss_mb=after["VmRSS"], peak_mb=after["VmHWM"], answers=answers)
print("RESULT " + json.dumps(out))
"""


def run(mode: str, rows: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, mode, str(rows)], capture_output=True, text=True, check=False)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{mode} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5, help="test prompts each task answers in each setup")
    args = parser.parse_args()
    start = time.perf_counter()
    adapters, merged = run("adapters", args.rows), run("merged", args.rows)
    same = [a == b for t in adapters["tasks"] for a, b in zip(adapters["answers"][t], merged["answers"][t])]
    report = {
        "tasks": adapters["tasks"],
        "one_base_plus_adapters_rss_mb": adapters["rss_mb"] - adapters["before_mb"],
        "one_merged_file_per_task_rss_mb": merged["rss_mb"] - merged["before_mb"],
        "process_rss_mb": {"adapters": adapters["rss_mb"], "merged": merged["rss_mb"]},
        "adapter_switch_ms_median": adapters["switch_ms_median"],
        "request_s_same_task": adapters["request_s_same_task"],
        "request_s_after_switch": adapters["request_s_after_switch"],
        "answers_identical_to_merged": f"{sum(same)}/{len(same)}",
        "seconds": time.perf_counter() - start,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
