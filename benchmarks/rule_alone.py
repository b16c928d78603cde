"""The rule alone on one device: two encoders' gradients in ResNet-18 or BERT-base shapes, one
``integrate_encoders`` call (``out`` aliasing the unimodal gradients, as the engine calls it), its
median wall time and its peak memory over the gradients themselves.

Run ``python benchmarks/rule_alone.py --device cuda`` (``--models resnet18 bert``; BERT needs
``transformers``). On CPU the peak memory is not measured. To compare two revisions of the rule, run
the script at each (``git stash`` / ``git checkout``): it uses only the public API.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mmpareto_lightning.rule import RuleConfig, integrate_encoders


def _shapes(model: str) -> list[torch.Size]:
    if model == "resnet18":
        from torchvision.models import resnet18

        net = resnet18(weights=None)
        net.fc = torch.nn.Identity()
    else:
        from transformers import BertConfig, BertModel

        net = BertModel(BertConfig())
    return [p.shape for p in net.parameters()]


def _gradients(shapes: list[torch.Size], device: str, gen: torch.Generator) -> list[torch.Tensor]:
    return [torch.randn(s, device=device, generator=gen) for s in shapes]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--models", nargs="+", choices=("resnet18", "bert"), default=["resnet18", "bert"])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    for model in args.models:
        shapes = _shapes(model)
        gen = torch.Generator(device=args.device).manual_seed(0)
        encoders = [[_gradients(shapes, args.device, gen) for _ in range(2)] for _ in range(2)]
        outs = [enc[1] for enc in encoders]
        config = RuleConfig()
        integrate_encoders(encoders, config, outs)  # warm-up: cached index tensors, allocator
        _sync(args.device)
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        times = []
        for _ in range(args.repeats):
            _sync(args.device)
            start = time.perf_counter()
            integrate_encoders(encoders, config, outs)
            _sync(args.device)
            times.append(time.perf_counter() - start)
        peak = "n/a" if args.device != "cuda" else f"{(torch.cuda.max_memory_allocated() - base) / 2**20:.0f}"
        entries = sum(s.numel() for s in shapes)
        print(
            f"{model}: 2 encoders x {len(shapes)} tensors, {entries} entries each; one call: median "
            f"{1e3 * statistics.median(times):.2f} ms, peak memory over the gradients {peak} MiB"
        )
        del encoders, outs
        if args.device == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
