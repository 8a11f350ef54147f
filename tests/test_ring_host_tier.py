"""The host tier on a CPU device holds no second copy of an in-memory model's weights: the ring
reads the model's own tensors, and only tensors it must convert (another dtype) are copied."""

import torch

import moesys_compile as mc
from moesys_compile.infer import model_bytes

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
    spans = model_storage_spans(model)
    floating = [loc for loc in program.store.locations.values() if loc.dtype.is_floating_point]
    assert floating and all(loc.dtype == torch.bfloat16 and not in_model(loc, spans) for loc in floating)
    with torch.inference_mode():
        expected = model.to(torch.bfloat16)(IDS)
    torch.testing.assert_close(program(IDS).float(), expected.float(), rtol=2e-2, atol=2e-2)
