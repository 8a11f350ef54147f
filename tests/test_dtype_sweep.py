"""Ring inference where Plan.dtype is not the model's dtype, and mixed-dtype models: the ring's
activation estimate is made in the dtypes the ring computes in, generate decodes a built-in model
cast by the plan, a section that calls a module and reads its weight runs, an MoE block with a
float32 router in a bfloat16 model is recognised, and token ids of a dtype the model cannot embed
are named as the cause."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moesys_compile as mc
from moesys_compile.infer import model_bytes
from moesys_compile.programs.ring_calls import call_sizer

IDS = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(0))
BUDGET = 400_000


def tiny_moe(dtype):
    torch.manual_seed(0)
    return mc.models.build("tiny-moe", dim=32, n_layers=2, vocab_size=100, num_experts=4,
                           moe_ffn_dim=32).eval().to(dtype)


class Float32Norm(nn.Module):
    """An RMSNorm computed in float32 whatever the model's dtype (the input is cast explicitly)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * self.weight


class NormedLM(nn.Module):
    def __init__(self, vocab: int = 100, dim: int = 32):
        super().__init__()
        self.emb, self.norm, self.head = nn.Embedding(vocab, dim), Float32Norm(dim), nn.Linear(dim, vocab)

    def forward(self, ids):
        return self.head(self.norm(self.emb(ids)))


def normed_lm(dtype):
    torch.manual_seed(0)
    return NormedLM().eval().to(dtype)


def ring_estimates(model, dtype):
    """(workspace, activation bytes of a call of another size) of the ring lowered for ``model``."""
    gm, ctx = mc.lower(model, mc.Plan(mode="infer", device_budget=BUDGET, dtype=dtype), (IDS,))
    return ctx.extras["ring"].workspace, call_sizer(gm, ctx).activation_bytes_at(8, 24)


@pytest.mark.parametrize("build", [tiny_moe, normed_lm], ids=["tiny-moe", "float32-norm"])
@pytest.mark.parametrize("captured, computed", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)],
                         ids=["bf16-model-fp32-plan", "fp32-model-bf16-plan"])
def test_ring_activations_are_estimated_in_the_dtype_the_ring_computes_in(build, captured, computed):
    """A model cast by Plan.dtype is estimated as the same model cast beforehand (what the ring
    computes), in the workspace and in the sizing of calls; the model's own float32 casts keep
    their float32 bytes."""
    plan_dtype = str(computed).removeprefix("torch.")
    assert ring_estimates(build(captured), plan_dtype) == ring_estimates(build(computed), None)


def test_explicit_casts_keep_their_dtype_in_the_ring_values():
    gm, _ = mc.lower(normed_lm(torch.float32), mc.Plan(mode="infer", device_budget=BUDGET, dtype="bfloat16"), (IDS,))
    dtypes = {node.name: node.meta["val"].dtype for node in gm.graph.nodes
              if isinstance(node.meta.get("val"), torch.Tensor)}
    assert dtypes["float_1"] == torch.float32 and dtypes["emb"] == dtypes["head"] == torch.bfloat16


class QueriesInBfloat16(nn.Module):
    """Attention whose queries the model's code casts to bfloat16 while its keys follow the weights."""

    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(100, 32), nn.Linear(32, 100)

    def forward(self, ids):
        x = self.emb(ids)
        return self.head(F.scaled_dot_product_attention(x.to(torch.bfloat16), x, x))


def test_a_model_that_cannot_compute_in_the_plan_dtype_is_refused_naming_the_node():
    model = QueriesInBfloat16().eval().to(torch.bfloat16)
    with pytest.raises(mc.PlanError, match=r"dtype \('float32'\): the model cannot compute with its weights in "
                                           r"float32, at node 'scaled_dot_product_attention'.*cast the model first"):
        mc.compile(model, mc.Plan(mode="infer", device_budget=BUDGET, dtype="float32"), example_inputs=(IDS,))


@pytest.mark.parametrize("name", ["tiny-moe", "tiny-gpt"])
def test_generate_of_a_builtin_model_cast_by_the_plan_equals_eager(name):
    torch.manual_seed(0)
    model = mc.models.build(name, dim=32, n_layers=2, vocab_size=100).eval().to(torch.bfloat16)
    reference = copy.deepcopy(model).float()
    ids = IDS[:2, :6]
    program = mc.compile(model, mc.Plan(mode="infer", device_budget=3 * model_bytes(model), dtype="float32"),
                         example_inputs=(ids,))
    tokens = program.generate(ids, 4)
    expected = ids
    with torch.no_grad():
        for _ in range(4):
            expected = torch.cat([expected, reference(expected)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(tokens, expected)


class ReadsWeightAfterCall(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(100, 32), nn.Linear(32, 100)
        self.register_buffer("scale", torch.full((32,), 2.0))

    def forward(self, ids):
        return self.head(self.emb(ids) * self.scale.to(self.emb.weight.dtype))


class ReadsWeightBeforeCall(ReadsWeightAfterCall):
    def forward(self, ids):
        scale = self.scale.to(self.emb.weight.dtype)
        return self.head(self.emb(ids) * scale)


@pytest.mark.parametrize("cls", [ReadsWeightAfterCall, ReadsWeightBeforeCall])
def test_a_section_may_call_a_module_and_read_its_weight(cls):
    model = cls().eval()
    ids = IDS[:2, :7]
    program = mc.compile(model, mc.Plan(mode="infer", device_budget=2 * model_bytes(model)), example_inputs=(ids,))
    with torch.no_grad():
        torch.testing.assert_close(program(ids), model(ids), rtol=0, atol=0)


class Float32GateMoE(nn.Module):
    """Mixtral-style block whose router is kept in float32 (it casts the tokens to it)."""

    def __init__(self, dim: int = 32, hidden: int = 32, num_experts: int = 4, top_k: int = 2):
        super().__init__()
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.experts = nn.ModuleList(nn.ModuleDict({"w1": nn.Linear(dim, hidden, bias=False),
                                                    "w3": nn.Linear(dim, hidden, bias=False),
                                                    "w2": nn.Linear(hidden, dim, bias=False)})
                                     for _ in range(num_experts))
        self.top_k = top_k

    def forward(self, x):
        batch, seq, dim = x.shape
        x_TD = x.reshape(-1, dim)
        scores = F.softmax(self.gate(x_TD.to(self.gate.weight.dtype)), dim=-1, dtype=torch.float)
        weights, ids = torch.topk(scores, self.top_k, dim=-1)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x_TD)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(ids == e)
            rows = x_TD[token]
            y = expert["w2"](F.silu(expert["w1"](rows)) * expert["w3"](rows))
            out.index_add_(0, token, y * weights[token, slot, None])
        return out.reshape(batch, seq, dim)


class Float32GateLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.moe, self.head = nn.Embedding(100, 32), Float32GateMoE(), nn.Linear(32, 100)

    def forward(self, ids):
        return self.head(self.moe(self.emb(ids)))


def test_a_float32_router_in_a_bfloat16_block_is_recognised():
    torch.manual_seed(0)
    model = Float32GateLM().to(torch.bfloat16)
    model.moe.gate.float()
    reference = copy.deepcopy(model)
    ids = IDS[:2, :7]
    program = mc.compile(model, mc.Plan(mode="train"), example_inputs=(ids,))
    assert [block.action for block in program.context.blocks] == ["replaced"]
    with torch.no_grad():
        torch.testing.assert_close(program(ids), reference(ids), rtol=2e-2, atol=2e-2)


def test_ids_of_a_dtype_the_model_cannot_embed_are_named_at_any_size():
    torch.manual_seed(0)
    model = mc.models.build("tiny-moe", dim=32, n_layers=1, vocab_size=100, num_experts=4, moe_ffn_dim=32).eval()
    program = mc.compile(model, mc.Plan(mode="infer", device_budget=model_bytes(model)), example_inputs=(IDS[:2, :6],))
    with pytest.raises(TypeError, match=r"ids_BS is torch.int16, but the program was compiled with torch.int64.*"
                                        r"'indices'.*pass ids_BS as torch.int64"):
        program(IDS[:3, :5].to(torch.int16))



def test_a_call_that_fails_in_a_ring_lowered_for_it_leaves_the_compiled_ring_serving():
    """The ring lowered for a larger call is dropped when that call fails (an id past the
    vocabulary), so the program is as it was: its forward graph the compiled one."""
    torch.manual_seed(0)
    model = mc.models.build("tiny-moe", dim=32, n_layers=1, vocab_size=100, num_experts=4, moe_ffn_dim=32).eval()
    program = mc.compile(model, mc.Plan(mode="infer", device_budget=model_bytes(model)), example_inputs=(IDS[:2, :6],))
    compiled = program.forward_graph
    bad = IDS[:3, :12].clone()
    bad[1, 3] = 100
    with pytest.raises(IndexError):
        program(bad)
    assert program.forward_graph is compiled
    torch.testing.assert_close(program(IDS[:3, :5]), model(IDS[:3, :5]), rtol=1e-5, atol=1e-5)
