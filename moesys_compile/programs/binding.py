"""Map a call's (args, kwargs) to the captured graph's inputs, and its outputs back to the
model's output structure."""

from __future__ import annotations

import inspect
from typing import Any, Optional, Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from ..frontend.adapters import AdapterState
from ..frontend.hf_capture import given_keyword, refuse_use_cache, switch_defaults


CONSTANT_TYPES = (bool, int, float, str)
NOT_A_CONSTANT = object()   # an example's flat input that is a tensor (or another object)


class CapturedSizeError(ValueError):
    """A call's input sizes differ from one that torch.export fixed while capturing, or fail a
    condition on them that it recorded (a guard)."""


class InputBinder:
    """Binds calls the way the example was bound when the model was captured.

    fx capture: one graph input per traced forward argument (the argument itself, whatever its
    structure); arguments the example did not give were pinned to their defaults and must stay so.
    export capture: the graph takes the flattened leaves; ``out_spec`` rebuilds the output.
    """

    def __init__(self, model: nn.Module, traced_names: Sequence[str], capture: str,
                 out_spec: Optional[pytree.TreeSpec] = None, fixed_sizes: Sequence[Optional[dict[int, int]]] = (),
                 guards: Optional[nn.Module] = None):
        self.model = model
        self.signature = inspect.signature(model.forward)
        self.model_name = type(model).__name__
        self.traced_names = list(traced_names)
        self.capture = capture
        self.out_spec = out_spec
        self.fixed_sizes = list(fixed_sizes)    # export capture: per flat input, {dim: the size it was fixed to}
                                                # (None: not a tensor)
        self.guards = guards                    # export capture: its conditions on the input sizes, if any
        self.pinned = {name: p.default for name, p in self.signature.parameters.items()
                       if name not in self.traced_names and p.default is not inspect.Parameter.empty}
        self.example_shapes: list[Optional[tuple[int, ...]]] = []   # per graph input (None: not a tensor)
        self.example_structure: Optional[list[Any]] = None   # export capture: per traced argument, its
                                                             # containers as the example had them (leaves None)
        self.example_constants: list[Any] = []   # export capture: per flat input, its value if a bool, int,
                                                 # float or str (export keeps it), else NOT_A_CONSTANT
        self.var_keyword = next((name for name, p in self.signature.parameters.items()
                                 if p.kind is inspect.Parameter.VAR_KEYWORD), None)
        self.example_extra: Optional[list[str]] = None   # the names the example gave through **kwargs
        self.mask_dtype: Optional[torch.dtype] = None   # the example's [batch, seq] attention_mask, if any
        self.switch_defaults = switch_defaults(model)   # HF output switches: their values when left out
        self.example_switches: dict[str, Any] = {}      # ... those the example gave, as it gave them
        self.compiled_switches: dict[str, Any] = {}     # ... and the value each had in the example
        self.adapters = AdapterState.of(model)          # a PeftModel's adapters as compiled, else None

    def remember_example(self, args: Sequence[Any], kwargs: dict) -> list[Any]:
        """Bind the example and keep its tensors' shapes, so that a call whose tensor has another
        number of dims is refused by name (``graph_inputs``), and whether it passed a padding mask
        shaped as its ids; returns the example's graph inputs."""
        if self.capture == "export":
            self.example_structure = [pytree.tree_map(lambda _: None, value)
                                      for value in self._traced_values(args, kwargs)]
        flat = self.graph_inputs(args, kwargs)
        self.example_shapes = [tuple(v.shape) if isinstance(v, torch.Tensor) else None for v in flat]
        if self.capture == "export":
            self.example_constants = [v if isinstance(v, CONSTANT_TYPES) else NOT_A_CONSTANT for v in flat]
        example = self.signature.bind(*args, **kwargs).arguments
        self.example_extra = list(example.get(self.var_keyword, {}))
        mask, ids = example.get("attention_mask"), example.get("input_ids")
        if isinstance(mask, torch.Tensor) and isinstance(ids, torch.Tensor) and mask.shape == ids.shape:
            self.mask_dtype = mask.dtype
        accepted = [name for name in self.switch_defaults if name in self.signature.parameters or self.var_keyword]
        self.example_switches = {name: value for name in accepted
                                 if (value := given_keyword(example, name, self.var_keyword)) is not None}
        self.compiled_switches = {name: self.example_switches.get(name, self.switch_defaults[name])
                                  for name in accepted}
        return flat

    def _settle_switches(self, arguments: dict) -> None:
        """A Hugging Face output switch (``use_cache``, ``return_dict``, ``output_hidden_states``,
        ...) that a call gives, or leaves out, at the value the program was compiled with is
        rewritten to the example's form, so that restating it (``use_cache=False`` in a training
        loop) is not refused as an input the program lacks. Programs return no cache, so any
        ``use_cache`` but True matches, except with position ids that restart mid-row: transformers
        reads those as packed sequences only without a cache, so there it must resolve as the
        example's did. Another value is left for the checks that refuse it."""
        for name, compiled in self.compiled_switches.items():
            value = given_keyword(arguments, name, self.var_keyword)
            if value is not None and not isinstance(value, bool):
                continue
            resolved = self.switch_defaults[name] if value is None else value
            if resolved == compiled or (name == "use_cache" and not _restarts_mid_row(arguments.get("position_ids"))):
                self._restate(arguments, name, self.example_switches.get(name))
            elif name == "use_cache":
                raise ValueError(f"{self.model_name}.forward: use_cache resolves to {resolved} in this call but to "
                                 f"{compiled} in the example, and its position_ids restart mid-row: transformers "
                                 f"reads those as packed sequences only without a cache, so the program keeps the "
                                 f"example's reading; "
                                 + ("leave use_cache out" if compiled else "pass use_cache=False") + ", as it did")

    def _restate(self, arguments: dict, name: str, value: Any) -> None:
        """Keyword ``name`` in bound ``arguments`` set to ``value`` where the signature takes it
        (by name, else through ``**kwargs``), or removed for None."""
        extra = arguments.get(self.var_keyword, {}) if self.var_keyword else {}
        arguments.pop(name, None)
        extra.pop(name, None)
        if value is None:
            return
        if name in self.signature.parameters:
            arguments[name] = value
        else:
            arguments[self.var_keyword] = {**extra, name: value}

    def _check_extra_keywords(self, arguments: dict) -> None:
        """Keywords that reach ``forward``'s ``**kwargs`` (transformers' ``output_hidden_states``,
        ``return_dict``, a misspelt name) were captured only where the example gave them: others
        are refused by name rather than dropped (None, like leaving them out, is dropped), and
        those it gave must be given again."""
        if self.var_keyword is None or self.example_extra is None:
            return
        given = arguments.get(self.var_keyword, {})
        unknown = sorted(name for name, value in given.items() if name not in self.example_extra and value is not None)
        if unknown:
            raise ValueError(f"{self.model_name}.forward: keyword argument(s) {unknown} were not given when the model "
                             f"was compiled, so the program cannot take them (it would ignore them); pass them in "
                             f"example_kwargs to compile them in")
        missing = [name for name in self.example_extra if name not in given]
        if missing:
            raise TypeError(f"{self.model_name}.forward: keyword argument(s) {missing} were given when the model was "
                            f"compiled; pass them in every call")
        if self.example_extra:
            arguments[self.var_keyword] = {name: given[name] for name in self.example_extra}
        else:
            arguments.pop(self.var_keyword, None)

    def _mask_of_ones(self, arguments: dict) -> None:
        """A model compiled with a padding mask, called without one (or with None): every position
        counts, as transformers reads ``attention_mask=None``; the mask is all ones, shaped as the
        call's ids."""
        ids, mask = arguments.get("input_ids"), arguments.get("attention_mask")
        if self.mask_dtype is not None and mask is None and isinstance(ids, torch.Tensor):
            arguments["attention_mask"] = torch.ones(ids.shape, dtype=self.mask_dtype, device=ids.device)
        if (self.mask_dtype is not None and isinstance(mask, torch.Tensor) and isinstance(ids, torch.Tensor)
                and mask.shape != ids.shape and mask.dim() == ids.dim() == 2):
            raise ValueError(f"{self.model_name}.forward: attention_mask is {tuple(mask.shape)} but input_ids is "
                             f"{tuple(ids.shape)}; a padding mask has one entry per token: give it the ids' shape")

    def check_adapters(self) -> None:
        """A PeftModel's adapters are as they were when it was compiled (``adapters.AdapterState``)."""
        if self.adapters is not None:
            self.adapters.check(self.model_name)

    def _traced_values(self, args: Sequence[Any], kwargs: dict) -> list[Any]:
        """The call's values of the traced arguments, bound and checked as the example was."""
        self.check_adapters()
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{self.model_name}.forward: {exc}") from None
        refuse_use_cache(self.model, bound.arguments, "this call")
        self._settle_switches(bound.arguments)
        for name, default in self.pinned.items():
            if name in bound.arguments and bound.arguments[name] is not default and bound.arguments[name] != default:
                raise ValueError(f"argument '{name}' was fixed to {default!r} when the model was compiled; "
                                 f"pass it in example_inputs/example_kwargs to compile it as an input")
        self._mask_of_ones(bound.arguments)
        self._check_extra_keywords(bound.arguments)
        missing = [name for name in self.traced_names if name not in bound.arguments]
        if missing:
            raise TypeError(f"{self.model_name}.forward: missing argument(s) {missing}, which the example gave, so the "
                            f"program takes them as inputs: pass them in every call, or compile without them to "
                            f"leave them at the model's defaults")
        return [bound.arguments[name] for name in self.traced_names]

    def graph_inputs(self, args: Sequence[Any], kwargs: dict) -> list[Any]:
        values = self._traced_values(args, kwargs)
        if self.capture != "export":
            self._check_dims(self.traced_names, values)
            self._refuse_none(self.traced_names, values, [shape is not None for shape in self.example_shapes])
            return values
        if self.example_structure is not None:
            values = [self._in_example_structure(value, structure, name)
                      for name, value, structure in zip(self.traced_names, values, self.example_structure)]
        leaves = pytree.tree_flatten_with_path(dict(zip(self.traced_names, values)))[0]
        names = [self._leaf_name(path) for path, _ in leaves]
        self._check_dims(names, [v for _, v in leaves])
        self._refuse_none(names, [leaf for _, leaf in leaves], [fixed is not None for fixed in self.fixed_sizes])
        self._check_constants(names, [leaf for _, leaf in leaves])
        for (path, leaf), fixed in zip(leaves, self.fixed_sizes):
            for dim, size in (fixed or {}).items():
                if isinstance(leaf, torch.Tensor) and leaf.dim() > dim and leaf.shape[dim] != size:
                    where = f"{path[0].key}{pytree.keystr(path[1:])}.shape[{dim}]"
                    raise CapturedSizeError(
                        f"{where} is {leaf.shape[dim]}, but torch.export captured {self.model_name} with that size "
                        f"fixed to {size}: export fixes an example size of 1, and a size the model's code "
                        f"specialises on (a loop over the sequence, a branch on a length); call it with that size, "
                        f"or compile with example inputs whose batch and sequence are >= 2 where the example's "
                        f"was 1")
        flat = [leaf for _, leaf in leaves]
        if self.guards is not None:
            try:
                self.guards(*flat)
            except AssertionError as exc:
                raise CapturedSizeError(
                    f"the input sizes {[tuple(t.shape) for t in flat if isinstance(t, torch.Tensor)]} fail a condition "
                    f"torch.export recorded while capturing {self.model_name} ({exc}); compile with example inputs "
                    f"of this size, or call it with sizes that meet it") from None
        return flat

    def _in_example_structure(self, value: Any, structure: Any, where: str) -> Any:
        """``value`` with its dicts in the order of the example's keys: torch.export fixed the
        structure of the inputs, and the graph takes their leaves in the example's order. A dict
        with other keys, or a list or tuple of another length, is refused by name."""
        if isinstance(structure, dict) and isinstance(value, dict):
            extra, missing = [k for k in value if k not in structure], [k for k in structure if k not in value]
            if extra or missing:
                raise ValueError(f"{self.model_name}.forward: {where} has the keys {list(value)}, but the example's "
                                 f"were {list(structure)}: torch.export fixed the structure of the inputs, so the "
                                 f"program takes those keys only; call it with them (in any order), or compile with "
                                 f"an example that has these")
            return {k: self._in_example_structure(value[k], structure[k], f"{where}[{k!r}]") for k in structure}
        if isinstance(structure, (list, tuple)) and isinstance(value, (list, tuple)):
            if len(value) != len(structure):
                raise ValueError(f"{self.model_name}.forward: {where} holds {len(value)} items, but the example's held "
                                 f"{len(structure)}: torch.export fixed the structure of the inputs; call it with "
                                 f"{len(structure)}, or compile with an example of {len(value)}")
            items = [self._in_example_structure(item, item_structure, f"{where}[{i}]")
                     for i, (item, item_structure) in enumerate(zip(value, structure))]
            return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
        return value

    def _leaf_name(self, path: tuple) -> str:
        """A flat input's name as the caller wrote it: ``output_hidden_states`` for a keyword that
        reached ``**kwargs``, ``past['k']`` for a leaf inside an argument."""
        if path[0].key == self.var_keyword and len(path) > 1:
            path = path[1:]
        return f"{path[0].key}{pytree.keystr(path[1:])}"

    def _check_constants(self, names: list[str], values: list[Any]) -> None:
        """A bool, int, float or str the example gave (``output_hidden_states=True``,
        ``return_dict=False``) is a constant of the exported graph: a call giving another value is
        refused by name before the export guards would blame the input sizes."""
        for name, value, compiled in zip(names, values, self.example_constants):
            if compiled is not NOT_A_CONSTANT and (isinstance(value, torch.Tensor) or value != compiled):
                raise ValueError(f"{self.model_name}.forward: {name} is {value!r}, but the program was compiled with "
                                 f"{name}={compiled!r} and keeps that value; pass {name}={compiled!r}, or compile "
                                 f"again with {name}={value!r} in example_inputs/example_kwargs")

    def _refuse_none(self, names: list[str], values: list[Any], compiled_tensor: list[bool]) -> None:
        """A graph input given as None where the model was compiled with a tensor (an optional
        argument): the graph computes with a tensor there, so it is refused by name rather than
        failing inside the graph's code."""
        missing = [name for name, value, tensor in zip(names, values, compiled_tensor) if value is None and tensor]
        if missing:
            raise TypeError(f"{self.model_name}.forward: {', '.join(missing)} is None, but it was compiled with a tensor "
                            f"there; pass one as in example_inputs/example_kwargs, or compile with an example "
                            f"without it")

    def _check_dims(self, names: list[str], values: list[Any]) -> None:
        for name, value, shape in zip(names, values, self.example_shapes):
            if isinstance(value, torch.Tensor) and shape is not None and value.dim() != len(shape):
                fix = (f"pass {name}[None] for a single sequence" if value.dim() == len(shape) - 1
                       else "pass it shaped as the example")
                raise ValueError(f"{self.model_name}.forward: {name} has {value.dim()} dims (shape "
                                 f"{tuple(value.shape)}), but the model was compiled with {len(shape)} (example "
                                 f"shape {shape}); {fix}")

    def model_output(self, graph_output: Any) -> Any:
        if self.out_spec is None:
            return graph_output
        return pytree.tree_unflatten(list(graph_output), self.out_spec)


def _restarts_mid_row(position_ids: Any) -> bool:
    """Whether ``position_ids`` (a tensor) fail to count up by one somewhere along a row."""
    return isinstance(position_ids, torch.Tensor) and position_ids.dim() > 0 and position_ids.shape[-1] > 1 and bool(
        (position_ids.diff(dim=-1) != 1).any())


def fixed_input_sizes(gm: fx.GraphModule) -> list[dict[int, int]]:
    """Per graph input of an exported module, the dims its capture fixed to one size (plain ints
    in the placeholder's ``val``, or symbols its shape env replaced by a number); None for an input
    that is no tensor."""
    vals = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    return [{d: fixed for d, fixed in enumerate(map(_fixed_size, val.shape)) if fixed is not None}
            if isinstance(val, torch.Tensor) else None for val in vals]


def _fixed_size(size: Any) -> Optional[int]:
    if not isinstance(size, torch.SymInt):
        return int(size)
    node = size.node
    expr = node.shape_env.replace(node.expr) if node.shape_env is not None else node.expr
    return int(expr) if expr.is_number else None


def flatten_export_codegen(gm: fx.GraphModule) -> Optional[pytree.TreeSpec]:
    """Give an exported module a plain flat signature; return its output spec (None for fx graphs)."""
    codegen = gm.graph._codegen
    info = getattr(codegen, "pytree_info", None)
    if info is None:
        return None
    gm.graph._codegen = fx.graph.CodeGen()
    gm._forward_pre_hooks.clear()
    gm.recompile()
    return info.out_spec
