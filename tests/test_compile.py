"""compile() on one device: same outputs and gradients as eager, shared parameters, any batch
and sequence length, the model's own output structure."""

import pytest
import torch
from torch import nn

import moesys_compile as mc


def _assert_same_grads(model, program_loss, eager_loss):
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(program_loss, params, allow_unused=True)
    want = torch.autograd.grad(eager_loss, params, allow_unused=True)
    for (name, _), g, w in zip(model.named_parameters(), got, want):
        if w is None:
            assert g is None or (g == 0).all(), name
        else:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("name", ["tiny-gpt", "tiny-moe"])
@pytest.mark.parametrize("mode", ["train", "infer"])
def test_builtin_models_equal_eager_outputs_and_gradients(name, mode):
    model = mc.models.build(name, n_layers=2)
    program = mc.compile(model, mc.Plan(mode=mode), example_inputs=(torch.randint(0, 256, (2, 8)),))
    for batch, seq in [(2, 8), (3, 5), (1, 17)]:
        ids = torch.randint(0, 256, (batch, seq))
        out, ref = program(ids), model(ids)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
        loss = out.square().mean() + (program.aux_loss if program.aux_loss is not None else 0)
        eager_loss = ref.square().mean() + sum(m.aux_loss for m in model.modules() if isinstance(m, mc.nn.MoE))
        _assert_same_grads(model, loss, eager_loss)


def test_program_shares_parameters_and_training_updates_the_model():
    model = mc.models.build("tiny-moe")
    ids = torch.randint(0, 256, (2, 8))
    program = mc.compile(model, mc.Plan(), example_inputs=(ids,))
    assert [id(p) for p in program.parameters()] == [id(p) for p in model.parameters()]
    before = model.layers[0].ffn.w_up.detach().clone()
    optimizer = torch.optim.SGD(program.parameters(), lr=0.1)
    program(ids).logsumexp(-1).mean().backward()
    optimizer.step()
    assert not torch.equal(before, model.layers[0].ffn.w_up)


def test_aux_loss_is_the_sum_of_every_layers_load_balancing_loss():
    model = mc.models.build("tiny-moe", n_layers=3)
    ids = torch.randint(0, 256, (2, 8))
    program = mc.compile(model, mc.Plan(), example_inputs=(ids,))
    program(ids)
    model(ids)
    expected = sum(m.aux_loss for m in model.modules() if isinstance(m, mc.nn.MoE))
    torch.testing.assert_close(program.aux_loss, expected)
    assert program.aux_loss.requires_grad
    dense = mc.compile(mc.models.build("tiny-gpt"), mc.Plan(), example_inputs=(ids,))
    dense(ids)
    assert dense.aux_loss is None


class AttentionMoEBlock(nn.Module):
    """A user's block: torch.nn attention plus the package's MoE layer."""

    def __init__(self, dim, heads, experts, top_k, shared):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.moe = mc.nn.MoE(dim, 2 * dim, experts, top_k, activation="gelu", num_shared_experts=shared)

    def forward(self, x, mask):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.moe(self.norm2(x))


class UserModel(nn.Module):
    def __init__(self, dim=32):
        super().__init__()
        self.blocks = nn.ModuleList([AttentionMoEBlock(dim, 4, 4, 2, 0), AttentionMoEBlock(dim, 4, 8, 1, 1)])
        self.head = nn.Linear(dim, 3)

    def forward(self, x, mask=None):
        for block in self.blocks:
            x = block(x, mask)
        return {"scores": self.head(x).mean(1), "hidden": x}


def test_user_model_with_nn_attention_and_moe_blocks():
    model = UserModel()
    x = torch.randn(2, 6, 32)
    mask = torch.triu(torch.full((6, 6), float("-inf")), 1)
    program = mc.compile(model, mc.Plan(), example_inputs=(x,), example_kwargs={"mask": mask})
    assert [b.path for b in program.context.blocks] == ["blocks.0.moe", "blocks.1.moe"]
    x2 = torch.randn(3, 6, 32, requires_grad=False)
    out = program(x2, mask=mask)
    ref = model(x2, mask=mask)
    assert set(out) == {"scores", "hidden"}
    torch.testing.assert_close(out["scores"], ref["scores"])
    _assert_same_grads(model, out["scores"].sum() + program.aux_loss,
                       ref["scores"].sum() + model.blocks[0].moe.aux_loss + model.blocks[1].moe.aux_loss)


def test_pinned_argument_must_stay_at_its_traced_value():
    model = mc.models.build("tiny-gpt")
    ids = torch.randint(0, 256, (1, 4))
    program = mc.compile(model, mc.Plan(), example_inputs=(ids,))
    with pytest.raises(ValueError, match="'start_pos' was fixed to 0"):
        program(ids, start_pos=3)


def test_cuda_plan_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(mc.PlanError, match="needs CUDA"):
        mc.compile(mc.models.build("tiny-gpt"), mc.Plan(device="cuda"), example_inputs=(torch.zeros(1, 2).long(),))
