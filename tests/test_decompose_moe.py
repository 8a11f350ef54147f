"""decompose_moe: structure of the rewrite, equality with eager (outputs and gradients), capacity."""

from __future__ import annotations

import pytest
import torch

import moesys_compile as mc
from moesys_compile.ir import is_op
from moesys_compile.passes import INFER_PIPELINE, TRAIN_PIPELINE
from moesys_compile.passes.decompose_moe import decompose_moe, dropped_fraction


def tiny(**overrides):
    torch.manual_seed(0)
    return mc.models.build("tiny-moe", **{"n_layers": 2, **overrides})


def ops_in(gm, *names):
    return [n for n in gm.graph.nodes if is_op(n, *names)]


def test_in_both_pipelines():
    assert decompose_moe in TRAIN_PIPELINE and decompose_moe in INFER_PIPELINE


def test_structure_per_layer():
    model = tiny()
    plan = mc.Plan(mode="infer", disable_passes=("lower_kernels",))   # the decomposed ops, before lowering
    gm, ctx = mc.lower(model, plan, (torch.randint(0, 256, (2, 8)),))
    assert not ops_in(gm, "moe_experts")
    for name in ("permute", "grouped_mlp", "unpermute"):
        assert len(ops_in(gm, name)) == 2, name
    order = [n.target for n in gm.graph.nodes if is_op(n, "permute", "grouped_mlp", "unpermute")]
    assert order[:3] == [torch.ops.moesys.permute.default, torch.ops.moesys.grouped_mlp.default,
                         torch.ops.moesys.unpermute.default]
    assert not ops_in(gm, "record_drops"), "dropless layers record no drops"
    assert all(n.meta["moesys"]["layer"] in (0, 1) for n in ops_in(gm, "grouped_mlp"))
    assert len(ctx.notes["decompose_moe"]) == 2


def test_outputs_and_gradients_match_eager():
    model = tiny(num_shared_experts=1)       # routed experts plus a shared expert on the side
    ids = torch.randint(0, 256, (3, 7))
    program = mc.compile(model, mc.Plan(mode="train"), (ids,))
    eager = model(ids)
    eager_aux = sum(layer.ffn.aux_loss for layer in model.layers)
    eager_grads = torch.autograd.grad(eager.square().mean() + eager_aux, list(model.parameters()))
    out = program(ids)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(program.aux_loss, eager_aux)
    grads = torch.autograd.grad(out.square().mean() + program.aux_loss, list(model.parameters()))
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_capacity_drops_and_matches_reference_op():
    torch.manual_seed(0)
    layer = torch.nn.Sequential(mc.nn.MoE(dim=16, ffn_dim=24, num_experts=4, top_k=2))
    x_BSD = torch.randn(2, 16, 16)
    program = mc.compile(layer, mc.Plan(mode="train", capacity_factor=0.5), (x_BSD,))
    assert len(ops_in(program.graph_module, "record_drops")) == 1
    out = program(x_BSD)
    fraction = dropped_fraction(program)["0"]
    moe, x_TD = layer[0], x_BSD.reshape(-1, 16)
    weights_TK, ids_TK, _ = torch.ops.moesys.route(moe.router(x_TD), moe.top_k)
    expected = mc.ops.moe_experts_reference(x_TD, ids_TK, weights_TK, moe.w_up, moe.w_down, moe.activation, 0.5)
    torch.testing.assert_close(out, expected.reshape(x_BSD.shape), rtol=1e-5, atol=1e-6)
    capacity = mc.ops.expert_capacity(x_TD.shape[0], 2, 4, 0.5)
    kept = sum(min(int((ids_TK == e).sum()), capacity) for e in range(4))
    assert kept < ids_TK.numel(), "capacity 0.5 must drop slots"
    assert fraction == pytest.approx(1 - kept / ids_TK.numel())
    assert dropped_fraction(program, reset=True) and dropped_fraction(program)["0"] is None
