"""Thirteenth new-user sweep: arguments the canonical ops took without a word, torchrun's other
spelling of ``--nproc-per-node``, and Hugging Face rotary embeddings that change their own state
(dynamic NTK, longrope) beside a ring program and while they are captured."""

from __future__ import annotations

import pytest
import torch

import moesys_compile.kernels  # noqa: F401 - registers torch.ops.moesys_kernels
from moesys_compile import train
from moesys_compile.errors import OpInputError

SCORES_TE = torch.randn(6, 4, generator=torch.Generator().manual_seed(0)).softmax(-1)
IDS_TK = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0], [0, 2], [1, 3]])


@pytest.mark.parametrize("scores, ids, message", [
    (SCORES_TE, torch.where(IDS_TK == 3, 4, IDS_TK), r"ids_TK\[2, 1\] is 4, outside \[0, num_experts \(4\)\)"),
    (SCORES_TE, -IDS_TK, r"ids_TK\[0, 1\] is -1, outside \[0, num_experts \(4\)\)"),
    (SCORES_TE, IDS_TK[:5], r"scores_TE has shape \(6, 4\) but ids_TK has 5 tokens"),
    (SCORES_TE[0], IDS_TK, r"scores_TE must be \[T, E\], got shape \(4,\)"),
])
def test_the_load_balancing_loss_names_ids_that_its_scores_do_not_hold(scores, ids, message):
    """Before, an id past E or below 0 failed inside scatter_add with an index error naming no
    argument, and ids of fewer tokens than the scores were averaged over the wrong count."""
    with pytest.raises(OpInputError, match=message):
        torch.ops.moesys.load_balancing_loss(scores, ids, 0.01)
    assert torch.ops.moesys.load_balancing_loss(SCORES_TE, IDS_TK, 0.01).item() > 0   # good input still runs


@pytest.mark.parametrize("capacity_factor", [-1.0, float("inf"), float("nan")])
def test_moe_experts_and_sort_slots_refuse_a_capacity_factor_that_is_no_capacity(capacity_factor):
    """A negative factor was taken as dropless, and inf or NaN as a capacity; Plan and nn.MoE
    already refuse them, the ops now do too."""
    x_TD = torch.randn(6, 8)
    w_up_EHD, w_down_EDF = torch.randn(4, 32, 8), torch.randn(4, 8, 16)
    message = rf"capacity_factor \({capacity_factor}\) must be a finite number > 0 .* or 0 for dropless routing"
    with pytest.raises(OpInputError, match=message):
        torch.ops.moesys.moe_experts(x_TD, IDS_TK, torch.ones(6, 2), w_up_EHD, w_down_EDF, "swiglu", capacity_factor)
    with pytest.raises(OpInputError, match=message):
        torch.ops.moesys_kernels.sort_slots(IDS_TK, 4, -1, capacity_factor)


@pytest.mark.parametrize("argv", [["--nproc_per_node", "2"], ["--nproc_per_node=2"], ["--nproc-per-node", "2"],
                                  ["--nproc-per-node=2"]])
def test_train_takes_torchrun_s_underscore_spelling_of_nproc_per_node(argv, monkeypatch):
    """``torchrun --nproc_per_node 2`` is how many launch scripts spell it; the launcher refused that
    spelling as an unrecognised argument. Each spelling launches 2 ranks, and none reaches them."""
    monkeypatch.delenv("RANK", raising=False)
    launched = []
    monkeypatch.setattr(train, "precheck", lambda args, world: None)
    monkeypatch.setattr(train, "launch", lambda forwarded, nproc: launched.append((forwarded, nproc)) or 0)
    assert train.main(["--model", "tiny-moe", *argv, "--ep", "2"]) == 0
    assert launched == [(["--model", "tiny-moe", *argv, "--ep", "2"], 2)]
    assert train.without_launch_option(launched[0][0]) == ["--model", "tiny-moe", "--ep", "2"]


def _dynamic_rope_llama():
    from moesys_compile.models.hf import build_hf
    return build_hf("llama", max_position_embeddings=32,
                    rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}).eval()


@pytest.mark.parametrize("eager_calls_before_compile", [0, 3])
def test_a_ring_keeps_running_after_the_eager_model_rescales_its_dynamic_rope(eager_calls_before_compile):
    """A dynamic-NTK rotary embedding, called eagerly past its original length, points its
    ``inv_freq`` buffer at new frequencies (and back at ``original_inv_freq`` after a short call).
    The ring refused every later call as if a weight had changed: it had staged ``inv_freq``, which
    export lists although the captured forward computes the frequencies per call, or (once the
    buffer aliased ``original_inv_freq``) it watched the name rather than the tensor it read."""
    import moesys_compile as mc
    from moesys_compile.infer import model_bytes
    from moesys_compile.models.hf import build_hf

    model = _dynamic_rope_llama()
    short, long = (torch.randint(0, 100, (2, seq), generator=torch.Generator().manual_seed(seq)) for seq in (16, 48))
    with torch.no_grad():
        for ids in (short, long, short)[:eager_calls_before_compile]:
            model(ids)
        program = mc.compile(model, mc.Plan(mode="infer", device="cpu", device_budget=2 * model_bytes(model),
                                            weights="host"), example_inputs=(short,))
        want = {ids.shape[1]: _dynamic_rope_llama()(ids).logits for ids in (short, long)}
        for ids in (long, short, long):
            model(ids)                        # the eager model moves its buffer between the ring's calls
            torch.testing.assert_close(program(ids).logits, want[ids.shape[1]], rtol=0, atol=0)
        plain = build_hf("llama", max_position_embeddings=32).eval()      # the same weights, rope not rescaled
        assert not torch.allclose(plain(long).logits, want[48])           # past 32 tokens the scaling shows


def test_compiling_leaves_no_capture_tensor_on_the_model():
    """Phi-3's longrope rotary embedding caches ``long_inv_freq`` as a plain attribute on its first
    call. Captured, that first call left export's fake tensor on the user's model: the eager model
    then computed other logits past the original length, and ``copy.deepcopy(model)`` failed. Nor
    does torch's warning to register the attribute as a buffer reach the user."""
    import copy
    import warnings

    import moesys_compile as mc
    from moesys_compile.models.hf import build_hf

    def longrope_phi3():
        return build_hf("phi3", max_position_embeddings=64, original_max_position_embeddings=32,
                        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 4,
                                         "long_factor": [2.0] * 4, "original_max_position_embeddings": 32}).eval()
    model, untouched = longrope_phi3(), longrope_phi3()
    short, long = (torch.randint(0, 100, (2, seq), generator=torch.Generator().manual_seed(seq)) for seq in (16, 48))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        program = mc.compile(model, mc.Plan(mode="train"), example_inputs=(short,))
    assert "long_inv_freq" not in vars(model.model.rotary_emb)
    assert not [w for w in caught if "assigned during export" in str(w.message)]   # torch's advice: not the user's
    with torch.no_grad():
        torch.testing.assert_close(model(long).logits, untouched(long).logits, rtol=0, atol=0)
        torch.testing.assert_close(program(long).logits, untouched(long).logits, rtol=0, atol=0)
        torch.testing.assert_close(copy.deepcopy(model)(short).logits, untouched(short).logits, rtol=0, atol=0)
