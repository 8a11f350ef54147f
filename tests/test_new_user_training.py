"""What a first-time user of the training side runs into: Hugging Face MoE families with frozen
parameters under expert parallelism, blocks that cannot be sharded, examples of batch 1 under
torch.export, plan files with typos or wrong types, and ``moesys-compile train --data`` files."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import moesys_compile as mc
from moesys_compile import train
from moesys_compile.errors import PlanError

pytest.importorskip("transformers")

from moesys_compile.models.hf import build_hf  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from dist_utils import optimizer_steps, run_ranks  # noqa: E402
from test_hf_parallel import LR, VOCAB, cross_entropy, global_batch, train_on_ranks  # noqa: E402

STEPS = 2


def frozen_bias_run(rank: int, world: int, root: str):
    """ERNIE 4.5 MoE holds its routing correction bias as a frozen Parameter."""
    program, losses = train_on_ranks(build_hf("ernie4_5_moe").train(), rank, world, 2, STEPS)
    state = program.full_state_dict()
    program.save(f"{root}/ckpt")
    return losses, state if rank == 0 else None


def test_ernie_with_a_frozen_parameter_trains_over_two_expert_ranks(tmp_path):
    (losses, state), _ = run_ranks(frozen_bias_run, 2, str(tmp_path), timeout=240)
    model = build_hf("ernie4_5_moe").train()
    assert any(not p.requires_grad for p in model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    ids, targets = global_batch()
    ref_losses = optimizer_steps(lambda: cross_entropy(model(ids).logits, targets), opt, STEPS)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-4, atol=1e-5)
    ref_state = model.state_dict()
    assert list(state) == list(ref_state)
    fresh = mc.load_into(build_hf("ernie4_5_moe", seed=2), str(tmp_path / "ckpt"))
    for name, tensor in ref_state.items():
        torch.testing.assert_close(state[name], tensor, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(fresh.state_dict()[name], state[name], rtol=0, atol=0)


def test_frozen_parameters_are_bucketed_for_when_they_are_unfrozen():
    model = mc.models.build("tiny-moe")
    model.embed.requires_grad_(False)
    ids = torch.randint(0, 256, (2, 8))
    gm, ctx = mc.lower(model, mc.Plan(world_size=2, expert_parallel=2, bucket_mb=0.01), (ids,))
    bucketed = [name for bucket in ctx.extras["grad_buckets"] for name in bucket.params]
    assert sorted(bucketed) == sorted(n for n, p in gm.named_parameters() if p.is_floating_point())
    assert "embed.weight" in bucketed and not gm.get_parameter("embed.weight").requires_grad


def test_expert_parallel_over_blocks_left_as_traced_code_names_them():
    with pytest.raises(PlanError, match=r"DogeForCausalLM has no MoE layers that can be sharded; its MoE-like "
                                        r"blocks run as traced code: model\.layers\.0\.mlp \(DogeCDMoE: "
                                        r"no recognizer matched its structure.* and 1 more; use "
                                        r"expert_parallel=1"):
        mc.lower(build_hf("doge"), mc.Plan(world_size=2, expert_parallel=2), (torch.zeros(2, 4, dtype=torch.long),))


def test_an_exported_program_from_one_prompt_takes_any_batch_and_length():
    """torch.export would fix a size-1 example dim for good; capture widens it to 2, so the
    graph keeps batch and sequence symbolic and a single-prompt example serves every size."""
    model = build_hf("qwen3_moe", num_hidden_layers=1).train()
    program = mc.compile(model, mc.Plan(mode="train"), example_inputs=(torch.randint(0, VOCAB, (1, 1)),))
    for shape in [(1, 8), (2, 8), (3, 1), (1, 1)]:
        ids = torch.randint(0, VOCAB, shape)
        torch.testing.assert_close(program(ids).logits, model(ids).logits)


def test_an_exported_program_names_the_size_its_capture_fixed(monkeypatch):
    """Where export fixes a size anyway, a call at another size names it, not a guard's assert."""
    from moesys_compile.frontend import tracing
    monkeypatch.setattr(tracing, "_widened", lambda value, dims=(): value)   # export then fixes the batch of 1
    model = build_hf("qwen3_moe", num_hidden_layers=1).train()
    program = mc.compile(model, mc.Plan(mode="train"), example_inputs=(torch.randint(0, VOCAB, (1, 5)),))
    ids = torch.randint(0, VOCAB, (1, 8))
    torch.testing.assert_close(program(ids).logits, model(ids).logits)
    with pytest.raises(ValueError, match=r"input_ids\.shape\[0\] is 2, but torch\.export captured "
                                         r"Qwen3MoeForCausalLM with that size fixed to 1.*batch and sequence are >= 2"):
        program(torch.randint(0, VOCAB, (2, 8)))


@pytest.mark.parametrize("text,message", [
    ("expert_paralel: 2\n", r"unknown plan field\(s\) \['expert_paralel'\]"),
    ("bucket_mb: 25MB\n", r"bucket_mb \('25MB'\) must be a number"),
    ("capacity_factor: '1.25'\n", r"capacity_factor \('1.25'\) must be a number"),
    ("mode: infer\nring_slots: 2.5\n", r"ring_slots \(2.5\) must be an integer"),
    ("disable_passes: fuse_com\n", r"disable_passes names unknown pass\(es\) \['fuse_com'\]"),
    ("leaf_modules: layers.0.atn\n", r"leaf_modules names 'layers.0.atn', which is not a submodule of "
                                     r"Transformer; nearest: \['layers.0.attn'"),
    ("dtype: bfloat16\n", r"dtype \('bfloat16'\) is not applied in train mode, and Transformer's parameters are "
                          r"float32.*model.to\(torch.bfloat16\)"),
])
def test_plan_files_with_typos_or_wrong_types_name_the_field(tmp_path, text, message):
    path = tmp_path / "plan.yaml"
    path.write_text("mode: train\n" + text)
    with pytest.raises(PlanError, match=message):
        plan = mc.Plan.from_file(path)
        mc.lower(mc.models.build("tiny-moe"), plan, (torch.randint(0, 256, (2, 8)),))


def test_a_single_name_in_a_plan_file_is_one_name(tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text("mode: train\ndisable_passes: fuse_comm\nleaf_modules: layers.0.attn\n")
    plan = mc.Plan.from_file(path)
    assert plan.disable_passes == ("fuse_comm",) and plan.leaf_modules == ("layers.0.attn",)


def test_train_cli_builds_the_model_in_the_plan_dtype():
    args = train.parse_args(["--model", "tiny-moe"])
    model = train.build_model(args, mc.Plan(mode="train", dtype="bfloat16"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_train_data_npy_of_rows_is_one_token_stream(tmp_path):
    rows = np.arange(600, dtype=np.int32).reshape(20, 30) % 256
    np.save(tmp_path / "ids.npy", rows)
    source = train.TokenSource(str(tmp_path / "ids.npy"), 256, batch=3, seq=40, seed=0)
    batch = source.global_batch(0)
    stream = torch.from_numpy(rows.reshape(-1).astype(np.int64))
    for row in batch:                      # each sequence is a window of the rows read in order
        start = int(torch.nonzero(stream == row[0])[0])
        assert torch.equal(row, stream[start: start + 41])


@pytest.mark.parametrize("make,message", [
    (lambda d: np.save(d / "f.npy", np.random.rand(500)), "holds float64 values; token ids must be integers"),
    (lambda d: np.save(d / "f.npy", np.full(500, -1)), "has a negative token id (-1)"),
    (lambda d: None, "is neither 'synthetic' nor an existing file"),
    (lambda d: np.save(d / "f.npy", np.arange(500)), "--batch-size (3) must be divisible by the world size (2)"),
    (lambda d: np.save(d / "f.npy", np.zeros(0, dtype=np.int64)), "holds no token ids; pass a file of token ids"),
    (lambda d: (np.save(d / "f.npy", np.arange(500)), (d / "ckpt").write_text("x")),
     "--ckpt-dir '{d}/ckpt' is a file, not a directory"),
])
def test_train_launcher_refuses_bad_data_before_starting_ranks(tmp_path, make, message, capsys, monkeypatch):
    make(tmp_path)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(train, "launch", lambda *a, **k: pytest.fail("ranks were launched"))
    batch = "3" if "batch-size" in message else "4"
    argv = ["--model", "tiny-moe", "--steps", "1", "--nproc-per-node", "2", "--data", str(tmp_path / "f.npy"),
            "--batch-size", batch, "--seq-len", "8", "--ckpt-dir", str(tmp_path / "ckpt")]
    message = message.format(d=tmp_path)
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


class StraightThroughRound(torch.autograd.Function):
    """Rounds forward, passes the gradient straight through backward (quantisation-aware style)."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class RoundedNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.proj, self.head = torch.nn.Embedding(32, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 32)

    def forward(self, ids):
        return self.head(StraightThroughRound.apply(self.proj(self.embed(ids) * 4)))


def test_an_autograd_function_keeps_its_own_backward_in_the_program():
    """fx keeps the Function as one call (its forward alone has a zero gradient: round)."""
    torch.manual_seed(0)
    model = RoundedNet().train()
    reference = RoundedNet().train()
    reference.load_state_dict(model.state_dict())
    ids = torch.randint(0, 32, (2, 8))
    program = mc.compile(model, mc.Plan(mode="train"), (ids,))
    assert any("StraightThroughRound_apply" in str(n.target) for n in program.graph_module.graph.nodes)
    program(ids).logsumexp(-1).mean().backward()
    reference(ids).logsumexp(-1).mean().backward()
    assert reference.proj.weight.grad.abs().max() > 0
    torch.testing.assert_close(model.proj.weight.grad, reference.proj.weight.grad)


def test_an_autograd_function_that_export_traces_through_is_named_in_a_warning():
    """PhiMoE's router applies its own Function (a straight-through multiplier); torch.export
    keeps only its forward, so a train program warns that the gradients there differ."""
    model = build_hf("phimoe", num_hidden_layers=1).train()
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match=r"PhimoeForCausalLM applies torch.autograd.Function PhimoeMultiplier, which "
                                         r"torch.export .* not its own backward"):
        mc.compile(model, mc.Plan(mode="train"), (ids,))


@pytest.mark.parametrize("keys", [("input_ids", "labels", "attention_mask"), ("attention_mask", "input_ids", "labels")])
def test_the_order_of_example_kwargs_does_not_change_what_a_call_binds(keys):
    """torch.export orders the graph's inputs as the example's keys; calls are bound in the order of
    forward's signature. Keys in another order used to swap labels and attention_mask (same shape
    and dtype) in silence: a padded call then gave other logits and loss than eager."""
    model = build_hf("qwen2_moe", num_hidden_layers=1).eval()
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    example = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    program = mc.compile(model, mc.Plan(mode="train"), example_kwargs={key: example[key] for key in keys})
    call = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
    padded = torch.ones_like(call)
    padded[0, :4] = 0
    with torch.no_grad():
        want = model(input_ids=call, labels=call, attention_mask=padded)
        got = program(input_ids=call, labels=call, attention_mask=padded)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-5)


def optimizer_over_the_model_run(rank: int, world: int, root: str):
    torch.manual_seed(0)
    model = mc.models.build("tiny-moe", n_layers=1)
    before_compile = torch.optim.AdamW(model.parameters(), lr=1e-2)
    program = mc.compile(model, mc.Plan(mode="train", world_size=world, expert_parallel=world),
                         example_inputs=(torch.randint(0, 256, (2, 8)),))
    after_compile = torch.optim.AdamW(program.parameters(), lr=1e-2)
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(rank))
    (program(ids).logsumexp(-1).mean() + program.aux_loss).backward()
    try:
        before_compile.step()
        refused = None
    except PlanError as exc:
        refused = str(exc)
    shard = dict(program.named_parameters())["graph_module.layers.0.ffn.w_up"].detach().clone()
    after_compile.step()
    moved = (dict(program.named_parameters())["graph_module.layers.0.ffn.w_up"] - shard).abs().max().item()
    return refused, moved


def test_an_optimizer_over_the_models_full_expert_weights_is_refused_under_expert_parallelism(tmp_path):
    """With ep=2 a stacked expert weight is trained as this rank's shard, a parameter of its own:
    an optimizer built over model.parameters() (as with DDP, which shares them) held the full
    tensor, which gets no gradient, and left the experts untrained in silence. Its step is
    refused; one over program.parameters() trains them."""
    for refused, moved in run_ranks(optimizer_over_the_model_run, 2, str(tmp_path), timeout=240):
        assert refused is not None and "AdamW.step: the optimizer holds the model's full expert weight " \
            "'layers.0.ffn.w_up'" in refused and "program.parameters() after compile" in refused
        assert moved > 0


def frozen_after_compile_run(rank: int, world: int, root: str):
    torch.manual_seed(0)
    model = mc.models.build("tiny-moe", n_layers=1)
    program = mc.compile(model, mc.Plan(mode="train", world_size=world, expert_parallel=world),
                         example_inputs=(torch.randint(0, 256, (2, 8)),))
    model.embed.weight.requires_grad_(False)
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(rank))
    (program(ids).logsumexp(-1).mean() + program.aux_loss).backward()
    return model.embed.weight.grad is None, model.layers[0].attn.qkv.weight.grad is not None


def test_a_parameter_frozen_after_compile_keeps_no_gradient(tmp_path):
    """The gradient buckets gave every parameter without a gradient zeros, so a parameter frozen
    after compile got a zero .grad and AdamW's weight decay moved it; it now stays None (others
    unused on one rank still get the reduced gradient)."""
    assert run_ranks(frozen_after_compile_run, 2, str(tmp_path), timeout=240) == [(True, True)] * 2


def test_a_compiled_program_refuses_copies_and_a_cast_its_capture_fixed():
    """deepcopy (an EMA copy), pickle and torch.save of a program failed inside fx with raw errors;
    a Hugging Face model cast after compile failed in a matmul (export fixed float32 in its graph)."""
    import copy
    import io
    import pickle
    model = build_hf("qwen3_moe", num_hidden_layers=1)
    ids = torch.randint(0, VOCAB, (2, 8))
    program = mc.compile(model, mc.Plan(mode="train"), example_inputs=(ids,))
    for how in (copy.deepcopy, pickle.dumps, lambda p: torch.save(p, io.BytesIO())):
        with pytest.raises(TypeError, match=r"a compiled TrainingProgram cannot be copied or pickled.*"
                                            r"copy the model before compiling"):
            how(program)
    program(ids)
    model.to(torch.bfloat16)
    with pytest.raises(TypeError, match=r"Qwen3MoeForCausalLM was captured by torch.export with torch.float32 "
                                        r"parameters.*cast the model before compiling"):
        program(ids)


class CheckpointedBlocks(torch.nn.Module):
    def __init__(self, reentrant: bool):
        super().__init__()
        self.embed, self.head = torch.nn.Embedding(64, 16), torch.nn.Linear(16, 64)
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(16, 16) for _ in range(2)])
        self.reentrant = reentrant

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=self.reentrant)
        return self.head(x)


@pytest.mark.parametrize("reentrant", [False, True])
def test_a_users_own_activation_checkpoints_are_named_in_a_warning(reentrant):
    """Capture runs through torch.utils.checkpoint, so the program keeps every activation: that was
    silent for a model's own checkpoints (transformers' gradient checkpointing warned)."""
    import warnings
    model = CheckpointedBlocks(reentrant)
    ids = torch.randint(0, 64, (2, 8))
    with pytest.warns(UserWarning, match=r"CheckpointedBlocks calls torch.utils.checkpoint, which the captured "
                                         r"graph does not keep"):
        program = mc.compile(model, mc.Plan(mode="train"), example_inputs=(ids,))
    torch.testing.assert_close(program(ids), model(ids))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message="None of the inputs have requires_grad")
        mc.compile(model.eval(), mc.Plan(mode="infer"), example_inputs=(ids,))     # no activations kept
