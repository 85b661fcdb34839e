"""`tuneforge` command line for people; DVC stages call the modules behind these commands (`python -m ...`)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tuneforge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    nb = sub.add_parser("notebook", help="run one stage notebook with papermill and render its report")
    nb.add_argument("name", help="notebook name without .ipynb, e.g. 01_data_audit")
    nb.add_argument("--task", help="task name from params.yaml")
    sub.add_parser("base-model", help="save model.base as safetensors in models/base")
    sub.add_parser("base-gguf", help="write models/base as a GGUF (export.base_quantization), the file task adapters run over")
    sub.add_parser("index", help="write reports/index.html, the stakeholder summary of every task")
    sv = sub.add_parser("serve", help="serve the tasks' GGUF files (OpenAI-compatible API), logging every request")
    sv.add_argument("--task", help="serve this task's merged file; without it every task runs from one process over "
                    "the base GGUF with its adapter, chosen by the request's 'model' field")
    sv.add_argument("--host", default="127.0.0.1", help="loopback by default: nothing is exposed")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--quantization", help="with --task: a type from export.quantizations (default: the smallest file "
                    "that passed the export gate)")
    sv.add_argument("--api-key", help="clients must send 'Authorization: Bearer <key>'; required unless --host is "
                    "loopback. Prefer $TUNEFORGE_API_KEY: a command line is visible to every user of the machine")
    args = parser.parse_args(argv)

    if args.command == "notebook":
        from tuneforge.report.notebook import run_notebook

        return run_notebook(args.name, args.task)
    if args.command == "base-model":
        from tuneforge.stages.base_model import main as save_base

        save_base()
        return 0
    if args.command == "base-gguf":
        from tuneforge.stages.base_gguf import main as save_base_gguf

        save_base_gguf()
        return 0
    if args.command == "index":
        from tuneforge.report.index import build_index

        print(f"wrote {build_index()}")
        return 0
    if args.command == "serve":
        from tuneforge.core.params import ParamsError
        from tuneforge.serve import ServeError, serve

        try:
            serve(args.task, args.host, args.port, args.quantization, args.api_key)
        except (ServeError, ParamsError) as err:
            print(f"tuneforge serve: {err}", file=sys.stderr)
            return 2
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
