"""Command-line options as a first-time user tries them: ``infer`` on a Hugging Face directory
(weights that do not fit its config, a text prompt and its tokenizer), ``--config`` before MODEL,
several overrides at once, and ``train --device cuda`` on a machine without CUDA."""

from __future__ import annotations

import json

import pytest
import torch

from moesys_compile.cli import main as cli_main
from moesys_compile.infer import main as infer_main

pytest.importorskip("transformers")

from moesys_compile.models.hf import build_hf  # noqa: E402


def test_infer_cli_refuses_a_model_directory_whose_weights_do_not_fit_its_config(tmp_path, capsys):
    """transformers would initialise the tensor at random and only log it."""
    build_hf("llama", seed=1, num_hidden_layers=1).save_pretrained(tmp_path)
    config = (tmp_path / "config.json").read_text().replace('"intermediate_size": 64', '"intermediate_size": 48')
    (tmp_path / "config.json").write_text(config)
    assert infer_main([str(tmp_path), "--budget", "1MiB", "--max-new-tokens", "0"]) == 2
    err = capsys.readouterr().err
    assert "its weights do not fit its config.json (LlamaForCausalLM): 'model.layers.0.mlp.down_proj.weight' has " \
           "shape [32, 64], not [32, 48] (and 2 more); save the directory again" in err
    assert "Traceback" not in err


def save_word_tokenizer(directory, vocab_size: int = 128):
    """A word-level Hugging Face tokenizer over ``w0 .. w{vocab_size - 2}`` and ``[UNK]``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"[UNK]": 0, **{f"w{i}": i + 1 for i in range(vocab_size - 1)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(directory)


def test_infer_cli_encodes_a_text_prompt_and_decodes_the_new_tokens(tmp_path, capsys):
    model = build_hf("llama", seed=1, num_hidden_layers=1).eval()
    model.save_pretrained(tmp_path)
    save_word_tokenizer(tmp_path)
    report = tmp_path / "report.json"
    assert infer_main([str(tmp_path), "--budget", "1MiB", "--prompt", "w5 w17 w3 w99", "--max-new-tokens", "3",
                       "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert "equal to eager greedy decoding: True" in out
    tokens = json.loads(report.read_text())["tokens"][0]
    want = model.generate(torch.tensor([[6, 18, 4, 100]]), attention_mask=torch.ones(1, 4, dtype=torch.long),
                          max_new_tokens=3, do_sample=False)[0, 4:].tolist()
    assert tokens == want
    text = " ".join(f"w{t - 1}" for t in tokens if t != 0)     # id 0 is [UNK], a special token
    assert f"new text: {text!r}" in out


def test_infer_cli_text_prompt_without_a_tokenizer_says_where_it_looked(tmp_path, capsys):
    build_hf("llama", seed=1, num_hidden_layers=1).save_pretrained(tmp_path)
    assert infer_main([str(tmp_path), "--budget", "1MiB", "--prompt", "hello"]) == 2
    err = capsys.readouterr().err
    assert f"--prompt needs a tokenizer, and none of [{str(tmp_path)!r}] holds one" in err
    assert "pass --tokenizer DIR" in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["inspect", "infer"])
def test_config_before_model_leaves_the_model_on_the_command_line(command, capsys):
    """``--config`` takes one or more values: MODEL after it must still be read as MODEL."""
    tail = ["--after", "capture"] if command == "inspect" else ["--budget", "1MiB", "--max-new-tokens", "1"]
    assert cli_main([command, "--config", "n_layers=1", "tiny-moe", *tail]) == 0
    out = capsys.readouterr().out
    assert ("layers.0" in out and "layers.1" not in out) if command == "inspect" else "equal to eager" in out


def test_inspect_config_takes_several_overrides_at_once(capsys):
    assert cli_main(["inspect", "tiny-moe", "--config", "n_layers=1", "num_experts=8", "--after", "capture"]) == 0
    out = capsys.readouterr().out
    assert "num_experts=8" in out and "layers.1" not in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("ranks", ["1", "2"])
def test_train_on_cuda_without_cuda_is_one_line(ranks, capsys, monkeypatch):
    """``moesys-compile train --help`` offers ``--device cuda``; without CUDA that is one line, not
    an assertion from deep inside torch (or one per launched rank)."""
    from moesys_compile import train
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(train, "launch", lambda *a, **k: pytest.fail("ranks were launched"))
    argv = ["--model", "tiny-moe", "--steps", "1", "--device", "cuda", "--nproc-per-node", ranks]
    assert train.main(argv) == 2
    assert "--device ('cuda') needs CUDA, which this machine does not have; set --device to 'cpu'" in capsys.readouterr().err
