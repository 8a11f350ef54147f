"""Ring inference from the command line, greedy decoding through the ring, and the demo step.

    moesys-compile infer tiny-moe --checkpoint ckpt/ --budget 512KiB --weights disk --prompt-ids 1 2 3
    python -m moesys_compile.infer small-moe --budget 8MiB --max-new-tokens 8

``--checkpoint`` is a Hugging Face style safetensors directory (``model.safetensors`` or its
sharded index, original parameter names) or a training checkpoint of this project; without one
the model's own (freshly initialised) weights are streamed.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import sys
import tempfile
from typing import Optional, Sequence

import torch
import torch.fx as fx
from torch import nn

from .errors import MoesysError, PlanError
from .frontend.tracing import MoesysTracer
from .models.transformer import Transformer
from .plan import Plan, format_bytes, parse_bytes

STAT_KEYS = ("peak_device_bytes", "budget_bytes", "slots", "sections", "bytes_moved", "transfer_seconds",
             "compute_seconds", "stall_seconds", "wall_seconds", "efficiency")


# ---------------------------------------------------------------------------------------------
# greedy decoding with a KV cache
# ---------------------------------------------------------------------------------------------


class DecodeStep(nn.Module):
    """One incremental step of a built-in Transformer with the KV cache as one tensor, so that
    the step traces to a plain graph: ``(ids_BS, start_pos, kv_BX) -> (logits_BSV, kv_BX')``
    where ``kv_BX`` flattens [B, layers, 2, heads, P, head_dim] (2-D, so annotation treats only
    the batch as symbolic). It calls the model's own forward with its cache dicts, so the math
    is the model's."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model
        cfg = model.config
        self.cache_dims = (len(model.layers), 2, cfg.n_heads, cfg.dim // cfg.n_heads)

    def forward(self, ids_BS: torch.Tensor, start_pos: int, kv_BX: torch.Tensor):
        layers, two, heads, head_dim = self.cache_dims
        kv = kv_BX.view(kv_BX.shape[0], layers, two, heads, -1, head_dim)
        caches = [{"k": kv[:, i, 0], "v": kv[:, i, 1]} for i in range(layers)]
        logits_BSV = self.model(ids_BS, caches=caches, start_pos=start_pos)
        kv_new = torch.stack([t for c in caches for t in (c["k"], c["v"])], dim=1)
        return logits_BSV, kv_new.flatten(1)


@contextlib.contextmanager
def traced_factories():
    """While tracing: ``torch.ones`` with traced sizes becomes a graph call (the model's cached
    attention builds its mask that way, which plain fx tracing rejects). Scoped to the trace,
    so the generated code calls the real ``torch.ones``."""
    original = torch.ones

    def ones(*args, **kwargs):
        proxies = [a for a in (*args, *kwargs.values()) if isinstance(a, fx.Proxy)]
        if proxies:
            return proxies[0].tracer.create_proxy("call_function", original, args, kwargs)
        return original(*args, **kwargs)
    torch.ones = ones
    try:
        yield
    finally:
        torch.ones = original


def lower_decode(step: DecodeStep, plan: Plan, example: tuple):
    """Capture ``step`` with fx (see ``traced_factories``), annotate it, run the infer pipeline."""
    from moesys_compile.passes import pipeline_for
    from .frontend import annotate
    from .frontend.tracing import expose_aux_loss, fx_trace, traced_names
    from .pipeline import CompileContext, run_pipeline
    from .programs import InputBinder
    with traced_factories():
        gm = fx_trace(step, example, {}, MoesysTracer())
    binder = InputBinder(step, traced_names(step, example, {})[0], "fx", None)
    expose_aux_loss(gm)
    annotation = annotate(gm, binder.graph_inputs(example, {}))
    ctx = CompileContext(plan=plan, model=step, annotation=annotation, blocks=[], input_names=binder.traced_names,
                         capture="fx")
    ctx.extras["binder"] = binder
    return run_pipeline(gm, ctx, pipeline_for("infer")), ctx


def empty_cache(model: Transformer, batch: int, length: int, dtype: torch.dtype) -> torch.Tensor:
    cfg = model.config
    return torch.zeros(batch, cfg.n_layers * 2 * cfg.n_heads * length * (cfg.dim // cfg.n_heads), dtype=dtype)


def _check_decodable(model: nn.Module, ids: torch.Tensor, max_new_tokens: int) -> None:
    if ids.dim() != 2 or max_new_tokens < 1:
        raise ValueError(f"generate(ids, max_new_tokens): ids must be [batch, seq] (got {tuple(ids.shape)}) and "
                         f"max_new_tokens >= 1 (got {max_new_tokens})")
    longest = getattr(getattr(model, "config", None), "max_seq_len", None)
    if longest is not None and ids.shape[1] + max_new_tokens > longest:
        raise ValueError(f"prompt ({ids.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"max_seq_len ({longest})")


@contextlib.contextmanager
def _longest_step_fits(ids: torch.Tensor, max_new_tokens: int, what_grows: str):
    """Restate a budget refusal of the decoding graph in ``generate``'s terms: the step that does
    not fit is the last one, whose activations hold ``what_grows`` at prompt + new tokens."""
    from .passes.ring_partition import RingBudgetTooSmall
    try:
        yield
    except RingBudgetTooSmall as exc:
        batch, prompt = ids.shape
        raise RingBudgetTooSmall(exc.pass_name, exc.ran_before, PlanError(
            f"generate(max_new_tokens={max_new_tokens}) of {batch} prompt(s) of {prompt} tokens: the last "
            f"decoding step holds {what_grows} at {prompt + max_new_tokens - 1} positions and does not fit "
            f"Plan.device_budget ({exc.cause}); lower max_new_tokens or raise "
            f"Plan.device_budget")) from exc


def greedy_decode(program, ids: torch.Tensor, max_new_tokens: int,
                  attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``program.generate``: prefill and every decode step run the traced ``DecodeStep`` graph
    through the program's ring (one lowering per (batch, prompt, new tokens)). Models other than
    the built-in ones decode without a KV cache (``recompute_decode``)."""
    model = program.context.model
    _check_decodable(model, ids, max_new_tokens)
    if not isinstance(model, Transformer):
        return recompute_decode(program, ids, max_new_tokens, attention_mask)
    if attention_mask is not None:
        raise ValueError("generate(attention_mask=...): the built-in models take no padding mask; decode prompts "
                         "of one length together (or one prompt at a time)")
    batch, prompt = ids.shape
    dtype = program.context.extras["ring"].dtype or model.embed.weight.dtype   # the ring's weights' dtype
    key = ("decode", batch, prompt, max_new_tokens)
    lowered = program.__dict__.setdefault("_decode_lowered", {})
    if key not in lowered:
        # the example bounds every step: prompt-long inputs and a cache that, with them, is as long
        # as the longest cache the last step builds (prompt + max_new_tokens - 1 positions)
        example = (ids, 0, empty_cache(model, batch, max_new_tokens - 1, dtype))
        with _longest_step_fits(ids, max_new_tokens, "its KV cache"):
            lowered[key] = lower_decode(DecodeStep(model), program.plan, example)
    runtime = program.runtime(key, lowered[key])
    runtime.check_shapes = False
    kv, step_ids, position, tokens, steps = empty_cache(model, batch, 0, dtype), ids, 0, [], []
    for _ in range(max_new_tokens):
        ((logits, kv), _aux), stats = runtime([step_ids, position, kv])
        steps.append(stats)
        position += step_ids.shape[1]
        step_ids = logits[:, -1].argmax(-1, keepdim=True).to(ids.device)
        tokens.append(step_ids)
    program.stats = combine_stats(steps)
    return torch.cat([ids, *tokens], dim=1)


def recompute_decode(program, ids: torch.Tensor, max_new_tokens: int,
                     attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Greedy decoding of any causal LM (a Hugging Face model): every step one ring forward over
    the whole sequence so far, no KV cache, through a graph lowered at the longest step's length
    so that each step fits the workspace. As ``model.generate(do_sample=False)``: a padding mask
    grows by one per step and gives the positions (cumulative sum, for left padding); a sequence
    that has produced an end-of-sequence id gets the pad id, and decoding ends once all have."""
    from .api import lower
    model = program.context.model
    batch, prompt = ids.shape
    key = ("recompute", batch, prompt + max_new_tokens - 1, attention_mask is not None)
    lowered = program.__dict__.setdefault("_decode_lowered", {})
    if key not in lowered:
        longest_ids = torch.cat([ids, ids.new_zeros(batch, max_new_tokens - 1)], dim=1)
        longest_mask = None if attention_mask is None else _grow(attention_mask, max_new_tokens - 1)
        with _longest_step_fits(ids, max_new_tokens, "the whole sequence, recomputed each step"):
            lowered[key] = lower(model, program.plan, (longest_ids,), _mask_inputs(model, longest_mask))
    runtime = program.runtime(key, lowered[key])
    binder = lowered[key][1].extras["binder"]
    eos, pad = _stop_ids(model)
    done = torch.zeros(batch, dtype=torch.bool, device=ids.device)
    steps, out, mask = [], ids, attention_mask
    for _ in range(max_new_tokens):
        (output, _aux), stats = runtime(binder.graph_inputs((out,), _mask_inputs(model, mask)))
        steps.append(stats)
        token = first_tensor(binder.model_output(output))[:, -1].argmax(-1).to(ids.device)
        if eos:
            token = torch.where(done, torch.tensor(pad, device=ids.device), token)
            done |= torch.isin(token, torch.tensor(eos, device=ids.device))
        out, mask = torch.cat([out, token[:, None]], dim=1), None if mask is None else _grow(mask, 1)
        if eos and bool(done.all()):
            break
    program.stats = combine_stats(steps)
    return out


def _grow(mask: torch.Tensor, steps: int) -> torch.Tensor:
    return torch.cat([mask, mask.new_ones(mask.shape[0], steps)], dim=1)


def _mask_inputs(model: nn.Module, mask: Optional[torch.Tensor]) -> dict:
    """The keyword inputs of a padded step: the mask, and the positions transformers derives from
    it when the model takes ``position_ids``."""
    if mask is None:
        return {}
    inputs = {"attention_mask": mask}
    if "position_ids" in inspect.signature(model.forward).parameters:
        inputs["position_ids"] = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    return inputs


def _stop_ids(model: nn.Module) -> tuple[list[int], Optional[int]]:
    """End-of-sequence ids and the pad id of a model's ``generation_config`` (transformers pads
    with the first EOS id when there is no pad id)."""
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    pad = getattr(config, "pad_token_id", None)
    return eos, pad if pad is not None else (eos[0] if eos else None)


def combine_stats(steps: list[dict]) -> dict:
    """Sum the per-call records of a generate() run.

    Efficiency of the run = sum of the calls' bounds / sum of their walls, a call's bound being
    max(transfer, compute). Each step needs the token of the one before, so no step's transfer
    can hide behind another step's compute: max(sum transfer, sum compute) would be a bound no
    schedule reaches (a compute-bound prompt cannot hide the transfer-bound steps after it).
    ``pooled_efficiency`` keeps that figure for comparison."""
    total = dict(steps[-1])
    for key in ("bytes_moved", "transfer_seconds", "compute_seconds", "stall_seconds", "wall_seconds"):
        total[key] = sum(s[key] for s in steps)
    total["peak_device_bytes"] = max(s["peak_device_bytes"] for s in steps)
    wall = total["wall_seconds"]
    bound = sum(max(s["transfer_seconds"], s["compute_seconds"]) for s in steps)
    pooled = max(total["transfer_seconds"], total["compute_seconds"])
    total["efficiency"] = bound / wall if wall else 0.0
    total["pooled_efficiency"] = pooled / wall if wall else 0.0
    total["steps"] = len(steps)
    return total


@torch.inference_mode()
def eager_generate(model: Transformer, ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Reference greedy decoding with the model's own KV cache (eager, all weights resident)."""
    if not isinstance(model, Transformer):
        raise MoesysError(f"eager_generate decodes the built-in models; for {type(model).__name__} use "
                          f"model.generate(ids, max_new_tokens=n, do_sample=False)")
    _check_decodable(model, ids, max_new_tokens)
    caches = [{} for _ in model.layers]
    step_ids, position, tokens = ids, 0, []
    for _ in range(max_new_tokens):
        logits = model(step_ids, caches=caches, start_pos=position)
        position += step_ids.shape[1]
        step_ids = logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(step_ids)
    return torch.cat([ids, *tokens], dim=1)


@torch.inference_mode()
def reference_generate(model: nn.Module, ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Eager greedy decoding: ``eager_generate`` for the built-in models, else the model's own
    ``generate(do_sample=False)`` (Hugging Face)."""
    if isinstance(model, Transformer):
        return eager_generate(model, ids, max_new_tokens)
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False)


# ---------------------------------------------------------------------------------------------
# command line and demo
# ---------------------------------------------------------------------------------------------


def model_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def print_stats(stats: dict, title: str) -> None:
    print(title)
    for key in STAT_KEYS:
        value = stats.get(key)
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        if key.endswith("bytes") and isinstance(value, int):
            shown += f" ({format_bytes(value)})"
        print(f"  {key:<18} {shown}")


def first_tensor(output):
    """The logits of a model's output: a tensor, a ``ModelOutput`` (``.logits``) or a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    return logits if isinstance(logits, torch.Tensor) else first_tensor(output[0])


def run_ring(model: nn.Module, ids: torch.Tensor, plan: Plan, max_new_tokens: int = 0, compare: bool = True) -> dict:
    """Compile ``model`` for the ring, run one forward (and greedy decoding); print and return stats."""
    from .api import compile
    program = compile(model, plan, example_inputs=(ids,))
    logits = first_tensor(program(ids))
    report = {"forward": dict(program.stats)}
    print_stats(program.stats, f"ring forward on ids {tuple(ids.shape)}:")
    if compare:
        with torch.inference_mode():
            error = (logits.float().cpu() - first_tensor(model(ids)).float()).abs().max().item()
        report["max_abs_error_vs_eager"] = error
        print(f"  max |ring - eager| = {error:.2e}")
    if max_new_tokens and (isinstance(model, Transformer) or callable(getattr(model, "generate", None))):
        generated = program.generate(ids, max_new_tokens)
        report["generate"] = dict(program.stats)
        report["tokens"] = generated[:, ids.shape[1]:].tolist()
        print_stats(program.stats, f"greedy generate, {max_new_tokens} new tokens:")
        print(f"  new tokens: {report['tokens']}")
        if compare:
            same = torch.equal(generated.cpu(), reference_generate(model, ids, max_new_tokens))
            report["generate_equals_eager"] = same
            print(f"  equal to eager greedy decoding: {same}")
    elif max_new_tokens:
        print(f"  greedy decoding runs on the built-in models and models with a generate method (Hugging Face); "
              f"{type(model).__name__} ran one forward")
    program.close()
    return report


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moesys-compile infer", description="memory-ring inference of MODEL")
    p.add_argument("model", nargs="?", help="built-in name (tiny-moe), package.module:factory, hf:<family> or a directory")
    p.add_argument("--checkpoint", help="directory to load the weights from: Hugging Face style (safetensors, "
                                        "sharded or not, or pytorch_model.bin) or a training checkpoint")
    p.add_argument("--budget", required=True, help="device budget, e.g. 512MiB or 1073741824")
    p.add_argument("--weights", choices=("host", "disk"), default="host", help="storage tier of the weights")
    p.add_argument("--offload-dir", help="directory for the disk tier (default: a temporary directory)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--slots", type=int, help="ring depth (default: derived from the budget)")
    p.add_argument("--config", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="model config overrides (one or more, repeatable)")
    p.add_argument("--prompt-ids", nargs="+", type=int, help="prompt token ids (default: 16 random ids)")
    p.add_argument("--max-new-tokens", type=int, default=8,
                   help="greedy tokens to generate (0: forward only): built-in models decode with a KV cache, "
                        "models with a generate method (Hugging Face) recompute the sequence each step")
    p.add_argument("--no-compare", action="store_true", help="skip the eager comparison (it needs host memory)")
    p.add_argument("--json", help="write the stats to this file")
    return p


def prompt_tensor(prompt_ids: list[int], model: nn.Module) -> torch.Tensor:
    """``--prompt-ids`` as a [1, n] tensor; ids outside the model's vocabulary are refused here
    rather than as an index error deep inside the embedding."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    bad = [i for i in prompt_ids if i < 0 or (vocab is not None and i >= vocab)]
    if bad:
        raise ValueError(f"--prompt-ids {bad}: token ids must lie in 0..{vocab - 1 if vocab else 'vocab_size - 1'} "
                         f"(the model's vocab_size is {vocab})")
    return torch.tensor([prompt_ids])


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .models.spec import load_model, model_and_overrides
    parser = _parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        model, overrides = model_and_overrides(args.model, args.config)
        if model is None:
            parser.error("the following arguments are required: model")
        loaded = load_model(model, overrides)
        ids = (prompt_tensor(args.prompt_ids, loaded.model) if args.prompt_ids else loaded.example_inputs(1, 16)[0])
        with tempfile.TemporaryDirectory(prefix="moesys-ring-") as scratch:
            plan = Plan(mode="infer", device=args.device, device_budget=parse_bytes(args.budget), weights=args.weights,
                        offload_dir=args.offload_dir or scratch, ring_slots=args.slots,
                        weights_checkpoint=args.checkpoint, options={"progress": True})
            if args.checkpoint and not args.no_compare:
                from .runtime.storage import checkpoint_source
                read = checkpoint_source(args.checkpoint, loaded.model)
                with torch.no_grad():   # the eager reference needs the same weights
                    for name, tensor in loaded.model.state_dict(keep_vars=True).items():
                        tensor.copy_(read(name))
            print(f"{loaded.description}: {format_bytes(model_bytes(loaded.model))} of weights, budget "
                  f"{format_bytes(plan.device_budget)}, tier {plan.weights}")
            report = run_ring(loaded.model, ids, plan, args.max_new_tokens, compare=not args.no_compare)
    except (MoesysError, ValueError) as exc:
        print(f"moesys-compile infer: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


def demo(checkpoint_dir: Optional[str] = None, model_name: str = "tiny-moe", overrides: Optional[dict] = None,
         prompt_len: int = 6, max_new_tokens: int = 4) -> int:
    """``make demo``'s last step: ring inference under a budget of a quarter of the model's size,
    weights on disk, from ``checkpoint_dir`` (or freshly initialised weights when None); prints
    the stats and returns the command's exit code. A quarter of the 2-layer tiny-moe leaves room
    for about 7 prompt tokens (and 4 new ones) next to two slots, its experts split into groups;
    deeper models take longer prompts."""
    from .models import build
    torch.manual_seed(0)
    model = build(model_name, **(overrides or {})).eval()
    prompt = torch.randint(0, getattr(model.config, "vocab_size", 2), (prompt_len,)).tolist()
    argv = [model_name, "--budget", str(model_bytes(model) // 4), "--weights", "disk",
            "--max-new-tokens", str(max_new_tokens), "--prompt-ids", *map(str, prompt)]
    argv += ["--config", *[f"{k}={v!r}" for k, v in (overrides or {}).items()]] if overrides else []
    argv += ["--checkpoint", checkpoint_dir] if checkpoint_dir else []
    print(f"\nring inference of {model_name} ({'checkpoint ' + checkpoint_dir if checkpoint_dir else 'fresh weights'}) "
          f"at a quarter of its size")
    return main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
