"""``program.generate(ids, n, do_sample=True, ...)`` samples as ``model.generate`` does: the same
processors and warpers (temperature, top-k, top-p, min-p, typical-p), one draw per sequence and
step from the global generator, so that ``torch.manual_seed`` before each gives the same tokens;
``num_return_sequences`` sequences per prompt; the command line's ``--do-sample``."""

from __future__ import annotations

import pytest
import torch

import moesys_compile as mc
from moesys_compile.infer import main as infer_main
from moesys_compile.infer import model_bytes

transformers = pytest.importorskip("transformers")

from moesys_compile.models.hf import build_hf  # noqa: E402

NEW = 8
VOCAB = 96                     # more than transformers' default top_k of 50
SEED = 3


def prompts(batch: int = 3, seq: int = 6) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", params=["llama", "qwen3_moe"])
def compiled(request):
    """A 2-layer model whose generation_config carries sampling settings (as checkpoints ship
    them), and its ring program at half the model's size."""
    torch.set_num_threads(1)
    model = build_hf(request.param, num_hidden_layers=2, vocab_size=VOCAB, seed=5).eval()
    model.generation_config = transformers.GenerationConfig(eos_token_id=None, pad_token_id=0, temperature=0.7,
                                                            top_k=20, top_p=0.9)
    plan = mc.Plan(mode="infer", device="cpu", device_budget=model_bytes(model) // 2 + 2**18)
    program = mc.compile(model, plan, example_inputs=(prompts(),))
    yield model, program
    program.close()


def eager(model, ids, mask=None, seed: int = SEED, **settings) -> torch.Tensor:
    torch.manual_seed(seed)
    with torch.inference_mode():
        return model.generate(ids, attention_mask=torch.ones_like(ids) if mask is None else mask,
                              max_new_tokens=NEW, **settings)


def ring(program, ids, mask=None, seed: int = SEED, **settings) -> torch.Tensor:
    torch.manual_seed(seed)
    return program.generate(ids, NEW, attention_mask=mask, **settings)


@pytest.mark.parametrize("settings", [
    {},                                                        # the model's temperature, top-k and top-p
    {"temperature": 1.5, "top_k": 0, "top_p": 1.0},           # plain softmax at a temperature
    {"top_k": 0, "top_p": 0.6},
    {"top_k": 0, "top_p": 1.0, "min_p": 0.1},
    {"top_k": 0, "top_p": 1.0, "typical_p": 0.5},
    {"repetition_penalty": 1.5, "temperature": 1.2},
], ids=["config", "temperature", "top_p", "min_p", "typical_p", "penalty"])
def test_sampling_gives_the_tokens_of_model_generate_from_the_same_seed(compiled, settings):
    model, program = compiled
    ids = prompts()
    want = eager(model, ids, do_sample=True, **settings)
    assert torch.equal(ring(program, ids, do_sample=True, **settings), want)
    assert not torch.equal(want, eager(model, ids, do_sample=False)), "the settings sample what greedy picks"
    assert not torch.equal(want, eager(model, ids, seed=SEED + 1, do_sample=True, **settings))


def test_settings_neither_the_model_nor_the_call_sets_take_transformers_defaults(compiled):
    """transformers 5 leaves top_k unset in a GenerationConfig and samples among the 50 likeliest
    tokens unless something sets it."""
    model, program = compiled
    own = model.generation_config
    model.generation_config = transformers.GenerationConfig(eos_token_id=None, pad_token_id=0)
    try:
        ids = prompts()
        want = eager(model, ids, do_sample=True, temperature=2.0)
        assert torch.equal(ring(program, ids, do_sample=True, temperature=2.0), want)
        assert not torch.equal(want, eager(model, ids, do_sample=True, temperature=2.0, top_k=0))
    finally:
        model.generation_config = own


def test_greedy_stays_the_default_where_the_models_config_samples(compiled):
    """The model's ``do_sample=True`` does not make ``generate`` sample; the call does."""
    model, program = compiled
    model.generation_config.do_sample = True
    try:
        ids = prompts()
        assert torch.equal(program.generate(ids, NEW), eager(model, ids, do_sample=False))
    finally:
        model.generation_config.do_sample = False


def test_several_sequences_per_padded_prompt(compiled):
    model, program = compiled
    ids, mask = prompts(2, 7), torch.ones(2, 7, dtype=torch.long)
    mask[1, :3] = 0
    ids = ids.masked_fill(mask == 0, 0)
    got = ring(program, ids, mask, do_sample=True, num_return_sequences=3)
    assert got.shape == (6, 7 + NEW)
    assert torch.equal(got, eager(model, ids, mask, do_sample=True, num_return_sequences=3))
    assert torch.equal(got[:3, :7], ids[:1].expand(3, 7))


def test_sampled_sequences_end_and_pad_at_an_end_of_sequence_id(compiled):
    """An end-of-sequence id among the likely tokens: finished rows get the pad id, as in transformers."""
    model, program = compiled
    ids = prompts()
    free = eager(model, ids, do_sample=True, temperature=1.5)
    eos = int(free[0, ids.shape[1] + 1])
    want = eager(model, ids, do_sample=True, temperature=1.5, eos_token_id=eos, pad_token_id=1)
    assert (want == 1).any(), "a row ended early"
    assert torch.equal(ring(program, ids, do_sample=True, temperature=1.5, eos_token_id=eos, pad_token_id=1), want)


def test_a_generation_config_passed_with_do_sample_samples(compiled):
    model, program = compiled
    config = transformers.GenerationConfig(do_sample=True, top_k=5, eos_token_id=None, pad_token_id=0)
    ids = prompts()
    assert torch.equal(ring(program, ids, generation_config=config), eager(model, ids, generation_config=config))
    assert torch.equal(ring(program, ids, generation_config=config, do_sample=False),
                       eager(model, ids, do_sample=False))


def test_several_sequences_without_sampling_are_refused_by_name(compiled):
    _, program = compiled
    with pytest.raises(ValueError, match="do_sample != True.*num_return_sequences"):
        program.generate(prompts(), NEW, num_return_sequences=2)


def test_the_command_line_samples_with_do_sample(tmp_path, capsys):
    args = ["hf:qwen3_moe", "--budget", "2MiB", "--config", "num_hidden_layers=2", "--max-new-tokens", "6",
            "--prompt-ids", "1", "2", "3", "4", "5", "--json"]
    assert infer_main(args + [str(tmp_path / "greedy.json")]) == 0
    for seed in (3, 4):
        assert infer_main(args + [str(tmp_path / f"s{seed}.json"), "--do-sample", "--temperature", "1.5",
                                  "--seed", str(seed)]) == 0
        assert "equal to eager sampling (seed" in capsys.readouterr().out
    import json
    reports = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in ("greedy", "s3", "s4")}
    assert all(report["generate_equals_eager"] for report in reports.values())
    assert len({str(report["tokens"]) for report in reports.values()}) == 3


def test_a_sampling_option_without_do_sample_is_refused(capsys):
    with pytest.raises(SystemExit):
        infer_main(["hf:qwen3_moe", "--budget", "2MiB", "--top-p", "0.9", "--temperature", "0.5"])
    assert "the sampling options (--temperature, --top-p) apply only with --do-sample" in capsys.readouterr().err


def test_sampling_a_built_in_model_is_refused_by_name(capsys):
    assert infer_main(["tiny-moe", "--budget", "2MiB", "--do-sample"]) == 2
    assert "--do-sample: the built-in model tiny-moe decodes greedily only" in capsys.readouterr().err
