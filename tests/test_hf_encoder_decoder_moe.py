"""Hugging Face encoder-decoder MoE families taken as they are (tiny random configs, nothing
downloaded).

Switch Transformers: its sparse MLP (ModuleDict experts, a top-1 router that returns a one-hot
dispatch mask with the tokens past ``expert_capacity`` zeroed, counted per sequence) is
canonicalized, and the program equals eager with tokens dropped by capacity, batch > 1, with and
without ``attention_mask``: train mode (logits, the model's loss with its router z-loss and aux
loss, every gradient; one process and expert_parallel=2 on two gloo ranks) and ring inference
(weights on host and on disk). Dropout inside the experts, between their projections, is applied in
training (from the same random state as eager, the same mask where the CPU's draws continue across
calls), on one process and over expert-parallel ranks; dropout elsewhere in the experts is left
with the reason.

NLLB-MoE: its sparse MLP is left as it is, with the reason, which the capture error repeats.
"""

from __future__ import annotations

import copy
import math
import re
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch

import moesys_compile as mc
from moesys_compile.errors import MoesysError, UntraceableModelError
from moesys_compile.frontend.recognizers import CanonicalMoEBlock, canonicalize
from moesys_compile.infer import model_bytes

transformers = pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).parent))
from dist_utils import global_mean, optimizer_steps, run_ranks  # noqa: E402

VOCAB, BATCH, SEQ, DECODED, CAPACITY = 64, 4, 16, 6, 3   # 16 tokens of a sequence over 4 experts of capacity 3
SPARSE = ("encoder.block.1.layer.1.mlp", "decoder.block.1.layer.2.mlp")


def switch_model(**overrides) -> torch.nn.Module:
    """A tiny Switch Transformers model (a sparse MLP in the second encoder and decoder block: the
    model then adds both stacks' router losses), in train mode, without dropout or router jitter
    unless ``overrides`` say otherwise."""
    torch.manual_seed(0)
    fields = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                  num_experts=4, expert_capacity=CAPACITY, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1,
                  dropout_rate=0.0, router_jitter_noise=0.0, decoder_start_token_id=0, pad_token_id=0,
                  output_router_logits=True)
    config = transformers.SwitchTransformersConfig(**{**fields, **overrides})
    return transformers.SwitchTransformersForConditionalGeneration(config).train()


def batch(seed: int = 1, rows: slice = slice(None)) -> dict:
    """Token ids, decoder ids and labels; ``attention_mask`` masks the end of the second sequence."""
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, SEQ - 4:] = 0
    labels = ids[:, :DECODED].flip(1).contiguous()
    return dict(input_ids=ids[rows], attention_mask=mask[rows], decoder_input_ids=labels[rows], labels=labels[rows])


def without_mask(inputs: dict) -> dict:
    return {name: value for name, value in inputs.items() if name != "attention_mask"}


def test_switch_trains_like_eager():
    """Logits, the model's loss (cross-entropy + router z-loss + aux loss, output_router_logits on)
    and its parts, and every parameter's gradient equal eager's (without attention_mask: below)."""
    model = switch_model()
    eager = copy.deepcopy(model)
    program = mc.compile(model, mc.Plan(mode="train"), example_kwargs=batch())
    for path in SPARSE:                      # as inspect reports them
        block = model.get_submodule(path)
        assert isinstance(block, CanonicalMoEBlock)
        details = block.details()
        assert details["router"] == "own router 'router' (traced, per sequence)"
        assert details["capacity"].startswith(f"{CAPACITY} tokens per expert per sequence")
        assert (details["top_k"], details["activation"]) == (1, "relu")
    got, want = program(**batch(seed=2)), eager(**batch(seed=2))
    with torch.no_grad():                    # the batch routes past capacity: without it, other logits
        dropless = switch_model(expert_capacity=SEQ)(**batch(seed=2)).logits
    assert (dropless - want.logits).abs().max() > 1e-3
    for name in ("logits", "loss", "encoder_z_loss", "encoder_aux_loss", "decoder_z_loss", "decoder_aux_loss"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-6, msg=name)
    got.loss.backward()
    want.loss.backward()
    for (name, p), (_, q) in zip(model.named_parameters(), eager.named_parameters()):
        # an expert no token reaches: eager leaves its gradient None, the stacked experts give zeros
        torch.testing.assert_close(p.grad, torch.zeros_like(q) if q.grad is None else q.grad, rtol=1e-5,
                                   atol=1e-6, msg=name)


def test_switch_ring_inference_equals_eager(tmp_path):
    """Weights on host (no attention_mask) and on disk (with one); four blocks per stack (two
    sparse): half the model's bytes hold a ring at this batch."""
    model = switch_model(num_layers=4, num_decoder_layers=4, num_sparse_encoder_layers=2,
                         num_sparse_decoder_layers=2).eval()
    masked = {name: value for name, value in batch().items() if name != "labels"}
    for weights, inputs in (("host", without_mask(masked)), ("disk", masked)):
        with torch.no_grad():
            want = model(**inputs).logits
        offload = dict(offload_dir=str(tmp_path)) if weights == "disk" else {}
        plan = mc.Plan(mode="infer", device="cpu", device_budget=model_bytes(model) // 2, weights=weights, **offload)
        program = mc.compile(model, plan, example_kwargs=inputs)
        try:
            torch.testing.assert_close(program(**inputs).logits, want, rtol=1e-5, atol=1e-6, msg=weights)
        finally:
            program.close()


def test_only_encoder_decoder_examples_without_a_mask_get_it_built_in_the_graph():
    """Decoder-only models build their masks in the graph themselves: capture leaves them alone."""
    from moesys_compile.frontend.hf_capture import needs_default_mask
    from moesys_compile.models.hf import build_hf
    llama = build_hf("llama", num_hidden_layers=1)
    assert not needs_default_mask(llama, (batch()["input_ids"],), {})
    switch = switch_model()
    assert needs_default_mask(switch, (), without_mask(batch()))
    assert not needs_default_mask(switch, (), batch())


def sgd_step_on_ranks(rank: int, world: int):
    """One SGD step of the model's own loss on this rank's half of the batch, without
    attention_mask, experts split over the two ranks; (loss averaged over the ranks, full state on
    rank 0)."""
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    program = mc.compile(switch_model(), mc.Plan(mode="train", world_size=world, expert_parallel=world),
                         example_kwargs=without_mask(batch(rows=rows)))
    local = without_mask(batch(seed=2, rows=rows))
    opt = torch.optim.SGD(program.parameters(), lr=0.5)
    losses = optimizer_steps(lambda: program(**local).loss, opt, 1)
    state = program.full_state_dict()
    return global_mean(losses[0]), (state if rank == 0 else None)


def test_switch_trains_on_two_expert_parallel_ranks_like_eager():
    """Capacity counts per sequence, so splitting the batch over ranks drops the same tokens."""
    model = switch_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    want_losses = optimizer_steps(lambda: model(**without_mask(batch(seed=2))).loss, opt, 1)
    (loss, state), _ = run_ranks(sgd_step_on_ranks, 2)
    assert loss == pytest.approx(want_losses[0], rel=1e-5)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(state[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def with_expert_dropout_only(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with every dropout module outside the experts at p = 0: the experts' dropout is
    then the only draw of a forward."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout) and ".experts." not in name:
            module.p = 0.0
    return model


def test_dropout_inside_the_experts_trains_and_follows_the_mode():
    """Switch Transformers' experts apply dropout between their projections: in training the
    canonical experts apply it too (one random state, one mask; another, another), on the torch
    path; in eval mode nothing is dropped, and the program follows program.eval() without a
    warning."""
    model = with_expert_dropout_only(switch_model(dropout_rate=0.3))
    eager = copy.deepcopy(model).eval()
    program = mc.compile(model, mc.Plan(mode="train"), example_kwargs=batch())
    details = model.get_submodule(SPARSE[0]).details()
    assert details["expert_dropout"].startswith("4 modules, p=0.3 between the projections")
    assert any("keep_NF" in note for note in program.context.notes.get("lower_kernels", []))
    logits = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        logits.append(program(**batch(seed=2)).logits)
    assert torch.equal(logits[0], logits[1]) and (logits[0] - logits[2]).abs().max() > 1e-3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        program.eval()
    assert not [w for w in caught if "computes differently" in str(w.message)]
    with torch.no_grad():
        torch.testing.assert_close(program(**batch(seed=2)).logits, eager(**batch(seed=2)).logits, rtol=1e-5,
                                   atol=1e-6)


def draws_continue_across_calls() -> bool:
    """Whether two dropout calls draw what one call on both draws (the CPU's plain bernoulli
    stream); torch on an Intel CPU with MKL seeds every call anew."""
    torch.manual_seed(0)
    parts = torch.cat([torch.nn.functional.dropout(torch.ones(3, 8), 0.5) for _ in range(2)])
    torch.manual_seed(0)
    return torch.equal(parts, torch.nn.functional.dropout(torch.ones(6, 8), 0.5))


def test_dropout_inside_the_experts_draws_eager_masks_from_the_same_random_state():
    """The mask over the routed slots in expert order is what eager's per-expert dropout calls
    draw, where the CPU's draws continue across calls: logits, loss and every gradient equal
    eager's. No token is dropped by capacity here: the router sends such a token to an expert at
    weight 0, which takes a row of the mask that eager's expert loop does not draw."""
    if not draws_continue_across_calls():
        pytest.skip("this CPU's dropout draws restart at every call (MKL on Intel): eager's per-expert masks "
                    "are as random as the program's one mask, not the same")
    model = with_expert_dropout_only(switch_model(dropout_rate=0.3, expert_capacity=SEQ))
    eager = copy.deepcopy(model)
    program = mc.compile(model, mc.Plan(mode="train"), example_kwargs=batch())
    torch.manual_seed(7)
    got = program(**batch(seed=2))
    torch.manual_seed(7)
    want = eager(**batch(seed=2))
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-6)
    got.loss.backward()
    want.loss.backward()
    for (name, p), (_, q) in zip(model.named_parameters(), eager.named_parameters()):
        torch.testing.assert_close(p.grad, torch.zeros_like(q) if q.grad is None else q.grad, rtol=1e-5,
                                   atol=1e-6, msg=name)


def test_dropout_inside_the_experts_is_taken_after_a_canonicalization_in_eval_mode():
    model = switch_model(dropout_rate=0.3).eval()
    canonicalize(model)
    model.train()
    outputs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        outputs.append(model(**batch()).logits)
    assert torch.equal(outputs[0], outputs[1]) and not torch.equal(outputs[0], outputs[2])


def _dropout_after_the_down_projection(expert: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    return expert.dropout(expert.wo(expert.act(expert.wi(hidden_states))))


@pytest.mark.parametrize("change", ["place", "probability"])
def test_dropout_inside_the_experts_that_the_canonical_form_cannot_apply_is_left_with_the_reason(change):
    """Dropout after the down projection, or at other probabilities in different experts, is not
    what the canonical experts apply: in training the block is left, with what differs; in eval
    mode (nothing dropped) it is canonicalized, and refuses to run once switched to training."""
    model = switch_model(dropout_rate=0.1)
    experts = model.get_submodule(SPARSE[0]).experts
    if change == "place":
        for expert in experts.values():
            expert.forward = types.MethodType(_dropout_after_the_down_projection, expert)
        why = "do not act as one dropout of the activation between the projections"
    else:
        experts["expert_1"].dropout.p = 0.2
        why = r"their dropout modules differ in p \(\[0.1, 0.2\]\)"
    report = {r.path: r for r in canonicalize(model)}[SPARSE[0]]
    assert report.action == "left"
    assert re.search(why, report.reason) and "dropout_rate=0" in report.reason
    model.eval()
    canonicalize(model)
    model.train()
    with pytest.raises(MoesysError, match=r"runs in training mode, but its experts apply dropout .*" + why):
        model(**batch())


def expert_dropout_step_on_ranks(rank: int, world: int):
    """A training step of the Switch model with its experts' dropout on, experts split over the
    ranks: each rank draws the mask of the rows it receives; (the loss, whether every mask the
    experts read is of received rows)."""
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    program = mc.compile(with_expert_dropout_only(switch_model(dropout_rate=0.3)),
                         mc.Plan(mode="train", world_size=world, expert_parallel=world),
                         example_kwargs=without_mask(batch(rows=rows)))
    gm = program.graph_module      # the masks follow program.train()/eval(): called through a TrainOnlyDropout
    masks = [n for n in gm.graph.nodes if n.op == "call_module"
             and "expert_dropout_keep" in str(getattr(gm.get_submodule(n.target), "op", ""))]
    received = bool(masks) and all("dispatch" in str(mask.args[0].target) for mask in masks)
    torch.manual_seed(rank)
    loss = program(**without_mask(batch(seed=2, rows=rows))).loss
    loss.backward()
    return float(loss), received


def test_dropout_inside_the_experts_trains_on_two_expert_parallel_ranks():
    results = run_ranks(expert_dropout_step_on_ranks, 2)
    assert all(received and math.isfinite(loss) for loss, received in results)


def nllb_model():
    torch.manual_seed(0)
    config = transformers.NllbMoeConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                        decoder_ffn_dim=64, num_experts=4, expert_capacity=CAPACITY,
                                        encoder_sparse_step=2, decoder_sparse_step=2, max_position_embeddings=64)
    return transformers.NllbMoeForConditionalGeneration(config).eval()


def test_nllb_moe_is_left_with_its_reason_and_capture_names_it():
    inputs = without_mask({name: value for name, value in batch().items() if name != "labels"})
    with pytest.raises(UntraceableModelError) as info:
        mc.compile(nllb_model(), mc.Plan(mode="infer"), example_kwargs=inputs)
    message = str(info.value)
    assert "the MoE block 'model.encoder.layers.1.ffn' (hf.NllbMoeSparseMLP) around it was not recognised" in message
    assert "its forward takes ['padding_mask'] besides the hidden states" in message
