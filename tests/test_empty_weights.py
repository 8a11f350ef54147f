"""Ring inference of a model whose parameters were never in memory: built under
``moesys_compile.empty_weights()`` (parameters on meta), its MoE blocks recognised from their own
tensors read from the checkpoint, every weight streamed from ``Plan.weights_checkpoint``. The
output equals the eager model loaded whole, and the parameters are still on meta afterwards."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import moesys_compile as mc
from moesys_compile.frontend.empty_weights import meta_tensor_names
from moesys_compile.infer import main as infer_main, model_bytes


def _ids(batch: int = 2, seq: int = 8) -> torch.Tensor:
    return torch.randint(0, 100, (batch, seq), generator=torch.Generator().manual_seed(0))


def _ring(model, checkpoint, tmp_path, budget: int, weights: str = "disk"):
    plan = mc.Plan(mode="infer", device_budget=budget, weights=weights, offload_dir=str(tmp_path / "ring"),
                   weights_checkpoint=str(checkpoint))
    return mc.compile(model, plan, example_inputs=(_ids(),))


def _logits(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


def test_empty_weights_puts_parameters_on_meta_and_keeps_buffers():
    with mc.empty_weights():
        model = mc.models.build("tiny-moe")
    assert all(p.is_meta for p in model.parameters())
    assert not any(b.is_meta for b in model.buffers())
    assert next(iter(torch.nn.Linear(2, 2).parameters())).device.type == "cpu"   # the patch is undone


@pytest.mark.parametrize("weights", ["host", "disk"])
def test_a_built_in_model_streams_every_weight_from_its_checkpoint(weights, tmp_path):
    source = mc.models.build("tiny-moe").eval()
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "model.safetensors"))
    with mc.empty_weights():
        model = mc.models.build("tiny-moe").eval()
    program = _ring(model, tmp_path, tmp_path, model_bytes(source) // 2, weights)
    for batch, seq in [(2, 8), (1, 5)]:
        with torch.inference_mode():
            torch.testing.assert_close(program(_ids(batch, seq)), source(_ids(batch, seq)), rtol=1e-6, atol=1e-6)
    assert program.stats["peak_device_bytes"] <= program.stats["budget_bytes"]
    assert all(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("family,overrides", [("qwen3_moe", {}), ("mixtral", {}),
                                              ("gpt_oss", {"num_hidden_layers": 4,
                                                           "layer_types": ["full_attention"] * 4})])
def test_a_hugging_face_model_from_its_config_equals_the_model_loaded_whole(family, overrides, tmp_path):
    pytest.importorskip("transformers")
    from moesys_compile.models.hf import build_hf, config_only, load_local
    build_hf(family, **overrides).save_pretrained(str(tmp_path / "hf"))        # the hub layout: per-expert tensors
    whole = load_local(str(tmp_path / "hf"), {}).eval()
    with mc.empty_weights():
        model = config_only(str(tmp_path / "hf"), {}).eval()
    program = _ring(model, tmp_path / "hf", tmp_path, model_bytes(whole) // 2 + 2**16)
    with torch.inference_mode():
        torch.testing.assert_close(_logits(program(_ids())), _logits(whole(_ids())), rtol=1e-5, atol=1e-5)
        # past the workspace sized at (2, 8): the meta model is lowered again, still reading no whole model
        torch.testing.assert_close(_logits(program(_ids(4, 12))), _logits(whole(_ids(4, 12))), rtol=1e-5, atol=1e-5)
    assert program.stats["compiled_for"] == (4, 12)
    whole.generation_config.eos_token_id = model.generation_config.eos_token_id = None
    with torch.inference_mode():
        want = whole.generate(_ids(2, 5), attention_mask=torch.ones(2, 5, dtype=torch.long), max_new_tokens=4,
                              do_sample=False, pad_token_id=0)
    assert torch.equal(program.generate(_ids(2, 5), 4), want)
    assert program.stats["decode"] == "kv_cache"        # the cache graphs of a meta model, weights streamed
    blocks = [b for b in program.context.blocks if b.action != "left"]
    assert blocks and all(b.action == "replaced" for b in blocks)       # recognised from the checkpoint's tensors
    assert meta_tensor_names(model) and not meta_tensor_names(whole)
    assert not any(b.is_meta for b in model.buffers())


def test_the_experts_of_a_left_block_are_recognised_from_the_checkpoint(tmp_path):
    """DeepSeek-V4's blocks stay traced code (one routes by a hash of the token ids); their experts,
    called with the routing, are probed on the checkpoint's tensors and canonicalized."""
    pytest.importorskip("transformers")
    from moesys_compile.models.hf import build_hf, config_only
    source = build_hf("deepseek_v4").eval()
    source.save_pretrained(str(tmp_path / "hf"))
    with mc.empty_weights():
        model = config_only(str(tmp_path / "hf"), {}).eval()
    program = _ring(model, tmp_path / "hf", tmp_path, model_bytes(source) // 2)
    with torch.inference_mode():
        torch.testing.assert_close(_logits(program(_ids())), _logits(source(_ids())), rtol=1e-5, atol=1e-5)
    assert [(b.path, b.action) for b in program.context.blocks] == [
        (f"model.layers.{layer}.mlp.experts", "replaced") for layer in range(2)]
    assert program.stats["peak_device_bytes"] <= program.stats["budget_bytes"]


def test_infer_of_a_directory_streams_it_and_matches_eager(tmp_path, capsys):
    pytest.importorskip("transformers")
    from moesys_compile.models.hf import build_hf
    build_hf("qwen3_moe").save_pretrained(str(tmp_path / "hf"))
    code = infer_main([str(tmp_path / "hf"), "--budget", "80KiB", "--weights", "disk", "--max-new-tokens", "3",
                       "--offload-dir", str(tmp_path / "ring")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "weights streamed from the directory" in out
    assert "equal to eager greedy decoding: True" in out


def test_meta_parameters_outside_ring_inference_are_refused():
    with mc.empty_weights():
        model = mc.models.build("tiny-moe")
    with pytest.raises(mc.PlanError, match="weights_checkpoint=DIR"):
        mc.compile(model, mc.Plan(mode="train"), example_inputs=(_ids(),))


def test_a_model_built_on_the_meta_device_names_its_computed_buffers(tmp_path):
    pytest.importorskip("transformers")
    from moesys_compile.models.hf import build_hf
    build_hf("qwen3_moe").save_pretrained(str(tmp_path / "hf"))
    with torch.device("meta"):
        model = build_hf("qwen3_moe")                # the rotary table (not in checkpoints) is on meta too
    with pytest.raises(mc.PlanError, match=r"non-persistent buffer 'model\.rotary_emb\.inv_freq'.*empty_weights"):
        _ring(model, tmp_path / "hf", tmp_path, 2**20)


# ---------------------------------------------------------------------------------------------
# quantized checkpoints, read dequantized (checked against transformers' own dequantization)
# ---------------------------------------------------------------------------------------------


def _rewrite_checkpoint(directory, change, quantization: dict) -> None:
    """Apply ``change(state) -> state`` to the directory's safetensors and declare ``quantization``
    in its config.json, as the hub ships quantized models."""
    import json
    from safetensors.torch import load_file
    path = directory / "model.safetensors"
    save_file(change(load_file(str(path))), str(path))
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = quantization
    (directory / "config.json").write_text(json.dumps(config))


def _ring_equals_reference(model_dir, reference, tmp_path) -> None:
    from moesys_compile.models.hf import config_only
    with mc.empty_weights():
        model = config_only(str(model_dir), {}).eval()
    program = _ring(model, model_dir, tmp_path, model_bytes(reference) // 2 + 2**16)
    with torch.inference_mode():
        torch.testing.assert_close(_logits(program(_ids())), _logits(reference(_ids())), rtol=1e-5, atol=1e-5)
    assert all(b.action == "replaced" for b in program.context.blocks)


def test_an_mxfp4_gpt_oss_checkpoint_is_read_dequantized(tmp_path):
    pytest.importorskip("transformers")
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    from moesys_compile.models.hf import build_hf
    reference = build_hf("gpt_oss", num_hidden_layers=2, intermediate_size=64).eval()
    reference.save_pretrained(str(tmp_path / "hf"))
    generator = torch.Generator().manual_seed(1)

    def quantize(state):
        for name in [n for n in state if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
            experts, rows_in, rows_out = state.pop(name).shape           # held [E, in, out], shipped [E, out, in]
            blocks = torch.randint(0, 256, (experts, rows_out, rows_in // 32, 16), generator=generator,
                                   dtype=torch.uint8)
            scales = torch.randint(121, 127, (experts, rows_out, rows_in // 32), generator=generator,
                                   dtype=torch.uint8)
            state[name + "_blocks"], state[name + "_scales"] = blocks, scales
            reference.get_parameter(name).data.copy_(convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
        return state
    _rewrite_checkpoint(tmp_path / "hf", quantize, {"quant_method": "mxfp4"})
    _ring_equals_reference(tmp_path / "hf", reference, tmp_path)
    from moesys_compile.runtime.sources import checkpoint_source
    name = "model.layers.1.mlp.experts.gate_up_proj"          # an expert group: its blocks and scales only
    torch.testing.assert_close(checkpoint_source(str(tmp_path / "hf"), reference)(name, (1, 3)),
                               reference.get_parameter(name)[1:3].detach(), rtol=0, atol=0)


def test_a_block_fp8_checkpoint_is_read_dequantized(tmp_path):
    pytest.importorskip("transformers")
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight
    from moesys_compile.models.hf import build_hf, load_local
    build_hf("qwen3_moe").save_pretrained(str(tmp_path / "hf"))      # per-expert Linear weights (hub layout)
    block = [16, 16]                                                    # several blocks per weight at these sizes
    generator = torch.Generator().manual_seed(2)
    dequantized = {}

    def quantize(state):
        for name in [n for n in state if n.endswith("proj.weight") and ".mlp.gate." not in n]:
            weight = state.pop(name)
            scale_inv = torch.rand(-(-weight.shape[0] // block[0]), -(-weight.shape[1] // block[1]),
                                   generator=generator) * 0.05 + 0.01
            tiles = scale_inv.repeat_interleave(block[0], 0)[:weight.shape[0]].repeat_interleave(block[1], 1)
            state[name] = (weight / tiles[:, :weight.shape[1]]).to(torch.float8_e4m3fn)
            state[name[:-len("weight")] + "weight_scale_inv"] = scale_inv
            dequantized[name] = _dequantize_fp8_weight(state[name].clone(), scale_inv, block, torch.float32)
        return state
    _rewrite_checkpoint(tmp_path / "hf", quantize, {"quant_method": "fp8", "weight_block_size": block})
    build_hf("qwen3_moe").save_pretrained(str(tmp_path / "plain"))
    from safetensors.torch import load_file
    plain = load_file(str(tmp_path / "plain" / "model.safetensors"))
    plain.update(dequantized)          # the same model with transformers' dequantized weights, unquantized
    save_file(plain, str(tmp_path / "plain" / "model.safetensors"))
    _ring_equals_reference(tmp_path / "hf", load_local(str(tmp_path / "plain"), {}).eval(), tmp_path)


def test_inspect_of_a_directory_in_infer_mode_reads_only_what_it_probes(tmp_path, capsys):
    pytest.importorskip("transformers")
    from moesys_compile.cli import main as cli_main
    from moesys_compile.models.hf import build_hf
    build_hf("mixtral").save_pretrained(str(tmp_path / "hf"))
    assert cli_main(["inspect", str(tmp_path / "hf"), "--mode", "infer"]) == 0
    out = capsys.readouterr().out
    assert "weights streamed from the directory" in out
    assert out.count("replaced") == 2                     # both layers recognised from the directory's tensors


def test_twin_blocks_are_recognised_from_the_first_ones_tensors_only(tmp_path):
    """Layers of one structure take the form probed on the first; a layer that differs in an
    attribute (its top_k) is probed with its own tensors."""
    pytest.importorskip("transformers")
    from moesys_compile.frontend.recognizers import canonicalize
    from moesys_compile.models.hf import build_hf, config_only
    from moesys_compile.runtime.sources import checkpoint_source
    build_hf("qwen3_moe", num_hidden_layers=4).save_pretrained(str(tmp_path / "hf"))
    with mc.empty_weights():
        model = config_only(str(tmp_path / "hf"), {})
    model.model.layers[3].mlp.top_k = 1        # as a config with a per-layer top_k would build it
    model.model.layers[3].mlp.gate.top_k = 1
    source = checkpoint_source(str(tmp_path / "hf"), model)
    read_layers: set[str] = set()

    def logged(name, rows=None):
        read_layers.add(name.split(".mlp.")[0])
        return source(name, rows)
    reports = canonicalize(model, weights=logged)
    assert [r.action for r in reports] == ["replaced"] * 4
    assert [r.details["top_k"] for r in reports] == [2, 2, 2, 1]
    assert read_layers == {"model.layers.0", "model.layers.3"}
    assert all(p.is_meta for p in model.parameters())


def test_an_expert_group_reads_only_its_own_experts_tensors(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from moesys_compile.models.hf import build_hf, config_only, load_local
    from moesys_compile.runtime import sources
    build_hf("mixtral").save_pretrained(str(tmp_path / "hf"))       # hub layout: experts.<e>.w1/w2/w3
    whole = load_local(str(tmp_path / "hf"), {})
    read_names: list[str] = []
    read_file = sources._read_hf

    def logged(files):
        read = read_file(files)

        def read_logged(name, rows=None):
            read_names.append(name)
            return read(name, rows)
        return read_logged
    monkeypatch.setattr(sources, "_read_hf", logged)
    with mc.empty_weights():
        model = config_only(str(tmp_path / "hf"), {})
    source = sources.sliced(sources.checkpoint_source(str(tmp_path / "hf"), model))
    for name in ("model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"):
        read_names.clear()
        torch.testing.assert_close(source(f"{name}[1:3]"), whole.get_parameter(name)[1:3].detach(), rtol=0, atol=0)
        assert read_names and all(".experts.1." in n or ".experts.2." in n for n in read_names), read_names


def test_per_expert_tensors_are_stacked_a_chunk_at_a_time(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from moesys_compile.models.hf import build_hf, config_only, load_local
    from moesys_compile.runtime import hf_layout, sources
    build_hf("qwen3_moe").save_pretrained(str(tmp_path / "hf"))      # experts.<e>.gate_proj/up_proj/down_proj
    whole = load_local(str(tmp_path / "hf"), {})
    monkeypatch.setattr(hf_layout, "CONVERT_CHUNK_BYTES", 1)          # one expert per chunk
    with mc.empty_weights():
        model = config_only(str(tmp_path / "hf"), {})
    source = sources.sliced(sources.checkpoint_source(str(tmp_path / "hf"), model))
    for name in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"):
        expected = whole.get_parameter(name).detach()
        assert expected.shape[0] >= 3
        torch.testing.assert_close(source(name), expected, rtol=0, atol=0)
        torch.testing.assert_close(source(f"{name}[1:3]"), expected[1:3], rtol=0, atol=0)


def test_fp8_rows_cut_block_scales_and_keep_a_per_tensor_scale():
    from moesys_compile.runtime.quantized import dequantizing_reader
    weight = torch.randn(4, 40, 36, generator=torch.Generator().manual_seed(3)).to(torch.float8_e4m3fn)
    state = {"a.weight": weight, "a.weight_scale_inv": torch.rand(4, 3, 3) + 0.5,      # 16x16 blocks, per expert
             "b.weight": weight, "b.weight_scale_inv": torch.tensor(0.5)}              # one scale for all

    def read(name, rows=None):
        return state[name] if rows is None else state[name][rows[0]:rows[1]]
    present, dequantized = dequantizing_reader(set(state), read, (16, 16), lambda name: None)
    assert present == {"a.weight", "b.weight"}
    for name in present:
        torch.testing.assert_close(dequantized(name, (1, 3)), dequantized(name)[1:3], rtol=0, atol=0)


def test_a_family_whose_weights_come_from_a_checkpoint_is_not_described_as_random():
    """``moesys-compile infer hf:<family> --checkpoint DIR`` builds the family's model on the meta
    device: its header says where the weights come from (it said "random init, seed 0")."""
    pytest.importorskip("transformers")
    from moesys_compile.models.spec import load_model
    loaded = load_model("hf:qwen2_moe", {}, weights=False)
    assert loaded.description == "hf:qwen2_moe (Qwen2MoeForCausalLM, weights streamed from the checkpoint)"
    assert all(p.is_meta for p in loaded.model.parameters())
    assert "random init, seed 3" in load_model("hf:qwen2_moe", {"seed": 3}).description
