"""Ring inference from the command line, and the demo step (decoding itself: ``generate``).

    moesys-compile infer tiny-moe --checkpoint ckpt/ --budget 512KiB --weights disk --prompt-ids 1 2 3
    moesys-compile infer path/to/hf-model --budget 2GiB --prompt "The capital of France is"
    python -m moesys_compile.infer small-moe --budget 8MiB --max-new-tokens 8

``--checkpoint`` is a Hugging Face style safetensors directory (``model.safetensors`` or its
sharded index, original parameter names) or a training checkpoint of this project (a run's
``--ckpt-dir`` stands for its newest step); without one
the model's own (freshly initialised) weights are streamed. Weights from a checkpoint (or from
MODEL's own directory) are never loaded whole: the ring's model is built with its parameters on
the meta device and every tensor is read when staged. Only the eager comparison loads the whole
model (``--no-compare`` skips it, for models larger than host memory).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from .cli import name_flags
from .errors import MoesysError
from .frontend.empty_weights import meta_tensor_names
from .generate import first_tensor, reference_generate
from .models.transformer import Transformer
from .plan import Plan, format_bytes, parse_bytes

# Plan fields as the command line's messages name them: the flags that set them.
FLAG_OF_FIELD = {"device_budget": "--budget", "ring_slots": "--slots", "offload_dir": "--offload-dir",
                 "device": "--device"}
STAT_KEYS = ("peak_device_bytes", "budget_bytes", "slots", "sections", "bytes_moved", "transfer_seconds",
             "compute_seconds", "stall_seconds", "wall_seconds", "efficiency")


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


def run_ring(model: nn.Module, ids: torch.Tensor, plan: Plan, max_new_tokens: int = 0,
             reference: Optional[nn.Module] = None, sampling: Optional[dict] = None, seed: int = 0) -> dict:
    """Compile ``model`` for the ring, run one forward (and decoding: greedy, or with the
    ``sampling`` settings after ``torch.manual_seed(seed)``); print and return stats, compared
    with the eager ``reference`` (decoding from the same seed) when one is given."""
    from .api import compile
    program = compile(model, plan, example_inputs=(ids,))
    logits = first_tensor(program(ids))
    report = {"forward": dict(program.stats)}
    print_stats(program.stats, f"ring forward on ids {tuple(ids.shape)}:")
    if reference is not None:
        with torch.inference_mode():
            error = (logits.float().cpu() - first_tensor(reference(ids)).float()).abs().max().item()
        report["max_abs_error_vs_eager"] = error
        print(f"  max |ring - eager| = {error:.2e}")
    if max_new_tokens and (isinstance(model, Transformer) or callable(getattr(model, "generate", None))):
        typed = {} if isinstance(model, Transformer) else {"attention_mask": torch.ones_like(ids)}  # no padding
        settings = sampling or {}
        torch.manual_seed(seed)
        generated = program.generate(ids, max_new_tokens, **typed, **settings)
        report["generate"] = dict(program.stats)
        report["tokens"] = generated[:, ids.shape[1]:].tolist()
        how = f"sampling (seed {seed})" if settings else "greedy decoding"
        print_stats(program.stats, f"generate by {how}, {max_new_tokens} new tokens:")
        print(f"  new tokens: {report['tokens']}")
        if reference is not None:
            torch.manual_seed(seed)
            same = torch.equal(generated.cpu(), reference_generate(reference, ids, max_new_tokens, **settings))
            report["generate_equals_eager"] = same
            print(f"  equal to eager {how}: {same}")
    elif max_new_tokens:
        print(f"  greedy decoding runs on the built-in models and models with a generate method (Hugging Face); "
              f"{type(model).__name__} ran one forward")
    program.close()
    return report


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moesys-compile infer", description="memory-ring inference of MODEL")
    p.add_argument("model", nargs="?", help="built-in name (tiny-moe), package.module:factory, hf:<family> or a directory")
    p.add_argument("--checkpoint", help="directory to load the weights from: Hugging Face style (safetensors, "
                                        "sharded or not, or pytorch_model.bin), a training checkpoint, or a "
                                        "training run's --ckpt-dir (its newest step)")
    p.add_argument("--budget", required=True, help="device budget, e.g. 512MiB or 1073741824")
    p.add_argument("--weights", choices=("host", "disk"), default="host", help="storage tier of the weights")
    p.add_argument("--offload-dir", help="directory for the disk tier (default: a temporary directory)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--slots", type=int, help="ring depth (default: derived from the budget)")
    p.add_argument("--config", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="model config overrides (one or more, repeatable)")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt-ids", nargs="+", type=_token_ids, help="prompt token ids, space- or "
                                                                          "comma-separated (default: 16 random ids)")
    prompt.add_argument("--prompt", metavar="TEXT", help="prompt text, encoded (and the new tokens decoded) with the "
                                                         "tokenizer of --tokenizer, MODEL or --checkpoint")
    p.add_argument("--tokenizer", metavar="DIR", help="Hugging Face tokenizer directory for --prompt "
                                                      "(default: MODEL's or --checkpoint's directory)")
    p.add_argument("--max-new-tokens", type=int, default=8,
                   help="tokens to generate with a KV cache (0: forward only); a Hugging Face model "
                        "whose cache cannot be captured recomputes the sequence each step, with a warning")
    sample = p.add_argument_group("sampling (Hugging Face models; default: greedy decoding)")
    sample.add_argument("--do-sample", action="store_true", help="sample the new tokens, as model.generate("
                                                                 "do_sample=True) with the model's generation_config")
    sample.add_argument("--temperature", type=float, help="sampling temperature (over the model's)")
    sample.add_argument("--top-k", type=int, help="sample among the k likeliest tokens (over the model's; 0: all)")
    sample.add_argument("--top-p", type=float, help="sample among the likeliest tokens whose probabilities add up "
                                                    "to p (over the model's)")
    sample.add_argument("--seed", type=int, default=0, help="torch.manual_seed before sampling (default 0)")
    p.add_argument("--no-compare", action="store_true", help="skip the eager comparison (it needs host memory)")
    p.add_argument("--json", help="write the stats to this file")
    return p


def _token_ids(text: str) -> list[int]:
    """One ``--prompt-ids`` word: an id, or ids joined by commas ("1,2,3")."""
    try:
        return [int(word) for word in text.split(",") if word.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a token id (integers, space- or comma-separated)") from None


def prompt_tensor(prompt_ids: list[int], model: nn.Module, given: Optional[str] = None) -> torch.Tensor:
    """The prompt ids as a [1, n] tensor; ids outside the model's vocabulary are refused here
    rather than as an index error deep inside the embedding. ``given``: the ``--prompt`` text and
    the tokenizer's directory they were encoded from, for the refusal (None: ``--prompt-ids``)."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    bad = [i for i in prompt_ids if i < 0 or (vocab is not None and i >= vocab)]
    if not bad:
        return torch.tensor([prompt_ids])
    within = f"token ids must lie in 0..{vocab - 1 if vocab else 'vocab_size - 1'} (the model's vocab_size is {vocab})"
    if given is None:
        raise ValueError(f"--prompt-ids {bad}: {within}")
    raise ValueError(f"--prompt {given} encodes to token ids {bad} outside the model's vocabulary: {within}; the "
                     f"tokenizer is not this model's: pass the model's own with --tokenizer DIR")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(*directories: Optional[str]):
    """The Hugging Face tokenizer of the first of ``directories`` that holds one (local files only)."""
    for directory in filter(None, directories):
        if any((Path(directory) / name).is_file() for name in TOKENIZER_FILES):
            from transformers import AutoTokenizer
            return AutoTokenizer.from_pretrained(directory, local_files_only=True)
    searched = [d for d in directories if d] or ["(no directory: MODEL is not a directory)"]
    raise ValueError(f"--prompt needs a tokenizer, and none of {searched} holds one ({', '.join(TOKENIZER_FILES)}); "
                     f"pass --tokenizer DIR (a Hugging Face tokenizer directory), or token ids with --prompt-ids")


def prompt_of(args, model: nn.Module, example_inputs):
    """The [1, n] prompt ids of the command line and the tokenizer to decode with (or None)."""
    if args.prompt is not None:
        model_dir = args.model if args.model and Path(args.model).is_dir() else None
        tokenizer = load_tokenizer(args.tokenizer, model_dir, args.checkpoint)
        ids = tokenizer(args.prompt, return_tensors="pt").input_ids
        if ids.shape[1] == 0:
            raise ValueError(f"--prompt {args.prompt!r} encodes to no tokens; give a longer prompt")
        given = f"{args.prompt!r} (tokenizer of {tokenizer.name_or_path!r})"
        return prompt_tensor(ids[0].tolist(), model, given), tokenizer
    if args.prompt_ids:
        return prompt_tensor([i for ids in args.prompt_ids for i in ids], model), None
    return example_inputs(1, 16)[0], None


def sampling_settings(args, parser: argparse.ArgumentParser) -> Optional[dict]:
    """The generation settings of ``--do-sample`` and its options (None: greedy decoding);
    a sampling option without ``--do-sample`` is refused, since greedy decoding ignores it."""
    chosen = {name: getattr(args, name) for name in ("temperature", "top_k", "top_p")
              if getattr(args, name) is not None}
    if not args.do_sample:
        if chosen:
            flags = ", ".join("--" + name.replace("_", "-") for name in chosen)
            parser.error(f"the sampling options ({flags}) apply only with --do-sample: add it (without it, "
                         f"decoding is greedy)")
        return None
    return {"do_sample": True, **chosen}


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .models.hf import overrides_blamed
    from .models.spec import load_model, model_and_overrides
    parser = _parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.max_new_tokens < 0:
        parser.error(f"--max-new-tokens ({args.max_new_tokens}) must be >= 0 (0: forward only)")
    sampling = sampling_settings(args, parser)
    try:
        model, overrides = model_and_overrides(args.model, args.config)
        if model is None:
            parser.error("the following arguments are required: model")
        if args.checkpoint and not os.path.isdir(args.checkpoint):
            raise ValueError(f"--checkpoint {args.checkpoint!r} is not a directory; pass a Hugging Face style "
                             f"directory, a training checkpoint or a training run's --ckpt-dir")
        # weights from a checkpoint (--checkpoint, or MODEL's own directory) are only ever streamed
        checkpoint = args.checkpoint or (model if os.path.isdir(model) else None)
        torch.manual_seed(0)      # fresh weights are the same on every run (hf:<family> seeds its own)
        loaded = load_model(model, overrides, weights=checkpoint is None)
        loaded.model.eval()
        if sampling and isinstance(loaded.model, Transformer):
            raise ValueError(f"--do-sample: the built-in model {model} decodes greedily only; sample with a "
                             f"Hugging Face model (hf:<family> or a model directory), or drop --do-sample")
        ids, tokenizer = prompt_of(args, loaded.model, loaded.example_inputs)
        reference = None if args.no_compare else eager_reference(model, overrides, args.checkpoint, loaded.model)
        with tempfile.TemporaryDirectory(prefix="moesys-ring-") as scratch:
            plan = Plan(mode="infer", device=args.device, device_budget=parse_bytes(args.budget, "--budget"),
                        weights=args.weights, offload_dir=args.offload_dir or scratch, ring_slots=args.slots,
                        weights_checkpoint=checkpoint, options={"progress": True})
            print(f"{loaded.description}: {format_bytes(model_bytes(loaded.model))} of weights, budget "
                  f"{format_bytes(plan.device_budget)}, tier {plan.weights}")
            with overrides_blamed(checkpoint, overrides):
                report = run_ring(loaded.model, ids, plan, args.max_new_tokens, reference, sampling, args.seed)
        if tokenizer is not None and "tokens" in report:
            report["text"] = tokenizer.decode(report["tokens"][0], skip_special_tokens=True)
            print(f"  new text: {report['text']!r}")
    except (MoesysError, ValueError) as exc:
        print(f"moesys-compile infer: error: {name_flags(str(exc), FLAG_OF_FIELD)}", file=sys.stderr)
        return 2
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


def eager_reference(model: str, overrides: dict, checkpoint: Optional[str], ring_model: nn.Module) -> nn.Module:
    """The eager model the ring is compared with, holding the ring's weights: ``ring_model`` when it
    has them, else MODEL loaded whole (from its directory, or with ``checkpoint`` copied in)."""
    from .models.spec import load_model
    if not meta_tensor_names(ring_model):
        return ring_model
    reference = load_model(model, overrides).model.eval()
    if checkpoint:
        from .runtime.sources import checkpoint_source
        read = checkpoint_source(checkpoint, reference)
        with torch.no_grad():
            for name, tensor in reference.state_dict(keep_vars=True).items():
                tensor.copy_(read(name))
    return reference


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
