"""lower_kernels: structure (which ops, which implementation, what inspect sees), numerical
equivalence with the unlowered program (outputs and gradients), fallbacks and idempotence."""

import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels (and Triton) are imported

import operator  # noqa: E402

import pytest  # noqa: E402
import torch.fx as fx  # noqa: E402
from torch.fx.passes.fake_tensor_prop import FakeTensorProp  # noqa: E402

import moesys_compile as mc  # noqa: E402
import moesys_compile.kernels as kernels  # noqa: E402
from moesys_compile.ir import canonical_target  # noqa: E402
from moesys_compile.passes import pipeline_for  # noqa: E402
from moesys_compile.passes.lower_kernels import lower_kernels  # noqa: E402
from moesys_compile.pipeline import run_pipeline  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from kernel_cases import DEVICE, needs_triton  # noqa: E402


def targets(gm, namespace):
    ops = [canonical_target(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    return [str(op).split(".")[1] for op in ops if getattr(op, "namespace", None) == namespace]


def lowered(gm):
    return {n.name: n.meta["moesys"]["lowered_to"] for n in gm.graph.nodes if "lowered_to" in n.meta.get("moesys", {})}


def compiled_and_lowered(kernels_choice, mode="train", capacity_factor=None, skip=()):
    model = mc.models.build("tiny-moe").to(DEVICE)
    ids = torch.randint(0, 256, (2, 9), device=DEVICE)
    # the pipeline without lower_kernels (whether or not it is wired into the mode's list yet)
    skip = tuple(skip) + (("lower_kernels",) if lower_kernels in pipeline_for(mode) else ())
    plan = mc.Plan(mode=mode, kernels=kernels_choice, device=DEVICE, capacity_factor=capacity_factor,
                   disable_passes=skip)
    gm, ctx = mc.lower(model, plan, (ids,))
    reference = fx.GraphModule(gm, gm.graph.__deepcopy__())  # the pipeline's graph before lowering
    ctx.plan.disable_passes = ()
    gm = run_pipeline(gm, ctx, [lower_kernels])  # lints, recompiles and verifies like the real pipeline
    return model, ids, reference, gm, ctx


@pytest.mark.parametrize("choice", ["torch", pytest.param("triton", marks=needs_triton)])
def test_train_graph_is_fused_and_labelled(choice):
    _, _, reference, gm, ctx = compiled_and_lowered(choice)
    assert {"permute", "grouped_mlp", "unpermute", "route", "load_balancing_loss"} & set(targets(reference, "moesys"))
    assert not {"permute", "grouped_mlp", "unpermute", "route", "load_balancing_loss"} & set(targets(gm, "moesys"))
    kernels_ops = targets(gm, "moesys_kernels")
    for op in ("route_topk", "sort_slots", "fused_experts", "balance_loss"):
        assert kernels_ops.count(op) == 2, f"{op}: {kernels_ops}"   # tiny-moe has two MoE layers
    labels = sorted(set(lowered(gm).values()))
    if choice == "torch":
        assert labels == ["torch:balance_loss", "torch:moe_fused", "torch:route", "torch:sort_slots"]
    else:
        assert labels == ["torch:balance_loss", "triton:moe_fused_swiglu", "triton:route_softmax", "triton:sort_slots"]
    for node in gm.graph.nodes:  # every node the pass made carries val, layer and cost
        if node.op != "output":
            assert "val" in node.meta and "cost" in node.meta["moesys"], node.name
    # the chosen implementation is an argument of the node, not decided at run time
    assert all(n.args[-1] == choice for n in gm.graph.nodes
               if n.op == "call_function" and getattr(n.target, "namespace", None) == "moesys_kernels"
               and n.target.__name__.split(".")[0] != "balance_loss")


@pytest.mark.parametrize("choice", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("capacity_factor", [None, 0.6])
def test_lowered_program_matches_unlowered_outputs_and_gradients(choice, capacity_factor):
    model, ids, reference, gm, _ = compiled_and_lowered(choice, capacity_factor=capacity_factor)
    params = dict(gm.named_parameters())
    out, aux = gm(ids)
    grads = torch.autograd.grad(out.square().mean() + aux, list(params.values()))
    out_ref, aux_ref = reference(ids)
    grads_ref = torch.autograd.grad(out_ref.square().mean() + aux_ref, list(dict(reference.named_parameters()).values()))
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(aux, aux_ref, rtol=1e-5, atol=1e-7)
    for name, a, b in zip(params, grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=lambda m: f"grad of {name}: {m}")
    if capacity_factor:  # the dropped-slot statistics still read the (new) counts and order
        buffers = [b for n, b in gm.named_buffers() if n.startswith("moesys_drops_")]
        assert buffers and all(b[1] > b[0] > 0 for b in buffers)


@pytest.mark.parametrize("capacity_factor", [None, 0.6])
def test_undecomposed_moe_experts_becomes_sort_and_fused_kernel(capacity_factor):
    """Without decompose_moe the canonical op is lowered directly, with the plan's capacity factor
    (as decompose_moe reads it): the result equals the decomposed, unlowered pipeline."""
    torch.manual_seed(0)
    _, ids, undecomposed, gm, _ = compiled_and_lowered("torch", capacity_factor=capacity_factor,
                                                       skip=("decompose_moe",))
    torch.manual_seed(0)
    _, _, decomposed, _, _ = compiled_and_lowered("torch", capacity_factor=capacity_factor)
    assert targets(undecomposed, "moesys").count("moe_experts") == 2
    assert "moe_experts" not in targets(gm, "moesys")
    assert targets(gm, "moesys_kernels").count("fused_experts") == 2
    sort = next(n for n in gm.graph.nodes if "sort_slots" in str(n.target))
    assert sort.args[3] == (capacity_factor or 0.0)
    out, aux = gm(ids)
    out_ref, aux_ref = decomposed(ids)
    grads = torch.autograd.grad(out.square().mean() + aux, list(gm.parameters()))
    grads_ref = torch.autograd.grad(out_ref.square().mean() + aux_ref, list(decomposed.parameters()))
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_infer_mode_does_not_keep_activations():
    _, ids, reference, gm, _ = compiled_and_lowered("torch", mode="infer")
    fused = [n for n in gm.graph.nodes if n.op == "call_function" and "fused_experts" in str(n.target)]
    assert fused and all(n.args[7] is False for n in fused)
    with torch.no_grad():
        torch.testing.assert_close(gm(ids), reference(ids), rtol=1e-5, atol=1e-5)


def test_auto_on_cpu_is_torch_and_fallback_is_noted(monkeypatch):
    if DEVICE == "cpu":
        _, _, _, gm, ctx = compiled_and_lowered("auto")
        assert all(v.startswith("torch:") for v in lowered(gm).values())
    monkeypatch.setattr(kernels, "triton_unavailable", lambda device: "triton is not importable (test)")
    _, _, _, gm, ctx = compiled_and_lowered("triton")
    assert all(v.startswith("torch:") for v in lowered(gm).values())
    assert any("triton requested but triton is not importable (test)" in n for n in ctx.notes["lower_kernels"])


def test_second_run_changes_nothing():
    _, _, _, gm, ctx = compiled_and_lowered("torch")
    code = gm.code
    assert lower_kernels(gm, ctx).code == code


def _decomposed(x_TD, logits_TE, w_up_EHD, w_down_EDF):
    """A hand-written decomposed layer whose x_ND has a second reader (no fusion possible)."""
    weights_TK, ids_TK, _ = torch.ops.moesys.route(logits_TE, 2)
    x_ND, counts_E, order_N = torch.ops.moesys.permute(x_TD, ids_TK, 4, -1)
    y_ND = torch.ops.moesys.grouped_mlp(x_ND, counts_E, w_up_EHD, w_down_EDF, "gelu")
    return torch.ops.moesys.unpermute(y_ND, order_N, weights_TK), x_ND.sum()


@pytest.mark.parametrize("choice", ["torch", pytest.param("triton", marks=needs_triton)])
def test_single_ops_lowered_when_not_fusable(choice):
    gm = fx.symbolic_trace(_decomposed)
    inputs = [torch.randn(11, 24, device=DEVICE), torch.randn(11, 4, device=DEVICE),
              torch.randn(4, 20, 24, device=DEVICE) / 5, torch.randn(4, 24, 20, device=DEVICE) / 5]
    FakeTensorProp(gm).propagate(*inputs)
    ctx = type("Ctx", (), {"plan": mc.Plan(kernels=choice, device=DEVICE)})()
    expected = gm(*inputs)
    gm = lower_kernels(gm, ctx)
    gm.graph.lint()
    assert targets(gm, "moesys") == []
    assert targets(gm, "moesys_kernels") == ["route_topk", "permute", "grouped_mlp", "unpermute"]
    grouped = next(n for n in gm.graph.nodes if "grouped_mlp" in str(n.target))
    assert [u.target for u in grouped.users] == [operator.getitem] and "val" in grouped.meta
    assert lowered(gm)[grouped.name] == ("triton:grouped_mlp_gelu" if choice == "triton" else "torch:grouped_mlp")
    for a, b in zip(gm(*inputs), expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_unknown_kernels_choice_is_rejected():
    ctx = type("Ctx", (), {"plan": type("P", (), {"kernels": "cuda-graphs"})()})()
    with pytest.raises(ValueError, match=r"plan.kernels \('cuda-graphs'\) must be 'auto', 'triton' or 'torch'"):
        lower_kernels(fx.symbolic_trace(lambda x: x + 1), ctx)


def test_kernels_import_and_fall_back_without_triton():
    """With Triton missing, the package imports, the torch paths run and the pass notes the fallback."""
    import subprocess
    import sys
    code = """
import sys
sys.modules["triton"] = None                      # import triton -> ImportError
import torch, moesys_compile as mc
import moesys_compile.kernels as kernels
assert not kernels.HAVE_TRITON and "not importable" in kernels.triton_unavailable("cpu")
from moesys_compile.passes.lower_kernels import lower_kernels
from moesys_compile.pipeline import run_pipeline
model = mc.models.build("tiny-moe")
ids = torch.randint(0, 256, (2, 5))
gm, ctx = mc.lower(model, mc.Plan(kernels="triton", disable_passes=()), (ids,))
gm = run_pipeline(gm, ctx, [lower_kernels]) if lower_kernels not in ctx.passes_run else gm
labels = {n.meta["moesys"].get("lowered_to") for n in gm.graph.nodes} - {None}
assert labels and all(label.startswith("torch:") for label in labels), labels
assert any("triton requested but triton is not importable" in n for n in ctx.notes["lower_kernels"])
torch.testing.assert_close(gm(ids)[0], model(ids))
print("ok")
"""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


def test_fusion_does_not_move_expert_weights_across_a_ring_section():
    """In a ring-partitioned graph the fused node would sit in the combine's section: when the
    combine starts a later section than the experts, the ops are lowered one by one instead, and
    new nodes take the section of their place in the graph."""
    from moesys_compile.infer import model_bytes
    from moesys_compile.ir import is_op
    model = mc.models.build("tiny-moe").eval()
    ids = torch.randint(0, 256, (2, 9))
    plan = mc.Plan(mode="infer", device_budget=4 * model_bytes(model), kernels="torch",
                   disable_passes=("lower_kernels", "schedule_prefetch"))
    gm, ctx = mc.lower(model, plan, (ids,))
    shift = 0
    for node in gm.graph.nodes:   # every combine (unpermute) now starts a new section
        shift += is_op(node, "unpermute")
        if node.op != "output":
            node.meta["moesys"]["section"] += shift
    assert shift == 2
    ctx.plan.disable_passes = ()
    gm = run_pipeline(gm, ctx, [lower_kernels])
    assert "fused_experts" not in targets(gm, "moesys_kernels")
    assert targets(gm, "moesys_kernels").count("grouped_mlp") == 2
    sections = [n.meta["moesys"]["section"] for n in gm.graph.nodes if n.op != "output"]
    assert sections == sorted(sections)
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            assert {u.meta["moesys"]["section"] for u in node.users} == {node.meta["moesys"]["section"]}
    with torch.inference_mode():
        torch.testing.assert_close(gm(ids)[0], model(ids), rtol=1e-5, atol=1e-5)


def test_inference_mode_call_does_not_break_a_later_training_call():
    """Ring inference runs the kernels under inference_mode; the scratch memory they reuse must
    still be writable by a training call in the same thread afterwards."""
    _, ids, reference, gm, _ = compiled_and_lowered("torch")
    with torch.inference_mode():
        gm(torch.randint(0, 256, (4, 9), device=DEVICE))          # larger: the scratch grows here
    out, aux = gm(ids)
    (out.square().mean() + aux).backward()
    torch.testing.assert_close(out, reference(ids)[0], rtol=1e-5, atol=1e-5)
