"""Write the embedded demo's production traffic: real requests answered by the exported GGUF model.

- address_json: the held-out `production` split (never used for training or testing): same distribution
  as the reference, so the drift stage must stay quiet.
- sms_spam: SpamAssassin emails (data/raw/production/spam_assassin.jsonl): a real channel shift, so the
  drift stage must recommend retraining.

Each request is answered by the fine-tune and logged in `tuneforge serve`'s format, as `tuneforge serve --no-route`
answers it (no routing to the classical model). Run after `dvc repro export`:

    python scripts/make_demo_traffic.py --task sms_spam --rows 300
"""

from __future__ import annotations

import argparse
import time

from tuneforge.core.constraints import grammars_for
from tuneforge.core.gguf import (
    file_sha256,
    generate_gguf,
    load_llama,
    served_quantization,
)
from tuneforge.core.modeling import load_tokenizer
from tuneforge.core.params import load_params
from tuneforge.core.paths import merged_dir, processed_dir, production_file, repo_root, task_gguf_file
from tuneforge.core.records import read_jsonl
from tuneforge.core.traffic import append_request


def demo_inputs(task: str, rows: int) -> list[str]:
    params = load_params()
    spec = params.task(task)
    if spec.production_source:
        texts = [r["text"] for r in read_jsonl(repo_root() / spec.production_source)]
    else:
        texts = [spec.output.input_text(r) for r in read_jsonl(processed_dir(task) / "production.jsonl")]
    step = max(1, len(texts) // rows)
    return texts[::step][:rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", required=True)
    parser.add_argument("--rows", type=int, default=300)
    parser.add_argument("--quantization", help="default: the file the export gate chose, the one `tuneforge serve` runs")
    args = parser.parse_args()

    params = load_params()
    spec = params.task(args.task)
    gguf = task_gguf_file(args.task, args.quantization or served_quantization(args.task))
    tokenizer = load_tokenizer(merged_dir(args.task))
    llm = load_llama(gguf, n_threads=params.export.n_threads)
    digest = file_sha256(gguf)
    out = production_file(args.task)
    out.unlink(missing_ok=True)
    output = spec.output.bind(tokenizer)
    for text in demo_inputs(args.task, args.rows):
        messages = [{"role": "system", "content": spec.system_prompt}, {"role": "user", "content": text},
                    {"role": "assistant", "content": ""}]
        start = time.perf_counter()
        grammars = grammars_for(output, [{"messages": messages}])  # as `tuneforge serve` constrains it
        answer = generate_gguf(llm, tokenizer, [{"messages": messages}], spec.max_new_tokens, output,
                               grammars=grammars).outputs[0]
        latency_ms = 1000 * (time.perf_counter() - start)
        append_request(out, {"task": args.task, "input": text, "output": answer, "latency_ms": latency_ms,
                             "model_file": gguf.name, "model_sha256": digest})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
