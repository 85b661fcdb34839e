"""Does torch.compile of the decoder layers speed up training on a CPU? (train.compile auto stays eager there.)

    python benchmarks/cpu_compile.py

The embedded model with the stage's LoRA (build_model), 4 random rows of 256 tokens a step (the CPU profile's
micro-batch), AdamW; 3 warm-up steps, then 10 timed; eager first, then each decoder layer compiled. --dtype: the
stage's compute dtype on this CPU (bf16 where it has bf16 units) or fp32.
"""

import argparse
import time

import torch

from tuneforge.core.batching import answer_loss
from tuneforge.core.modeling import compute_dtype
from tuneforge.core.params import load_params
from tuneforge.stages.train import Mode, build_model, compile_decoder_layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["stage", "fp32"], default="stage")
    dtype = compute_dtype("cpu") if parser.parse_args().dtype == "stage" else torch.float32
    print(f"dtype: {dtype}")
    torch.manual_seed(0)
    params = load_params()
    seconds = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        model = build_model(params, Mode("lora", "cpu", dtype))
        if compiled:
            compile_decoder_layers(model)
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        rows = torch.Generator().manual_seed(1)
        started = time.time()
        for step in range(13):
            if step == 3:
                timed_from = time.time()
                first = timed_from - started
            ids = torch.randint(0, 49000, (4, 256), generator=rows)
            (answer_loss(model, {"input_ids": ids, "labels": ids}) / ids.numel()).backward()
            optimizer.step()
            optimizer.zero_grad()
        seconds[compiled] = (time.time() - timed_from) / 10
        print(f"{'compiled' if compiled else 'eager'}: first 3 steps {first:.1f} s, then {seconds[compiled]:.2f} s a step",
              flush=True)
    print(f"compiled / eager speed: {seconds[False] / seconds[True]:.2f}")


if __name__ == "__main__":
    main()
