"""Public entry points: ``trace``, ``lower`` and ``compile``."""

from __future__ import annotations

import difflib
import inspect
import sys
from collections.abc import Mapping
from typing import Any, Optional, Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map

from moesys_compile.passes import pipeline_for

from .errors import PlanError, UntraceableModelError, warn_user
from .frontend import BlockReport, annotate, canonicalize, capture, moe_modules
from .frontend.annotation import batch_and_seq, input_dims
from .frontend.empty_weights import Source, accelerate_offloaded_modules, meta_tensor_names
from .frontend.tracing import distinct_inputs, expose_aux_loss, failing_eagerly_too, traced_names
from .models.spec import seq_limit
from .pipeline import CompileContext, run_pipeline, take_snapshot, timed, unlowered_copy
from .plan import MODES, Plan
from .programs import InputBinder, Program, build_program, fixed_input_sizes, flatten_export_codegen, sharded_weights
from .runtime.sources import named_tensors


def _as_tuple(example_inputs: Any) -> tuple:
    if example_inputs is None:
        return ()
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def _examples(model: nn.Module, example_inputs: Any, example_kwargs: Optional[dict]) -> tuple[tuple, dict]:
    """The example as (positional, keyword) inputs, checked to be inputs a trace can run on."""
    _check_not_keywords(model, example_inputs)
    args, kwargs = _as_tuple(example_inputs), dict(example_kwargs or {})
    _check_real_tensors(args, kwargs)
    return args, kwargs


def _check_not_keywords(model: nn.Module, example_inputs: Any) -> None:
    """A mapping given as ``example_inputs`` itself, keyed by forward's parameters, was meant as
    keywords (``tokenizer(...)``'s output); a dict that forward takes as one argument is passed in
    a tuple, or is keyed otherwise."""
    if not isinstance(example_inputs, Mapping) or not example_inputs:
        return
    parameters = inspect.signature(model.forward).parameters
    if all(isinstance(key, str) and key in parameters for key in example_inputs):
        keys = ", ".join(map(repr, example_inputs))
        raise UntraceableModelError(
            f"example_inputs is a {type(example_inputs).__name__} of {type(model).__name__}.forward's parameters "
            f"({keys}); pass keyword inputs as example_kwargs=dict(...), and a dict that forward takes as one "
            f"argument inside a tuple: example_inputs=(batch,)")


def examples_where_the_model_is(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The example's tensors on the device that holds the model's tensors (the CPU when they are
    all on the meta device), for an infer capture: a ring program's model stays in host memory
    while its calls, and the example, come on Plan.device; capture runs the model's code on the
    example, which must not mix devices. A model spread over several devices keeps the example as given."""
    devices = {tensor.device for tensor in named_tensors(model).values() if not tensor.is_meta}
    if len(devices) > 1:
        return args, kwargs
    device = devices.pop() if devices else torch.device("cpu")

    def moved(value):
        return value.to(device) if isinstance(value, torch.Tensor) and value.device != device else value
    return tree_map(moved, args), tree_map(moved, kwargs)


def _check_real_tensors(args: tuple, kwargs: dict) -> None:
    """The capture runs the model on the example: a tensor on the meta device holds no values."""
    on_meta = [leaf for leaf in tree_leaves([list(args), kwargs]) if isinstance(leaf, torch.Tensor) and leaf.is_meta]
    if on_meta:
        raise UntraceableModelError(
            f"{len(on_meta)} example input tensor(s) are on the meta device (the first of shape "
            f"{tuple(on_meta[0].shape)}); the model is traced by running it on the example, so give real "
            f"tensors, on the CPU or on the plan's device (a model built under empty_weights() takes real inputs too)")


def _as_plan(plan: Any) -> Plan:
    """None: ``Plan()``; a dict: the plan of those fields, as a plan file holds them."""
    if plan is None:
        return Plan()
    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, Mapping):
        return Plan.from_dict(dict(plan), source="plan (a dict)")
    fix = "mc.Plan(mode='train', ...)"
    if isinstance(plan, str):
        fix = f"mc.Plan(mode={plan!r})" if plan in MODES else f"mc.Plan.from_file({plan!r}) for a plan file"
    raise PlanError(f"plan must be a moesys_compile.Plan, not {type(plan).__name__} ({plan!r}); pass {fix}")


def check_plan_against_model(model: nn.Module, plan: Plan, blocks: Sequence[BlockReport] = ()) -> None:
    """Plan/model mismatches found before any process group exists. ``blocks``: canonicalize's
    reports, so that MoE-like blocks left as traced code are named when nothing can be sharded."""
    experts = moe_modules(model)
    _check_leaf_paths(model, plan, experts)
    if _dtype_to_apply(model, plan) and not (plan.mode == "infer" and plan.device_budget is not None):
        where = "in train mode" if plan.mode == "train" else "without a device_budget (only the ring casts weights)"
        raise PlanError(f"dtype ({plan.dtype!r}) is not applied {where}, and {type(model).__name__}'s parameters "
                        f"are {', '.join(_dtype_to_apply(model, plan))}: the program runs in the parameters' dtype; "
                        f"cast the model first: model.to(torch.{plan.dtype})")
    for path, module in experts.items():
        if module.num_experts % plan.expert_parallel:
            divisors = [str(d) for d in range(1, module.num_experts + 1) if module.num_experts % d == 0]
            raise PlanError(f"{path}.num_experts ({module.num_experts}) is not divisible by expert_parallel "
                            f"({plan.expert_parallel}); set Plan.expert_parallel to one of its divisors "
                            f"({', '.join(divisors)})")
    if plan.expert_parallel > 1 and not experts:
        left = [b for b in blocks if b.action == "left"]
        why = (f"; its MoE-like blocks run as traced code: {left[0].path} ({left[0].kind}: "
               f"{left[0].reason})" + (f" and {len(left) - 1} more" if len(left) > 1 else "")) if left else ""
        raise PlanError(f"expert_parallel ({plan.expert_parallel}) > 1 but {type(model).__name__} has no "
                        f"MoE layers that can be sharded{why}; use expert_parallel=1 (pure data parallelism)")


def _dtype_to_apply(model: nn.Module, plan: Plan) -> list[str]:
    """The model's floating parameter dtypes when ``plan.dtype`` would change them, else []."""
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.is_floating_point()})
    return dtypes if plan.dtype is not None and dtypes != [plan.dtype] else []


def _check_dtype_of_export(model: nn.Module, plan: Plan, capture: str) -> None:
    """torch.export writes the dtypes it saw into the graph (casts, metadata asserts): the ring
    cannot run an exported graph in another dtype than the one it was captured in."""
    if capture == "export" and _dtype_to_apply(model, plan):
        raise PlanError(f"dtype ({plan.dtype!r}) cannot be applied to {type(model).__name__}: torch.export captured "
                        f"it with {', '.join(_dtype_to_apply(model, plan))} parameters and fixed that dtype in the "
                        f"graph; cast the model first: model.to(torch.{plan.dtype})")


def _check_not_torch_compiled(model: nn.Module) -> None:
    """``torch.compile(model)`` returns a wrapper whose forward is dynamo's, which neither fx nor
    export can capture; the wrapped model can, and its program can be torch.compiled in turn."""
    dynamo = sys.modules.get("torch._dynamo.eval_frame")
    if dynamo is not None and isinstance(model, dynamo.OptimizedModule):
        inner = type(model._orig_mod).__name__
        raise TypeError(f"the model is torch.compile's wrapper (OptimizedModule around {inner}), which cannot be "
                        f"captured; pass the model itself (model._orig_mod) and torch.compile the program "
                        f"instead: torch.compile(moesys_compile.compile(model, plan, ...))")


def _data_parallel_wrappers() -> tuple[type, ...]:
    """The wrappers that hold the model as ``.module`` and sync its gradients: DDP and DataParallel,
    and FSDP's and DeepSpeed's engine where they are imported."""
    wrappers = [nn.parallel.DistributedDataParallel, nn.DataParallel]
    for module, name in (("torch.distributed.fsdp.fully_sharded_data_parallel", "FullyShardedDataParallel"),
                         ("deepspeed.runtime.engine", "DeepSpeedEngine")):
        wrapper = getattr(sys.modules.get(module), name, None)
        if wrapper is not None:
            wrappers.append(wrapper)
    return tuple(wrappers)


def _check_not_data_parallel(model: nn.Module) -> None:
    """A data-parallel wrapper's forward (bucket hooks, compiler-disabled calls) cannot be captured,
    and the program syncs gradients itself: the model inside is what to compile."""
    if isinstance(model, _data_parallel_wrappers()):
        raise TypeError(f"the model is wrapped in {type(model).__name__} (around {type(model.module).__name__}), "
                        f"which cannot be captured; pass the model itself (model.module): the compiled program "
                        f"syncs its gradients over the ranks as DDP does, so it needs no wrapper")


def _check_no_inference_tensors(model: nn.Module) -> None:
    """Tensors made under ``torch.inference_mode`` cannot take part in a capture (it fails deep in
    shape propagation with "cannot be saved for backward"): name the first and the fix."""
    for name, tensor in named_tensors(model).items():
        if tensor.is_inference():
            raise TypeError(f"{name} of {type(model).__name__} is an inference tensor (made under "
                            f"torch.inference_mode), which a capture cannot use; build or load the model outside "
                            f"inference_mode, or replace such tensors with a clone made outside it")


def _check_leaf_paths(model: nn.Module, plan: Plan, experts: dict[str, nn.Module]) -> None:
    """A misspelt ``leaf_modules`` path would silently trace the module it meant; paths inside a
    canonical MoE block (rebuilt by canonicalize) are not checked."""
    names = dict(model.named_modules())
    for leaf in plan.leaf_modules:
        if isinstance(leaf, str) and leaf not in names and not any(leaf.startswith(f"{p}.") for p in experts):
            near = difflib.get_close_matches(leaf, [n for n in names if n], n=3)
            raise PlanError(f"leaf_modules names {leaf!r}, which is not a submodule of {type(model).__name__}"
                            + (f"; nearest: {near}" if near else "") + "; give paths as in model.named_modules()")


def trace(model: nn.Module, example_inputs: Any = (), example_kwargs: Optional[dict] = None, *,
          leaf_modules: Sequence[str | type] = ()) -> fx.GraphModule:
    """Canonicalize the model's MoE layers (in place, parameters reused), capture it with torch.fx
    (torch.export as fallback) and annotate every node (``meta["val"]``, ``meta["moesys"]``).

        >>> gm = moesys_compile.trace(model, (ids,))      # doctest: +SKIP
    """
    _check_not_torch_compiled(model)
    _check_not_data_parallel(model)
    _check_no_inference_tensors(model)
    example_inputs, example_kwargs = _examples(model, example_inputs, example_kwargs)
    canonicalize(model)
    gm, _ = _capture_and_annotate(model, example_inputs, example_kwargs, leaf_modules)
    return gm


def _capture_and_annotate(model, example_inputs, example_kwargs, leaf_modules, for_program=False,
                          seconds: Optional[dict[str, float]] = None):
    """Capture and annotate. ``for_program``: also give an exported graph a flat signature and
    make the graph return (output, aux_loss), as programs expect. ``seconds``: where the wall
    time of each stage ("capture", "annotate") is added."""
    seconds = {} if seconds is None else seconds
    example_inputs, example_kwargs = distinct_inputs(example_inputs, example_kwargs)
    with timed(seconds, "capture"):
        gm = capture(model, example_inputs, example_kwargs, leaf_modules)
        kind = gm.meta.get("moesys_capture", "fx")
        traced, _ = traced_names(model, example_inputs, example_kwargs)
        out_spec = flatten_export_codegen(gm) if kind == "export" and for_program else None
        binder = InputBinder(model, traced, kind, out_spec, fixed_input_sizes(gm) if kind == "export" else (),
                             getattr(gm, "_guards_fn", None) if kind == "export" else None)
        if for_program:
            expose_aux_loss(gm)
        flat_inputs = binder.remember_example(example_inputs, example_kwargs)
    with timed(seconds, "annotate"):
        try:
            annotation = annotate(gm, flat_inputs, getattr(model, "symbolic_dims", None))
        except UntraceableModelError as exc:
            cause = (_longer_than_config_allows(model, gm, flat_inputs)
                     or failing_eagerly_too(model, example_inputs, example_kwargs))
            if cause is None:
                raise
            raise cause from exc
    gm.meta["moesys_binder"] = binder
    return gm, annotation


def _longer_than_config_allows(model: nn.Module, gm: fx.GraphModule, flat_inputs: list) -> Optional[ValueError]:
    """Where shapes could not be propagated and the inputs' sequence is longer than the model's
    config allows (``max_seq_len``, ``max_position_embeddings``): that length is the cause, named
    in place of the position table's broadcast error; None otherwise."""
    limit = seq_limit(model)
    if limit is None:
        return None
    field, most = limit
    _, seq = batch_and_seq(flat_inputs, input_dims(gm, flat_inputs, getattr(model, "symbolic_dims", None) or {}))
    if seq <= most:
        return None
    return ValueError(f"inputs of sequence length {seq} are longer than {type(model).__name__}'s config allows "
                      f"(config.{field} = {most}); pass at most {most} positions, or build the model with "
                      f"{field} >= {seq}")


# config dropout fields of task heads (sequence summary, classifier) that a causal LM never runs
HEAD_DROPOUT_PREFIXES = ("summary_", "classifier_")


def _dropout_rates(model: nn.Module) -> str:
    """The model's non-zero dropout rates (its modules' and its config's), a few of them shown."""
    config = getattr(model, "config", None)
    rates = {f"{name}.p": m.p for name, m in model.named_modules() if isinstance(m, nn.modules.dropout._DropoutNd)}
    rates.update({f"config.{key}": value for key, value in (vars(config) if config is not None else {}).items()
                  if ("dropout" in key or "pdrop" in key) and isinstance(value, float)
                  and not key.startswith(HEAD_DROPOUT_PREFIXES)})
    return ", ".join([f"{key}={rate}" for key, rate in rates.items() if rate > 0][:3])


def _warn_dropout_off(model: nn.Module, plan: Plan) -> None:
    """A training program exported from a model in eval mode (as ``from_pretrained`` returns one)
    keeps its dropout off: export fixes ``self.training`` (fx keeps ``nn.Dropout`` modules, which
    follow ``program.train()``)."""
    if plan.mode != "train" or model.training:
        return
    shown = _dropout_rates(model)
    if shown:
        warn_user(f"{type(model).__name__} is in eval mode ({shown}): a train-mode program traced from it never "
                  f"drops out, even after program.train(); call model.train() before compiling")


def _eval_for_inference(model: nn.Module, plan: Plan) -> None:
    """An infer program computes what the model computes in eval mode: a model left in training
    mode (built from a config, or by hand) is put in eval mode, with a warning where that turns
    dropout off (captured in training mode, every call would drop out at random)."""
    if plan.mode != "infer" or not model.training:
        return
    shown = _dropout_rates(model)
    model.eval()
    if shown:
        warn_user(f"{type(model).__name__} was in training mode ({shown}): an infer program runs it in eval mode, "
                  f"so model.eval() was called; call it before compiling to silence this")


def _warn_backward_lost(model: nn.Module, plan: Plan, functions: Sequence[str]) -> None:
    """torch.export traces a ``torch.autograd.Function`` through its forward: a train program's
    gradients through it are those of the forward's ops, not the Function's own backward."""
    if plan.mode == "train" and functions:
        warn_user(f"{type(model).__name__} applies torch.autograd.Function {', '.join(functions)}, which torch.export "
                  f"(the capture fx could not do) traces through its forward: the program's gradients through it "
                  f"follow the forward's ops, not its own backward, and differ from eager's there")


def _within_unrecognised_block(exc: UntraceableModelError, blocks: Sequence[BlockReport]) -> UntraceableModelError:
    """``exc``, with the reason canonicalize gave when the failing module lies in an MoE-like
    block it left as the model's own code (a recognised block would not have been traced)."""
    path = getattr(exc, "module_path", None) or ""
    block = next((b for b in blocks if b.action == "left" and (path == b.path or path.startswith(b.path + "."))), None)
    if block is None:
        return exc
    error = UntraceableModelError(f"{exc}\n  the MoE block '{block.path}' ({block.kind}) around it was not "
                                  f"recognised, so its own code was traced: {block.reason}")
    error.__dict__.update(exc.__dict__)
    return error


def _checkpoint_weights(model: nn.Module, plan: Plan) -> Optional[Source]:
    """For a model with tensors on the meta device (built under ``empty_weights``): the checkpoint
    that serves them, checked to be usable before any work; None for a model in memory."""
    on_meta = meta_tensor_names(model)
    if not on_meta:
        return None
    what = f"{type(model).__name__} has {len(on_meta)} tensor(s) on the meta device ('{on_meta[0]}', ...)"
    _check_not_offloaded_by_accelerate(model)
    if plan.mode == "infer" and plan.device_budget is not None and not plan.weights_checkpoint:
        raise PlanError(f"{what} and Plan.weights_checkpoint is not set, so the ring has nothing to stream them "
                        f"from: set weights_checkpoint to the model's checkpoint directory (Plan(..., "
                        f"weights_checkpoint=DIR)), or load the weights into the model before compiling "
                        f"(mc.load_into(model, DIR))")
    if plan.mode != "infer" or not plan.weights_checkpoint:
        raise PlanError(f"{what}; only ring inference streams weights from a checkpoint: use Plan(mode='infer', "
                        f"weights_checkpoint=DIR, ...), or load the weights into the model before compiling")
    persistent = set(model.state_dict(keep_vars=True))
    computed = [name for name in on_meta if name not in persistent]
    if computed:
        raise PlanError(f"{what}, among them the non-persistent buffer '{computed[0]}', which no checkpoint "
                        f"holds; build the model under moesys_compile.empty_weights() or accelerate's "
                        f"init_empty_weights(include_buffers=False) (parameters on meta, buffers real), not on "
                        f"torch.device('meta') or under init_empty_weights(include_buffers=True)")
    from .runtime.sources import checkpoint_source
    return checkpoint_source(plan.weights_checkpoint, model)


def _check_not_offloaded_by_accelerate(model: nn.Module) -> None:
    """A model dispatched by accelerate with offloading keeps its parameters on meta and has hooks
    load each module's weights at every call: no capture can follow those hooks (torch.export fails
    inside accelerate's loader), and the ring offloads the weights itself."""
    offloaded = accelerate_offloaded_modules(model)
    if offloaded:
        raise PlanError(f"{type(model).__name__} has its weights offloaded by accelerate's hooks ({len(offloaded)} "
                        f"module(s), e.g. '{offloaded[0] or '(the model itself)'}': from_pretrained with a "
                        f"device_map that offloads, disk_offload or cpu_offload), which load the weights at every "
                        f"call and cannot be captured; the ring offloads them itself: build the model without a "
                        f"device_map under moesys_compile.empty_weights() (AutoModelForCausalLM.from_config"
                        f"(config)) and pass the checkpoint directory as Plan(weights_checkpoint=DIR) with a "
                        f"device_budget, or load it whole with from_pretrained(DIR) and no device_map")


def prepare(model: nn.Module, plan: Plan | dict | None = None, example_inputs: Any = (),
            example_kwargs: Optional[dict] = None, rank: int = 0) -> tuple[fx.GraphModule, CompileContext]:
    """The frontend alone: canonicalize, check the plan against the model, capture, annotate.
    Returns the captured graph and a context whose only snapshot is "capture" (its seconds: the
    three stages', each in ``ctx.frontend_seconds``)."""
    plan = _as_plan(plan)
    _check_not_torch_compiled(model)
    _check_not_data_parallel(model)
    _check_no_inference_tensors(model)
    example_inputs, example_kwargs = _examples(model, example_inputs, example_kwargs)
    if plan.mode == "infer":
        example_inputs, example_kwargs = examples_where_the_model_is(model, example_inputs, example_kwargs)
    _eval_for_inference(model, plan)
    seconds: dict[str, float] = {}
    weights = _checkpoint_weights(model, plan)
    with timed(seconds, "canonicalize"):
        blocks = canonicalize(model, weights=weights)
    check_plan_against_model(model, plan, blocks)
    try:
        gm, annotation = _capture_and_annotate(model, example_inputs, example_kwargs, plan.leaf_modules,
                                               for_program=True, seconds=seconds)
    except UntraceableModelError as exc:
        within = _within_unrecognised_block(exc, blocks)
        if within is exc:
            raise                  # keeps its own cause (torch's error), which "from exc" would replace
        raise within from exc
    binder = gm.meta["moesys_binder"]
    _check_dtype_of_export(model, plan, binder.capture)
    if binder.capture == "export":
        _warn_dropout_off(model, plan)
        _warn_backward_lost(model, plan, gm.meta.get("moesys_inlined_functions", []))
    ctx = CompileContext(plan=plan, model=model, annotation=annotation, blocks=blocks,
                         input_names=binder.traced_names, capture=binder.capture, rank=rank,
                         frontend_seconds=seconds)
    ctx.extras["binder"] = binder
    ctx.snapshots.append(take_snapshot("capture", gm, ctx, changed=True, seconds=sum(seconds.values())))
    return gm, ctx


def lower(model: nn.Module, plan: Plan | dict | None = None, example_inputs: Any = (),
          example_kwargs: Optional[dict] = None, rank: int = 0) -> tuple[fx.GraphModule, CompileContext]:
    """Everything but building the program: ``prepare`` then the mode's pipeline. Needs no
    process group (``rank`` picks the per-rank view)."""
    gm, ctx = prepare(model, plan, example_inputs, example_kwargs, rank)
    return run_pipeline(gm, ctx, pipeline_for(ctx.plan.mode)), ctx


def lower_prepared(prepared: tuple[fx.GraphModule, CompileContext],
                   plan: Optional[Plan] = None) -> tuple[fx.GraphModule, CompileContext]:
    """The pipeline over a copy of ``prepare``'s graph and context (left as they were), under
    ``plan`` (default the prepared one's; of the same mode and capture, e.g. another ring
    workspace): one capture, several lowerings."""
    gm, ctx = unlowered_copy(*prepared, plan or prepared[1].plan)
    return run_pipeline(gm, ctx, pipeline_for(ctx.plan.mode)), ctx


def compile(model: nn.Module, plan: Plan | dict | None = None, example_inputs: Any = (),
            example_kwargs: Optional[dict] = None) -> Program:
    """Compile ``model`` under ``plan`` (a Plan, a dict of its fields, or None for ``Plan()``) into a
    Program (an nn.Module sharing the model's parameters). ``example_inputs``: a tuple of forward's
    positional inputs; ``example_kwargs``: a dict of its keyword inputs.

        >>> import torch, moesys_compile as mc
        >>> model = mc.models.build("tiny-moe")
        >>> ids = torch.randint(0, 256, (2, 16))
        >>> program = mc.compile(model, mc.Plan(mode="train"), example_inputs=(ids,))
        >>> torch.allclose(program(ids), model(ids))
        True
    """
    plan = _as_plan(plan)
    check_device(plan)
    _check_checkpoint_has_ring(plan)
    sharded_weights.refuse_stale_model(model, plan.mode, plan.expert_parallel)
    with sharded_weights.quiet():        # capture runs the model: not a user's read of stale weights
        gm, ctx = lower(model, plan, example_inputs, example_kwargs, rank=_current_rank())
        return build_program(gm, ctx)


def check_device(plan: Plan) -> None:
    """Before a program is built (lowering alone, e.g. for inspect, needs no device)."""
    if plan.device != "cpu" and not torch.cuda.is_available():
        raise PlanError(f"device ({plan.device!r}) needs CUDA, which this machine does not have; "
                        f"set Plan.device to 'cpu'")
    spread = [f"{name}={getattr(plan, name)}" for name in ("world_size", "expert_parallel") if getattr(plan, name) > 1]
    if plan.mode == "infer" and spread:
        raise PlanError(f"{', '.join(spread)}: an infer program runs on one device (its ring streams the weights "
                        f"instead of sharding them over ranks); set world_size=1 and expert_parallel=1, or "
                        f"mode='train'")


def _check_checkpoint_has_ring(plan: Plan) -> None:
    """Only the ring stages weights from ``weights_checkpoint``; an infer plan without a
    device_budget builds a plain program, which computes with the model's own tensors (or fails on
    the meta tensors of an ``empty_weights`` model). Lowering alone (inspect) reads the checkpoint
    for its probes and takes such a plan."""
    if plan.mode == "infer" and plan.weights_checkpoint is not None and plan.device_budget is None:
        raise PlanError(f"weights_checkpoint ({plan.weights_checkpoint!r}) is read by a ring, and without a "
                        f"device_budget there is none (the program would compute with the model's own weights): "
                        f"set device_budget (e.g. '512MiB') to stream the weights from it, or drop "
                        f"weights_checkpoint and load the weights into the model (mc.load_into or "
                        f"from_pretrained) before compiling")


def _current_rank() -> int:
    import torch.distributed as dist
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
