import pytest
import torch

import moesys_compile as mc
from moesys_compile.models.spec import load_model, parse_overrides


def test_presets_and_overrides():
    model = mc.models.build("tiny-moe", vocab_size=100, dim=32, n_layers=3, num_experts=8, top_k=1)
    assert len(model.layers) == 3 and model.layers[0].ffn.num_experts == 8 and model.layers[0].ffn.top_k == 1
    assert model(torch.randint(0, 100, (2, 7))).shape == (2, 7, 100)
    assert isinstance(mc.models.build("tiny-gpt").layers[0].ffn, mc.nn.MLP)


def test_unknown_model_and_override_are_named():
    with pytest.raises(ValueError, match="unknown model 'tiny-llm'"):
        mc.models.build("tiny-llm")
    with pytest.raises(ValueError, match=r"unknown override\(s\) \['n_layer'\]"):
        mc.models.build("tiny-moe", n_layer=3)


def test_incremental_decoding_matches_full_forward():
    model = mc.models.build("tiny-moe").eval()
    ids = torch.randint(0, 256, (2, 9))
    full = model(ids)
    caches = [{} for _ in model.layers]
    steps = [model(ids[:, :5], caches=caches, start_pos=0)]
    for pos in range(5, 9):
        steps.append(model(ids[:, pos:pos + 1], caches=caches, start_pos=pos))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_cli_model_specs():
    assert parse_overrides(["n_layers=3", "activation=gelu", "capacity_factor=1.5"]) == {
        "n_layers": 3, "activation": "gelu", "capacity_factor": 1.5}
    # JSON literals as a config.json writes them, for train --override as for inspect/infer --config
    assert parse_overrides(["tie_word_embeddings=false", "rope_scaling=null", "shared=True"]) == {
        "tie_word_embeddings": False, "rope_scaling": None, "shared": True}
    loaded = load_model("tiny-gpt", {"vocab_size": 50})
    (ids,) = loaded.example_inputs(3, 4)
    assert ids.shape == (3, 4) and int(ids.max()) < 50
    with pytest.raises(ValueError, match="unknown MODEL 'nonsense'"):
        load_model("nonsense")
    with pytest.raises(ValueError, match="cannot load model factory"):
        load_model("no.such.module:factory")


def test_a_model_copies_after_a_forward():
    """The last forward's aux loss (a non-leaf tensor) stays behind: deepcopy (an EMA or reference
    copy of the model) works after training steps, and the copy computes the same."""
    import copy
    model = mc.models.build("tiny-moe")
    ids = torch.randint(0, 256, (2, 8))
    out = model(ids)
    twin = copy.deepcopy(model)
    assert torch.equal(twin(ids), out) and model.layers[0].ffn.aux_loss is not None
