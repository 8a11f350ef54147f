"""The pass runner: order, lint/verify after each pass, error naming, disabling, snapshots."""

import operator

import pytest
import torch

import moesys_compile as mc
from moesys_compile.api import prepare
from moesys_compile.errors import PassError
from moesys_compile.ir import infer_val, is_op, moesys_meta
from moesys_compile.pipeline import run_pipeline


@pytest.fixture()
def lowered():
    model = mc.models.build("tiny-moe", n_layers=2)
    return prepare(model, mc.Plan(), (torch.randint(0, 256, (2, 8)),))


def scale_experts(gm, ctx):
    """Multiplies every moe_experts output by one (a real rewrite with a new node)."""
    for node in [n for n in gm.graph.nodes if is_op(n, "moe_experts")]:
        with gm.graph.inserting_after(node):
            scaled = gm.graph.call_function(operator.mul, (node, 1.0))
        node.replace_all_uses_with(scaled, delete_user_cb=lambda user: user is not scaled)
        infer_val(scaled, ctx.fake_mode)
        scaled.meta["moesys"] = dict(node.meta["moesys"], rewritten_by="scale_experts")
    ctx.note("scaled 2 expert outputs")
    return gm


def forgets_val(gm, ctx):
    node = next(n for n in gm.graph.nodes if is_op(n, "moe_experts"))
    with gm.graph.inserting_after(node):
        bad = gm.graph.call_function(operator.mul, (node, 1.0))
    node.replace_all_uses_with(bad, delete_user_cb=lambda user: user is not bad)
    moesys_meta(bad).update(layer=0, cost=node.meta["moesys"]["cost"])
    return gm


def explodes(gm, ctx):
    raise RuntimeError("boom")


def nothing(gm, ctx):
    """Changes nothing."""
    return gm


def test_passes_run_in_order_with_snapshots_and_notes(lowered):
    gm, ctx = lowered
    gm = run_pipeline(gm, ctx, [nothing, scale_experts])
    assert ctx.passes_run == ["nothing", "scale_experts"]
    assert [s.stage for s in ctx.snapshots] == ["capture", "nothing", "scale_experts"]
    assert [s.changed for s in ctx.snapshots[1:]] == [False, True]
    assert ctx.snapshots[-1].notes == ["scaled 2 expert outputs"]
    assert len(ctx.snapshots[-1].nodes) == len(ctx.snapshots[0].nodes) + 2
    assert sum(n.meta["moesys"].get("rewritten_by") == "scale_experts" for n in gm.graph.nodes) == 2


def test_failing_pass_is_named_with_the_passes_before_it(lowered):
    gm, ctx = lowered
    with pytest.raises(PassError) as info:
        run_pipeline(gm, ctx, [nothing, scale_experts, explodes])
    assert "pass 'explodes' failed (passes run before it: nothing, scale_experts): RuntimeError: boom" in str(info.value)


def test_verify_catches_a_node_without_val(lowered):
    gm, ctx = lowered
    with pytest.raises(PassError) as info:
        run_pipeline(gm, ctx, [forgets_val])
    assert "pass 'forgets_val'" in str(info.value) and "has no meta['val']" in str(info.value)
    assert "op=call_function" in str(info.value)


def test_disabled_passes_are_skipped_and_unknown_names_rejected(lowered):
    gm, ctx = lowered
    ctx.plan = mc.Plan(disable_passes=("scale_experts",))
    run_pipeline(gm, ctx, [nothing, scale_experts])
    assert ctx.passes_run == ["nothing"] and ctx.passes_skipped == ["scale_experts"]
    ctx.plan = mc.Plan(disable_passes=("no_such_pass",))
    with pytest.raises(mc.PlanError, match="unknown pass"):
        run_pipeline(gm, ctx, [nothing])


@pytest.mark.parametrize("plan, name", [
    (dict(mode="train", world_size=2, expert_parallel=2), "expert_parallel"),     # ranks diverged in silence
    (dict(mode="train", world_size=2), "expert_parallel"),
    (dict(mode="infer", device_budget=2**20), "ring_partition"),                 # was a KeyError: 'ring'
])
def test_a_pass_the_plan_needs_cannot_be_disabled(plan, name):
    model = mc.models.build("tiny-moe")
    with pytest.raises(mc.PlanError, match=rf"disable_passes: this plan cannot skip '{name}'"):
        mc.lower(model, mc.Plan(disable_passes=(name,), **plan), (torch.randint(0, 256, (2, 4)),), rank=0)


def test_rewritten_program_still_equals_eager(lowered):
    gm, ctx = lowered
    gm = run_pipeline(gm, ctx, [scale_experts])
    ids = torch.randint(0, 256, (3, 4))
    out, _ = gm(ids)
    torch.testing.assert_close(out, ctx.model(ids))


def test_is_op_matches_the_packet_and_every_overload():
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    packet = graph.call_function(torch.ops.moesys.route, (x, 2))
    default = graph.call_function(torch.ops.moesys.route.default, (x, 2))
    add_tensor = graph.call_function(torch.ops.aten.add.Tensor, (x, x))
    add_scalar = graph.call_function(torch.ops.aten.add.Scalar, (x, 1))
    assert is_op(packet, "route") and is_op(default, "route") and is_op(default, "permute", "route")
    assert not is_op(default, "permute") and not is_op(x, "route") and not is_op(None, "route")
    assert not is_op(packet, "route", namespace="moesys_kernels")
    assert is_op(add_tensor, "add", namespace="aten") and is_op(add_scalar, "add", namespace="aten")
    assert not is_op(add_tensor, "add") and not is_op(graph.call_function(operator.add, (x, x)), "add")
