"""The block probe: a candidate canonical form replaces a block only when it computes what the block
computes, on random tokens at several magnitudes (``token_scales``) and, where asked, on crowds of
near-identical tokens that all choose the same experts (``block_capacity``: a block that drops
tokens past a capacity is never taken for a dropless one), and when no form that differs from it
in the experts' activation alone, or in a routing rule that routes otherwise, does too
(``exact_form``).

    >>> found, diff, why = exact_form(block, forms, build, make_probe)      # doctest: +SKIP

Shape legend: B batch · S sequence · D model dim · T tokens · E experts · K top-k.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import replace
from fractions import Fraction
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from .router_rules import same_routing
from .structure import CAPACITY_ATTRS, close, first_param, generator, number_attr

PROBE_PRE_ACTIVATION_STDS = (16.0, 2.0)
MODE_DIFFERS = ("the block computes differently in {mode} mode (it reads self.training beyond dropout "
                "modules), and a canonical form computes one result in both")
CROWD_DIFFERS = ("it computes otherwise when many tokens choose the same expert than when they spread: it drops "
                 "(or moves) tokens past a capacity, which a dropless canonical form does not")
NO_CAPACITY = "the block holds no capacity_factor, so the capacity it drops past is unknown"
CROWD = (2, 48)          # [B, S] of the crowd every probe that asks for crowds runs: a capacity under 96 overflows
CROWD_SPREAD = 1e-2      # the crowd's tokens: one random token plus this much noise (distinct, same experts)
MAX_CAPACITY_TOKENS = 1024
PROBE_SEED = 0


def token_scales(expert_weights: list[Tensor], dim: int) -> tuple[float, ...]:
    """Powers of two by which the probe's unit tokens are scaled so that the experts'
    pre-activations spread about each of ``PROBE_PRE_ACTIVATION_STDS``. At 16 the activations leave
    their linear range: at initialisation scale (std 0.02) pre-activations stay near zero, where a
    clamp (limit 10) or a softcap (Inkling 2's tanh(x / 4) * 4) is the identity, and an unclamped
    form would pass the probe, then differ on trained weights (this scale never shrinks the
    tokens). At 2 the activations that agree on large inputs differ most: exact and tanh GELU by up
    to 5e-4 (at |x| = 2.7), quick GELU x sigmoid(1.702 x) by 2e-2. The spread is read from one
    expert's weight (no copy of a whole stacked layer).

        >>> token_scales([torch.full((4, 8, 16), 0.02)], 16)
        (256.0, 32.0)
    """
    if not expert_weights:
        return (1.0,)
    one = expert_weights[0].detach()
    one = one[0] if one.dim() == 3 else one
    std = one.float().pow(2).mean().sqrt().item() * dim ** 0.5
    if not std > 0:
        return (1.0,)
    exponents = [round(math.log2(target / std)) for target in PROBE_PRE_ACTIVATION_STDS]
    return (2.0 ** max(0, exponents[0]), *(2.0 ** e for e in exponents[1:]))


def block_capacity(block: nn.Module, top_k: int, num_experts: int) -> tuple[float, list[tuple[int, int]], str]:
    """(capacity factor a canonical form of ``block`` may drop with (0: none), the [B, S] sizes of
    the crowds to probe it on, a note on its capacity for the reason it is left, "" where it holds
    none). Every block is probed on ``CROWD``: near-identical tokens that all choose the same
    experts overflow any capacity under 96, so a block that drops tokens there matches no dropless
    form. Its own capacity is taken only where probing can establish it: the block holds a
    ``capacity_factor`` (or ``cf``), it routes top-1 (with k > 1, GShard and others differ in which
    slot of a token claims capacity first, which crowds of one ranking do not show), and factor x
    tokens / E is exact in binary floating point (a factor in 1/1024 steps, a power-of-two E), so
    however the block computes it, only its rounding can differ from ``ops.expert_capacity``'s
    ceil: the crowds then cover every token count 2..32, whose capacities fall below, above and on
    whole numbers, and the first count whose capacity is whole (where ceil and floor + 1 differ).

        >>> block_capacity(nn.Module(), 1, 4)
        (0.0, [(2, 48)], '')
    """
    crowds = [CROWD]
    factor = number_attr(block, CAPACITY_ATTRS, None)
    if factor is None or isinstance(factor, bool) or not 0 < factor < math.inf:
        return 0.0, crowds, ""
    if top_k != 1:
        return 0.0, crowds, (f"its capacity_factor ({factor:g}) is not taken: with top_k={top_k} the order in which "
                             f"a token's slots claim capacity cannot be established by probing")
    if Fraction(factor).denominator > 1024 or num_experts & (num_experts - 1):
        return 0.0, crowds, (f"its capacity_factor ({factor:g}) x tokens / {num_experts} experts is not exact in "
                             f"binary floating point, so the capacity the block's own formula rounds to cannot be "
                             f"established (exact: a factor in 1/1024 steps, a power-of-two expert count)")
    whole = max(2, (Fraction(factor) / num_experts).denominator)   # the fewest tokens (>= 2) of a whole capacity
    if whole > MAX_CAPACITY_TOKENS:
        return 0.0, crowds, (f"its capacity_factor ({factor:g}) x tokens / {num_experts} experts is a whole number "
                             f"only every {whole} tokens, more than the probe runs ({MAX_CAPACITY_TOKENS}), so how "
                             f"the block rounds it there cannot be established")
    crowds += [(1, t) for t in range(2, 33)] + ([(1, whole)] if whole > 32 else [])
    return float(factor), crowds, (f"dropping past GShard capacity with its capacity_factor ({factor:g}), the first "
                                   f"ceil({factor:g} x tokens / {num_experts}) tokens an expert receives kept, does "
                                   f"not reproduce it either")


class BlockProbe:
    """Compares candidate canonical forms with the original block on the same random tokens
    [B, S, D], scaled by each of ``scales`` (``token_scales``), then on ``crowds``: for each [B, S],
    one random token plus a little noise, at the last scale (``block_capacity``). The original runs
    once per input, and a candidate matches when it matches on every input. ``rescale(scale)``, when
    given, runs before the runs at a scale (the randomised router's copy keeps its logits those of
    unit tokens). ``pick`` selects what to compare from the outputs: one tensor, or a tuple
    (output, router values...) whose other items are the router's [tokens, k] weights or ids
    (gpt-oss returns its router scores) or its [tokens, experts] logits (Llama 4); the candidate
    is then told to return the same, and in the same shape: [B, S, D], or [tokens, D] (Llama 4)
    (``extra_outputs``)."""

    CANNOT_RUN = "the block cannot run on [batch, seq, dim]"    # the problem when the original fails

    def __init__(self, original: nn.Module, dim: int, pick=lambda out: out, tokens: tuple[int, int] = (2, 4),
                 scales: Sequence[float] = (1.0,), rescale: Optional[Callable[[float], None]] = None,
                 crowds: Sequence[tuple[int, int]] = ()):
        param = first_param(original)
        dtype = token_dtype(original)
        gen = generator()
        x_BSD = torch.randn(*tokens, dim, generator=gen)
        # (scale, tokens, crowded); powers of two: exact
        inputs = [(scale, x_BSD * scale, False) for scale in scales]
        for batch, seq in crowds:
            crowd_BSD = x_BSD[0, 0] + CROWD_SPREAD * torch.randn(batch, seq, dim, generator=gen)
            inputs.append((scales[-1], crowd_BSD * scales[-1], True))
        self.inputs = [(scale, x.to(device=param.device, dtype=dtype), crowded) for scale, x, crowded in inputs]
        self.original, self.pick, self.rescale = original, pick, rescale
        self._want: dict[tuple[bool, int], Any] = {}   # the original's output in each mode on each input
        self.problem = ""   # why the original cannot be compared (it returns a tuple, it fails, ...)
        self.mode_differs = ""   # the other mode, where a candidate that matched in the block's own did not
        self.crowd_differs = False   # a candidate matched the spread tokens, not a crowd

    def _run(self, module: nn.Module, x_BSD: Tensor) -> Any:
        """``module`` on a copy of ``x_BSD`` from one random state: code a candidate keeps as the
        model's own (a router that samples in training mode) draws what the original drew, and
        code that writes into its input (Switch Transformers' router jitter, in place) leaves the
        probe's tokens as they were for the next run."""
        with torch.no_grad(), torch.random.fork_rng(devices=[x_BSD.device] if x_BSD.is_cuda else []):
            torch.manual_seed(PROBE_SEED)
            out = self.pick(module(x_BSD.clone()))
        comparable = isinstance(out, Tensor) or (
            isinstance(out, tuple) and len(out) > 1 and all(isinstance(item, Tensor) for item in out))
        if module is self.original and not comparable:
            self.problem = f"the block returns a {type(out).__name__}, not one tensor"
        return out if comparable else None

    def _extra_outputs(self, want: tuple, top_k: int, num_experts: int, x_BSD: Tensor) -> Optional[tuple[str, ...]]:
        """What each item after the first of the original's tuple is, for a router of ``top_k`` over
        ``num_experts``: [tokens, top_k] weights or ids, or [tokens, experts] logits."""
        num_tokens = x_BSD.shape[0] * x_BSD.shape[1]
        names = []
        for item in want[1:]:
            if item.shape == (num_tokens, top_k):
                names.append("weights" if item.is_floating_point() else "ids")
            elif item.shape == (num_tokens, num_experts) and item.is_floating_point():
                names.append("logits")
            else:
                self.problem = ("the block returns a tuple whose items after the first are not the router's "
                                "[tokens, top_k] weights or ids, nor its [tokens, experts] logits")
                return None
        return tuple(names)

    def _original(self, index: int, x_BSD: Tensor) -> Any:
        key = (self.original.training, index)
        if key not in self._want and not self.problem:
            try:
                self._want[key] = self._run(self.original, x_BSD)
            except Exception as exc:  # noqa: BLE001 - recorded: the original cannot run on the probe's input
                self.problem = f"{self.CANNOT_RUN} ({type(exc).__name__}: {exc})"
                raise
        return self._want.get(key)

    def matches(self, replacement: nn.Module) -> tuple[bool, float]:
        """(equal within dtype rounding at every scale, max abs diff at the last scale compared); a
        candidate that cannot even run is wrong. For a tuple-returning original,
        ``replacement.extra_outputs`` is set to what it returns. A block is compared in the other
        mode too (its dropout modules kept off): code that reads ``self.training`` (another top-k
        in eval, router jitter in training) would otherwise be replaced by a form that computes
        its own mode's result in both, in the user's model as well."""
        ok, diff, crowded = self._matches_every_input(replacement)
        self.crowd_differs |= crowded
        if ok:
            with _in_other_mode(self.original, replacement) as other:
                ok, diff, _ = self._matches_every_input(replacement)
            self.mode_differs = self.mode_differs or ("" if ok else other)
        return ok, diff

    def _matches_every_input(self, replacement: nn.Module) -> tuple[bool, float, bool]:
        """(ok, diff, whether it failed on a crowd: the spread tokens come first, so it matched them)."""
        ok, diff = True, 0.0
        for index, (scale, x_BSD, crowded) in enumerate(self.inputs):
            if self.rescale is not None:
                self.rescale(scale)
            ok, diff = self._matches_at(replacement, index, x_BSD)
            if not ok:
                return ok, diff, crowded
        return ok, diff, False

    def _flat_output(self, output: Tensor, x_BSD: Tensor) -> bool:
        """Whether the original returns its output as [tokens, dim] for [B, S, D] tokens (Llama 4)."""
        return output.dim() == 2 and x_BSD.dim() == 3

    def _matches_at(self, replacement: nn.Module, index: int, x_BSD: Tensor) -> tuple[bool, float]:
        try:
            want = self._original(index, x_BSD)
            if want is None:
                return False, float("inf")
            if isinstance(want, tuple):
                extras = self._extra_outputs(want, replacement.top_k, replacement.num_experts, x_BSD)
                if extras is None:
                    return False, float("inf")
                replacement.extra_outputs = extras
            replacement.flat_output = self._flat_output(want[0] if isinstance(want, tuple) else want, x_BSD)
            got = self._run(replacement, x_BSD)
        except Exception:  # noqa: BLE001
            return False, float("inf")
        finally:
            if hasattr(replacement, "aux_loss"):
                replacement.aux_loss = None
        return _compare(got, want)


@contextlib.contextmanager
def _in_other_mode(original: nn.Module, *others: nn.Module) -> Iterator[str]:
    """Within, ``original`` and ``others`` are in the mode ``original`` is not in (yields its name),
    dropout modules kept in eval mode; after, every module has its own flag back."""
    modules = (original, *others)
    flags = [(m, m.training) for module in modules for m in module.modules()]
    training = not original.training
    for module in modules:
        module.train(training)
        for dropout in module.modules():
            if isinstance(dropout, nn.modules.dropout._DropoutNd):
                dropout.eval()
    try:
        yield "training" if training else "eval"
    finally:
        for module, flag in flags:
            module.training = flag


def _compare(got: Any, want: Any) -> tuple[bool, float]:
    """``close`` for one tensor, or item by item for tuples (ids must be equal)."""
    if isinstance(want, Tensor):
        return close(got, want) if isinstance(got, Tensor) else (False, float("inf"))
    if not isinstance(got, tuple) or len(got) != len(want):
        return False, float("inf")
    ok, diff = close(got[0], want[0])
    for g, w in zip(got[1:], want[1:]):
        if w.is_floating_point():
            item_ok, item_diff = close(g, w)
        else:
            item_ok, item_diff = g.shape == w.shape and torch.equal(g.long(), w.long()), 0.0
        ok, diff = ok and item_ok, max(diff, item_diff)
    return ok, diff


def rivals(form: dict, forms: Sequence[dict]) -> list[dict]:
    """The forms the probe must tell from ``form``: those that differ from it in the experts'
    activation alone (near activations), or in the routing rule alone where the rules route
    otherwise (``same_routing``: scores too peaked make a renormalised top-k look like a plain one)."""
    return [f for f in forms if _differs_in_activation_alone(f, form) or _differs_in_routing_alone(f, form)]


def _differs_in_activation_alone(a: dict, b: dict) -> bool:
    def without_activation(f: dict) -> dict:
        return {**f, "experts": replace(f["experts"], activation="")}
    return a["experts"].activation != b["experts"].activation and without_activation(a) == without_activation(b)


def _differs_in_routing_alone(a: dict, b: dict) -> bool:
    return ("router" in a and "router" in b and not same_routing(a["router"], b["router"])
            and {**a, "router": None} == {**b, "router": None})


LOW_PRECISION = (torch.bfloat16, torch.float16)


def low_precision_dtype(module: nn.Module) -> Optional[torch.dtype]:
    """The dtype of the module's bf16/fp16 parameters (the first such), None where it has none."""
    return next((p.dtype for p in module.parameters() if p.dtype in LOW_PRECISION), None)


def token_dtype(block: nn.Module) -> torch.dtype:
    """The dtype of the tokens ``block`` is probed on: its bf16/fp16 parameters' where it has some
    (its experts': a router kept in float32 beside them casts its input itself, as DeepSpeed's
    TopKGate and models with a float32 gate do, and the model feeds the block in the low precision),
    else its first parameter's."""
    return low_precision_dtype(block) or first_param(block).dtype


@contextlib.contextmanager
def in_float32(module: nn.Module) -> Iterator[None]:
    """Within, the module's bf16/fp16 parameters and buffers hold float32, in place (the same
    Parameter objects, so whatever adopted them sees it too), and float32 matmuls run without TF32;
    on exit all is as before, exactly (bf16 and fp16 widen to float32 without rounding). The block
    takes twice its bf16 bytes meanwhile."""
    low = [t for t in itertools.chain(module.parameters(), module.buffers()) if t.dtype in LOW_PRECISION]
    dtypes = [t.dtype for t in low]
    precision = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        with torch.no_grad():
            for t in low:
                t.data = t.data.float()
        yield
    finally:
        torch.set_float32_matmul_precision(precision)
        with torch.no_grad():
            for t, dtype in zip(low, dtypes):
                t.data = t.data.to(dtype)


def exact_form(module: nn.Module, forms: Sequence[dict], build: Callable[[dict], nn.Module],
               make_probe: Callable[[], BlockProbe]) -> tuple[Optional[dict], float, str]:
    """The first of ``forms`` (dicts holding an ``experts`` ExpertsSpec) whose canonical block
    ``build(form)`` reproduces ``module`` on ``make_probe()`` (a probe for the block's dtype as it
    is then), with ``extra_outputs`` set to what it returns; else None, the closest max abs diff
    and why. A block whose activation is none of ours, only near one, stays its own code: a form is
    only taken when no rival (``rivals``: an activation near its own, a routing rule the probe must
    tell from its own) reproduces the block too, and a bf16/fp16 block, whose rounding hides near
    activations (exact and tanh GELU differ by 5e-4, ReLU and a leaky one by 1% of x < 0), is probed
    again in float32 (``in_float32``).

    Pseudo-code:
        for form in forms:
            if probe matches build(form):
                tied = [form] + [rival for rival in rivals(form) if probe matches build(rival)]
                if bf16/fp16: in float32: tied = [f for f in tied if a float32 probe matches build(f)]
                return tied[0] if len(tied) == 1 else (None, why: the rivals tied or none exact)
        return None, closest diff, why
    """
    probe, best = make_probe(), float("inf")
    for form in forms:
        candidate = build(form)
        ok, diff = probe.matches(candidate)
        if not ok:
            best = min(best, diff)
            continue
        tied = [(form, candidate), *_matching(rivals(form, forms), build, probe)]
        exact, why = _settle(module, tied, build, make_probe)
        if why:
            return None, diff, why
        found, block = exact[0]
        return dict(found, extra_outputs=block.extra_outputs, flat_output=block.flat_output), diff, ""
    return None, best, probe.problem or (MODE_DIFFERS.format(mode=probe.mode_differs) if probe.mode_differs else
                                         CROWD_DIFFERS if probe.crowd_differs else "")


def _matching(forms: Sequence[dict], build: Callable[[dict], nn.Module],
              probe: BlockProbe) -> list[tuple[dict, nn.Module]]:
    """(form, its canonical block) for each of ``forms`` whose block reproduces the probed one."""
    built = [(form, build(form)) for form in forms]
    return [(form, block) for form, block in built if probe.matches(block)[0]]


def _settle(module: nn.Module, tied: list[tuple[dict, nn.Module]], build: Callable[[dict], nn.Module],
            make_probe: Callable[[], BlockProbe]) -> tuple[list[tuple[dict, nn.Module]], str]:
    """The one exact (form, block) of ``tied`` (a form and its rivals that match the probe too), or
    why there is none; a bf16/fp16 block is probed again in float32."""
    dtype = low_precision_dtype(module)
    exact = tied
    if dtype is not None:
        with in_float32(module):
            exact = _matching([form for form, _ in tied], build, make_probe())
    return exact, "" if len(exact) == 1 else _tie_reason(tied, exact, dtype)


def _rule(form: dict) -> str:
    return form["router"].describe() if "router" in form else ""


def _activation(form: dict) -> str:
    return form["experts"].activation


# what may tell tied forms apart: (it, what a tie in it means)
TIE_PARTS = ((_activation, "the experts' activation", "it is near these, none exactly"),
             (_rule, "the routing rule", "the probe's tokens do not tell these apart"))


def _tie_reason(tied: Sequence[tuple[dict, nn.Module]], exact: Sequence[tuple[dict, nn.Module]],
                dtype: Optional[torch.dtype]) -> str:
    """Why none of ``tied`` (forms matching the probe) is taken; ``exact``: those of them that match
    in float32 too, where the block is bf16/fp16 (``dtype``). One form alone, which float32 undoes,
    is taken to be near in its activation."""
    parts = [part for part in TIE_PARTS if len({part[0](form) for form, _ in tied}) > 1] or [TIE_PARTS[0]]
    subject = " and ".join(name for _, name, _ in parts)
    verb, meaning = "matches" if len(parts) == 1 else "match", parts[-1][2]

    def names(forms: Sequence[tuple[dict, nn.Module]]) -> list[str]:
        return [" with ".join(part(form) for part, _, _ in parts) for form, _ in forms]
    if dtype is None:
        return f"{subject} {verb} {names(tied)} alike: {meaning}"
    return (f"in {str(dtype).removeprefix('torch.')} {subject} {verb} {names(tied)}, and in float32 "
            f"{names(exact) or 'none of them'}: {meaning}")
