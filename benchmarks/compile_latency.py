"""Compile latency against depth: tiny-moe at 8, 16, 32, 64 layers.

Times ``moesys_compile.compile`` (canonicalize, fx capture, symbolic shape propagation, cost
annotation, the train pipeline, program build) and, in the same run, ``torch.export.export`` of
the same model as the peer (capture alone, no annotation or rewriting).

    python -m benchmarks.compile_latency [--quick] [--json FILE]
Targets: 64 layers in <= 3 s; time(64) / time(8) <= 9.
"""

from __future__ import annotations

import torch

import moesys_compile as mc

from . import _harness as h


def build(n_layers: int):
    torch.manual_seed(0)
    return mc.models.build("tiny-moe", n_layers=n_layers, max_seq_len=128)


def main(argv=None) -> int:
    args = h.parser("compile_latency", __doc__.splitlines()[0]).parse_args(argv)
    args.json = h.results_path(args, "compile_latency")
    depths = [8, 16] if args.quick else [8, 16, 32, 64]
    repeats = args.repeats or (1 if args.quick else 3)
    ids = torch.randint(0, 256, (2, 32))
    mc.compile(build(2), mc.Plan(), example_inputs=(ids,))          # imports and first-call set-up
    torch.export.export(build(2), (ids,), strict=False)
    rows = []
    for depth in depths:
        model = build(depth)
        ours = h.time_call(lambda: mc.compile(model, mc.Plan(mode="train"), example_inputs=(ids,)),
                           repeats=repeats, warmup=0)
        peer = h.time_call(lambda: torch.export.export(model, (ids,), strict=False), repeats=repeats, warmup=0)
        nodes = len(mc.compile(model, mc.Plan(), example_inputs=(ids,)).graph_module.graph.nodes)
        rows.append({"layers": depth, "nodes": nodes, "compile_s": ours["median_s"], "torch_export_s": peer["median_s"],
                     "export/compile": peer["median_s"] / ours["median_s"]})
    base = rows[0]["compile_s"]
    for row in rows:
        row["growth_vs_8"] = row["compile_s"] / base
    h.print_table(rows, ["layers", "nodes", "compile_s", "torch_export_s", "export/compile", "growth_vs_8"],
                  title="compile latency (tiny-moe, B=2, S=32, median of %d)" % repeats)
    deepest = rows[-1]
    verdict = {"deepest_layers": deepest["layers"], "deepest_compile_s": deepest["compile_s"],
               "target_s": 3.0, "meets_time": deepest["compile_s"] <= 3.0,
               "growth": deepest["compile_s"] / base, "growth_target": deepest["layers"] / 8 * 9 / 8,
               "meets_growth": deepest["compile_s"] / base <= 9}
    print(f"deepest: {deepest['layers']} layers in {deepest['compile_s']:.2f} s (target <= 3 s), "
          f"growth x{verdict['growth']:.2f} over 8 layers (target <= 9 at 64)")
    h.write_json(args.json, "compile_latency", rows, verdict=verdict)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
