"""Expert parallelism for every expert-weight layout the recognizers accept: a DeepSpeed MoE layer,
a user block whose experts are an nn.ModuleList of SwiGLU MLPs (also with PEFT LoRA layers around
the experts' Linears), transposed stacked weights, and a canonical block with separate gate/up
stacks.

EP=2 on 2 gloo ranks trains like one eager process on the global batch (losses and full state,
under the original names and shapes), each rank holds half of the expert parameters, and a
checkpoint saved at EP=2 reloads into eager models and into programs of another EP size.
Layouts that cannot be sharded raise a PlanError naming the block and the node.
"""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import moesys_compile as mc
from moesys_compile.frontend.canonicalize import moe_parameter_classes
from moesys_compile.programs.training import TrainingProgram

sys.path.insert(0, str(Path(__file__).parent))
from blocks import SwiGLUExpert  # noqa: E402
from dist_utils import optimizer_steps, run_ranks  # noqa: E402

D, FF, E, K, VOCAB = 16, 24, 4, 2, 64
BATCH, SEQ, STEPS, LR, AUX = 4, 8, 3, 0.5, 0.1
RTOL, ATOL = 1e-5, 1e-6


class TopKRouter(nn.Module):
    """Softmax top-k, renormalised; returns (logits, weights, ids) like HF v5 routers."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(E, D) * 0.5)

    def forward(self, x_TD):
        logits_TE = F.linear(x_TD, self.weight)
        weights_TK, ids_TK = logits_TE.softmax(-1).topk(K, dim=-1)
        return logits_TE, weights_TK / weights_TK.sum(-1, keepdim=True), ids_TK


class SwiGLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj = nn.Linear(D, FF, bias=False)
        self.up_proj = nn.Linear(D, FF, bias=False)
        self.down_proj = nn.Linear(FF, D, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def combine(x_TD, weights_TK, ids_TK, expert_fn):
    """Dense reference dispatch: every expert on every token, weighted by its routing weight."""
    y_TD = torch.zeros_like(x_TD)
    for e in range(E):
        y_TD = y_TD + expert_fn(e, x_TD) * (weights_TK * (ids_TK == e)).sum(-1, keepdim=True)
    return y_TD


class ModuleListBlock(nn.Module):
    """Experts as an nn.ModuleList of SwiGLU MLPs (HF v4 / hand-written style)."""

    def __init__(self):
        super().__init__()
        self.gate = TopKRouter()
        self.experts = nn.ModuleList(SwiGLU() for _ in range(E))

    def forward(self, h):
        x_TD = h.reshape(-1, D)
        _, weights_TK, ids_TK = self.gate(x_TD)
        return combine(x_TD, weights_TK, ids_TK, lambda e, x: self.experts[e](x)).reshape(h.shape)


class TransposedExperts(nn.Module):
    """Stacked, but transposed: gate_up [E, D, 2F] (gate columns, then up) and down [E, F, D]."""

    def __init__(self):
        super().__init__()
        self.gate_up = nn.Parameter(torch.randn(E, D, 2 * FF) / D ** 0.5)
        self.down = nn.Parameter(torch.randn(E, FF, D) / FF ** 0.5)

    def forward(self, x_TD, weights_TK, ids_TK):
        def expert(e, x):
            gate, up = (x @ self.gate_up[e]).chunk(2, dim=-1)
            return (F.silu(gate) * up) @ self.down[e]
        return combine(x_TD, weights_TK, ids_TK, expert)


class TransposedBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = TopKRouter()
        self.experts = TransposedExperts()

    def forward(self, h):
        x_TD = h.reshape(-1, D)
        _, weights_TK, ids_TK = self.gate(x_TD)
        return self.experts(x_TD, weights_TK, ids_TK).reshape(h.shape)


class SeparateStacksMoE(mc.nn.MoE):
    """A canonical block whose gate and up projections are separate stacks [E, F, D], joined
    along dim 1 in forward (what a recognizer emits for models that keep them apart)."""

    expert_param_names = ("w_gate", "w_in", "w_down")

    def __init__(self):
        super().__init__(D, FF, E, K)
        self.w_gate = nn.Parameter(self.w_up.detach()[:, :FF].clone())
        self.w_in = nn.Parameter(self.w_up.detach()[:, FF:].clone())
        del self.w_up

    def forward(self, x):
        x_TD = x.reshape(-1, self.dim)
        weights_TK, ids_TK, _ = torch.ops.moesys.route(self.router(x_TD), self.top_k)
        w_up_EHD = torch.cat([self.w_gate, self.w_in], dim=1)
        y_TD = torch.ops.moesys.moe_experts(x_TD, ids_TK, weights_TK, w_up_EHD, self.w_down, self.activation, 0.0)
        return y_TD.reshape(x.shape)


def GatedExpert() -> nn.Module:
    return SwiGLUExpert(D, FF)


def deepspeed_block() -> nn.Module:
    from deepspeed.moe.layer import MoE
    return MoE(D, GatedExpert(), num_experts=E, k=K, drop_tokens=False, top2_2nd_expert_sampling=False)


class Net(nn.Module):
    """embedding -> MoE block -> norm -> head; returns (logits, aux) with aux 0 for blocks without one."""

    def __init__(self, layout: str):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.moe = {"modulelist": ModuleListBlock, "transposed": TransposedBlock, "separate": SeparateStacksMoE,
                    "deepspeed": deepspeed_block}[layout]()
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, VOCAB)

    def forward(self, ids):
        out = self.moe(self.emb(ids))
        h, aux = (out[0], out[1]) if isinstance(out, tuple) else (out, None)
        return self.head(self.norm(h)), aux


LAYOUTS = (["modulelist", "transposed", "separate"] + (["deepspeed"] if importlib.util.find_spec("deepspeed") else [])
           + (["modulelist_lora"] if importlib.util.find_spec("peft") else []))


def make(layout: str, seed: int = 0) -> Net:
    """``modulelist_lora``: the ModuleList experts with LoRA (random A and B, the base weights
    frozen) injected into their gate, up and down Linears."""
    torch.manual_seed(seed)
    if layout != "modulelist_lora":
        return Net(layout)
    import peft
    config = peft.LoraConfig(r=2, target_modules=["gate_proj", "up_proj", "down_proj"], init_lora_weights=False)
    return peft.inject_adapter_in_model(config, Net("modulelist"))


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
    return ids[:, :-1], ids[:, 1:]


def objective(logits, aux, targets):
    loss = F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))
    return loss if aux is None else loss + AUX * aux


def expert_numel(model_or_gm, classes: dict[str, str]) -> int:
    return sum(p.numel() for n, p in model_or_gm.named_parameters() if classes.get(n) == "expert")


def reference_run(layout: str):
    """The eager model itself, one process, the global batch."""
    model = make(layout).train()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    ids, targets = global_batch()
    losses = optimizer_steps(lambda: objective(*model(ids), targets), opt, STEPS)
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def distributed_run(rank: int, world: int, layout: str, root: str):
    model = make(layout).train()
    ids, targets = global_batch()
    local = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    plan = mc.Plan(mode="train", world_size=world, expert_parallel=2, bucket_mb=0.001)
    program = mc.compile(model, plan, example_inputs=(ids[local],))
    opt = torch.optim.SGD(program.parameters(), lr=LR, momentum=0.9)
    losses = []
    for _ in range(STEPS):
        logits, aux = program(ids[local])
        loss = objective(logits, aux, targets[local])
        loss.backward()
        opt.step()
        opt.zero_grad()
        ce = (loss - (0 if aux is None else AUX * aux)).detach().clone()
        dist.all_reduce(ce)
        losses.append(float(ce / world + (0 if aux is None else AUX * aux.detach())))
    classes = moe_parameter_classes(model)
    held = {n: tuple(p.shape) for n, p in program.graph_module.named_parameters() if classes.get(n) == "expert"}
    numel = (expert_numel(program.graph_module, classes), expert_numel(model, classes))
    state = program.full_state_dict()
    program.save(f"{root}/{layout}", optimizer=opt, step=STEPS)
    fresh = make(layout, seed=7)      # a different initialisation, then the checkpoint
    reloaded = mc.compile(fresh, plan, example_inputs=(ids[local],))
    other = torch.optim.SGD(reloaded.parameters(), lr=LR * 7, momentum=0.5)    # the saved ones replace these
    reloaded.load(f"{root}/{layout}", optimizer=other)
    hyper = (other.param_groups[0]["lr"], other.param_groups[0]["momentum"])
    return dict(losses=losses, state=state, held=held, numel=numel, reloaded=reloaded.full_state_dict(), hyper=hyper)


def all_layouts(rank: int, world: int, root: str):
    return {layout: distributed_run(rank, world, layout, root) for layout in LAYOUTS}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("ep_layouts")
    return run_ranks(all_layouts, 2, str(root), timeout=600), root


@pytest.mark.parametrize("layout", LAYOUTS)
def test_ep2_training_matches_one_eager_process(results, layout):
    ranks, _ = results
    ref_losses, ref_state = reference_run(layout)
    assert ref_losses[-1] < ref_losses[0], "the loss should fall over the steps"
    for rank_result in ranks:
        torch.testing.assert_close(torch.tensor(rank_result[layout]["losses"]), torch.tensor(ref_losses),
                                   rtol=RTOL, atol=ATOL)
        state = rank_result[layout]["state"]
        assert list(state) == list(ref_state), "full_state_dict uses the model's own names, in its order"
        for name, tensor in ref_state.items():
            assert state[name].shape == tensor.shape, name
            torch.testing.assert_close(state[name], tensor, rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_rank_holds_half_of_the_experts(results, layout):
    ranks, _ = results
    held_names = []
    for rank_result in ranks:
        local, total = rank_result[layout]["numel"]
        assert total > 0 and local * 2 == total, f"holds {local} of {total} expert values"
        held_names.append(set(rank_result[layout]["held"]))
    stacked = layout in ("transposed", "separate")
    assert stacked or not held_names[0] & held_names[1], "per-expert parameters live on one rank"
    if layout == "transposed":
        for rank_result in ranks:
            assert rank_result[layout]["held"] == {"moe.experts.gate_up": (E // 2, D, 2 * FF),
                                                   "moe.experts.down": (E // 2, FF, D)}


@pytest.mark.parametrize("layout", [layout for layout in LAYOUTS if layout.startswith("modulelist")])
def test_modulelist_rank_keeps_its_own_experts(results, layout):
    ranks, _ = results
    for rank, rank_result in enumerate(ranks):
        experts = {name.split(".")[2] for name in rank_result[layout]["held"]}
        assert experts == {str(e) for e in range(rank * E // 2, (rank + 1) * E // 2)}
    if layout == "modulelist_lora":     # each expert's adapter matrices are its own: they live on its rank
        assert any(".lora_A." in name for name in ranks[0][layout]["held"])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_checkpoint_round_trips_across_programs_and_eager(results, layout):
    ranks, root = results
    saved = ranks[0][layout]["state"]
    for rank_result in ranks:         # a program of the same plan, loaded from the checkpoint
        for name, tensor in saved.items():
            torch.testing.assert_close(rank_result[layout]["reloaded"][name], tensor, rtol=0, atol=0)
        assert rank_result[layout]["hyper"] == (LR, 0.9)   # on every rank, whatever its experts' names
    eager = mc.load_into(make(layout, seed=7), f"{root}/{layout}")
    for name, tensor in eager.state_dict().items():
        torch.testing.assert_close(tensor, saved[name], rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
    gm, ctx = mc.lower(make(layout, seed=7), mc.Plan(mode="train"), (global_batch()[0],))
    single = TrainingProgram(gm, ctx)
    other = torch.optim.SGD(single.parameters(), lr=LR * 7, momentum=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # every group finds its saved hyperparameters
        single.load(f"{root}/{layout}", optimizer=other)     # saved at EP=2, reloaded by one process (EP=1)
    assert (other.param_groups[0]["lr"], other.param_groups[0]["momentum"]) == (LR, 0.9)
    for name, tensor in single.full_state_dict().items():
        torch.testing.assert_close(tensor, saved[name], rtol=0, atol=0, msg=lambda m: f"{name}: {m}")


# -- one rank's graph, without a process group ------------------------------------------------


def test_rank_graph_drops_other_ranks_per_expert_parameters():
    model = make("modulelist")
    gm, ctx = mc.lower(model, mc.Plan(mode="train", world_size=2, expert_parallel=2), (global_batch()[0],), rank=1)
    held = {n for n, _ in gm.named_parameters() if n.startswith("moe.experts.")}
    assert held == {f"moe.experts.{e}.{w}.weight" for e in (2, 3) for w in ("gate_proj", "up_proj", "down_proj")}
    assert ctx.extras["expert_owners"]["moe.experts.0.up_proj.weight"] == 0
    assert ctx.extras["expert_owners"]["moe.experts.3.down_proj.weight"] == 3
    assert len(list(model.moe.experts.parameters())) == 12, "the user's model keeps every expert"
    reads = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    assert not any(name.startswith(("moe.experts.0.", "moe.experts.1.")) for name in reads)


def test_transposed_rank_graph_shards_rows():
    model = make("transposed")
    gm, ctx = mc.lower(model, mc.Plan(mode="train", world_size=2, expert_parallel=2), (global_batch()[0],), rank=1)
    assert torch.equal(gm.get_parameter("moe.experts.down"), model.moe.experts.down.detach()[2:])
    assert ctx.extras["expert_shards"] == {"moe.experts.gate_up": (2, 4, 4), "moe.experts.down": (2, 4, 4)}
    assert model.moe.experts.down.shape[0] == E


class FlippedMoE(mc.nn.MoE):
    """Reads its experts in reverse order: dim 0 is moved, so rows cannot be sharded in place."""

    def forward(self, x):
        x_TD = x.reshape(-1, self.dim)
        weights_TK, ids_TK, _ = torch.ops.moesys.route(self.router(x_TD), self.top_k)
        y_TD = torch.ops.moesys.moe_experts(x_TD, ids_TK, weights_TK, self.w_up.flip(0), self.w_down,
                                            self.activation, 0.0)
        return y_TD.reshape(x.shape)


class PeekingMoE(mc.nn.MoE):
    """Also reads its expert weights outside the experts (a regulariser on w_down)."""

    def forward(self, x):
        return super().forward(x) + self.w_down.square().mean()


class Wrapper(nn.Module):
    def __init__(self, moe: nn.Module):
        super().__init__()
        self.emb, self.moe = nn.Embedding(VOCAB, D), moe

    def forward(self, ids):
        return self.moe(self.emb(ids))


@pytest.mark.parametrize("cls, message", [
    (FlippedMoE, r"moe \(FlippedMoE, w_up \[4, 48, 16\], w_down \[4, 16, 24\]\): cannot shard its experts "
                 r"over expert_parallel=2: node 'flip' .*moves the expert dimension.*or use expert_parallel=1"),
    (PeekingMoE, r"moe: .*w_down.* is also read by"),
])
def test_unshardable_layouts_are_plan_errors(cls, message):
    torch.manual_seed(0)
    model = Wrapper(cls(D, FF, E, K))
    with pytest.raises(mc.PassError, match=message):
        mc.lower(model, mc.Plan(mode="train", world_size=2, expert_parallel=2), (global_batch()[0],), rank=0)


def test_single_process_checkpoint_of_per_expert_parameters(tmp_path):
    gm, ctx = mc.lower(make("modulelist"), mc.Plan(mode="train"), (global_batch()[0],))
    program = TrainingProgram(gm, ctx)
    assert program.expert_layout["moe.experts.3.up_proj.weight"] == (0, E, E, 3)
    program.save(str(tmp_path / "ckpt"))
    eager = mc.load_into(make("modulelist", seed=7), str(tmp_path / "ckpt"))
    for name, tensor in program.full_state_dict().items():
        torch.testing.assert_close(eager.state_dict()[name], tensor, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
