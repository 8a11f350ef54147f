"""The host tier on a CPU device holds no second copy of an in-memory model's weights: the ring
reads the model's own tensors, and only tensors it must convert (another dtype) are copied."""

import copy

import pytest
import torch

import moesys_compile as mc
from moesys_compile.infer import model_bytes
from moesys_compile.programs.ring import RingWeightsError

IDS = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))


def build():
    torch.manual_seed(0)
    return mc.models.build("tiny-moe", n_layers=3).eval()


def model_storage_spans(model):
    """(start, end) byte addresses of every parameter's and buffer's storage."""
    tensors = list(model.parameters()) + list(model.buffers())
    return [(t.untyped_storage().data_ptr(), t.untyped_storage().data_ptr() + t.untyped_storage().nbytes())
            for t in tensors]


def in_model(location, spans) -> bool:
    start = location.buffer.data_ptr() + location.offset
    return any(lo <= start and start + location.nbytes <= hi for lo, hi in spans)


def test_host_tier_reads_the_models_own_tensors():
    model = build()
    program = mc.compile(model, mc.Plan(mode="infer", device_budget=model_bytes(model) // 3, weights="host"),
                         example_inputs=(IDS,))
    spans = model_storage_spans(model)
    locations = list(program.store.locations.values())
    assert locations and all(in_model(loc, spans) for loc in locations)
    with torch.inference_mode():
        torch.testing.assert_close(program(IDS), model(IDS), rtol=0, atol=1e-6)


def test_host_tier_copies_what_it_converts():
    model = build()
    program = mc.compile(model, mc.Plan(mode="infer", device_budget=model_bytes(model) // 3, weights="host",
                                        dtype="bfloat16"), example_inputs=(IDS,))
    with torch.inference_mode():
        expected = copy.deepcopy(model).to(torch.bfloat16)(IDS)      # the model itself stays as compiled
    spans = model_storage_spans(model)
    floating = [loc for loc in program.store.locations.values() if loc.dtype.is_floating_point]
    assert floating and all(loc.dtype == torch.bfloat16 and not in_model(loc, spans) for loc in floating)
    torch.testing.assert_close(program(IDS).float(), expected.float(), rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------------------------------------
# a model changed after compile
# ---------------------------------------------------------------------------------------------

def ring_of(model, **plan):
    return mc.compile(model, mc.Plan(mode="infer", device_budget=model_bytes(model) // 3, **plan),
                      example_inputs=(IDS,))


def test_an_in_place_change_the_host_ring_reads_in_place_is_taken():
    """Host memory on the CPU: the ring reads the model's own tensors, so an optimizer step on
    the model between calls is what the next call computes with (eager training, ring evaluation)."""
    model = build()
    program = ring_of(model, weights="host")
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    with torch.inference_mode():
        torch.testing.assert_close(program(IDS), model(IDS), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("plan,change,says", [
    (dict(weights="disk"), lambda m: m.embed.weight.mul_(2), "embed.weight of Transformer was modified in place"),
    (dict(weights="host", dtype="bfloat16"), lambda m: m.layers[1].ffn.w_up.add_(1),
     "layers.1.ffn.w_up of Transformer was modified in place"),
    (dict(weights="host"), lambda m: setattr(m.norm, "weight", torch.nn.Parameter(m.norm.weight * 2)),
     "norm.weight of Transformer was replaced by another tensor"),
    (dict(weights="host"), lambda m: m.load_state_dict({k: v.clone() for k, v in m.state_dict().items()},
                                                       assign=True),
     r"\S+ of Transformer was replaced by another tensor"),
    (dict(weights="host"), lambda m: m.to(torch.float64),
     r"\S+ of Transformer was cast from torch.float32 to torch.float64"),
])
def test_a_model_changed_where_the_ring_keeps_copies_is_refused_at_the_next_call(tmp_path, plan, change, says):
    """Copies (the disk tier, Plan.dtype) or a tensor the ring no longer reads: the call would
    run with stale or mixed weights; it is refused, naming the tensor and the change."""
    model = build()
    program = ring_of(model, offload_dir=str(tmp_path), **plan)
    with torch.no_grad():
        change(model)
    with pytest.raises(RingWeightsError, match=says + " after the ring program was compiled.*compile the model again"):
        program(IDS)
    with pytest.raises(RingWeightsError, match=says):
        program.generate(IDS, max_new_tokens=2)


def test_moving_or_casting_a_ring_program_is_refused_and_changes_nothing():
    model = build()
    program = ring_of(model, weights="host")
    for move in (lambda p: p.to(torch.bfloat16), lambda p: p.half(), lambda p: p.double()):
        with pytest.raises(RingWeightsError, match=r"cannot move or cast them: embed.weight would become torch\."
                                                   r"(bfloat16|float16|float64) on cpu; compile the model again"):
            move(program)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert program.to("cpu") is program and program.float() is program         # changes nothing: taken
    with torch.inference_mode():
        torch.testing.assert_close(program(IDS), model(IDS), rtol=1e-6, atol=1e-6)
