"""``make demo``: the main job on a built-in model, end to end on this machine.

    python -m moesys_compile.demo [--out DIR]

1. compile tiny-moe, print the inspect summary, run a forward pass (equal to eager);
2. train it on 2 CPU ranks with expert parallelism (torchrun, gloo): the loss falls and a sharded
   checkpoint is saved;
3. ring inference of that checkpoint under a budget of a quarter of the model size, weights on
   disk, printing the ring's stats.
"""

from __future__ import annotations

import argparse
import time

import torch

from pathlib import Path

from . import Plan, compile, infer, models, train
from .report import Renderer


def compile_step(n_layers: int = 4) -> None:
    torch.manual_seed(0)
    model = models.build("tiny-moe", n_layers=n_layers)
    ids = torch.randint(0, model.config.vocab_size, (2, 32))
    start = time.perf_counter()
    program = compile(model, Plan(mode="train"), example_inputs=(ids,))
    seconds = time.perf_counter() - start
    print(Renderer(program.context, batch=2, seq=32).summary("tiny-moe"))
    print(f"\ncompiled tiny-moe ({n_layers} layers, {sum(p.numel() for p in model.parameters()):,} parameters) "
          f"in {seconds:.2f} s")
    other_ids = torch.randint(0, model.config.vocab_size, (3, 20))   # other batch and sequence length
    logits = program(other_ids)
    eager = model(other_ids)
    print(f"forward on ids {tuple(other_ids.shape)} -> logits {tuple(logits.shape)}; "
          f"max |program - eager| = {(logits - eager).abs().max().item():.2e}; aux_loss = {program.aux_loss.item():.4f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moesys_compile.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/demo", help="where checkpoints and results go")
    args = parser.parse_args(argv)
    print("== 1. compile\n")
    compile_step()
    print("\n== 2. expert-parallel training on 2 ranks\n", flush=True)
    trained = train.demo(str(Path(args.out) / "train"))
    if not trained["last_loss"] < trained["first_loss"]:
        raise SystemExit(f"training did not lower the loss ({trained['first_loss']} -> {trained['last_loss']})")
    print("\n== 3. memory-ring inference of the trained checkpoint\n", flush=True)
    return infer.demo(trained["checkpoint"])


if __name__ == "__main__":
    raise SystemExit(main())
