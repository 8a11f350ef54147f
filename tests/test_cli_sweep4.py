"""Rough edges found by the fourth README walkthrough: the infer CLI compared a prompt holding the
pad id under two different masks, a factory module in the current directory was not importable
from the console script, ``train --config`` took one override per flag, ``dropped_fraction`` keyed
layers by graph-node names, and a program without a ring answered ``generate`` with a bare
AttributeError."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch

import moesys_compile as mc
from moesys_compile import infer, train
from moesys_compile.models.spec import load_model


def test_typed_prompt_ids_holding_the_pad_id_equal_eager_greedy_decoding(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "stats.json"
    argv = ["hf:olmoe", "--config", "num_hidden_layers=1", "--budget", "1MiB", "--prompt-ids", "1", "2", "3",
            "--max-new-tokens", "2", "--json", str(out)]       # olmoe's pad_token_id is 1
    assert infer.main(argv) == 0
    assert json.loads(out.read_text())["generate_equals_eager"] is True


def test_a_factory_in_the_current_directory_is_importable(tmp_path, monkeypatch):
    (tmp_path / "cwd_factory.py").write_text(textwrap.dedent("""
        import moesys_compile as mc
        def make(n_layers=1):
            return mc.models.build("tiny-moe", n_layers=n_layers)
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])   # a console script's
    loaded = load_model("cwd_factory:make", {"n_layers": 2})
    assert len(loaded.model.layers) == 2


def test_train_config_takes_several_overrides_per_flag():
    args = train.build_parser().parse_args(["--config", "n_layers=1", "num_experts=8", "--override", "top_k=1"])
    assert args.override == ["n_layers=1", "num_experts=8", "top_k=1"]


def test_dropped_fraction_is_keyed_by_module_path():
    torch.manual_seed(0)
    model = mc.models.build("tiny-moe", n_layers=2)
    ids = torch.randint(0, 256, (2, 8))
    program = mc.compile(model, mc.Plan(mode="train", capacity_factor=1.0), (ids,))
    program(ids)
    assert set(program.dropped_fraction()) == {"layers.0.ffn", "layers.1.ffn"}


def test_generate_without_a_ring_names_the_plan_field():
    model = mc.models.build("tiny-moe", n_layers=1)
    program = mc.compile(model, mc.Plan(mode="infer"), (torch.randint(0, 256, (1, 8)),))
    assert not hasattr(program, "generate")
    with pytest.raises(AttributeError, match="device_budget"):
        program.generate(torch.randint(0, 256, (1, 4)), 2)


def test_checkpoint_and_storage_errors_are_exported():
    from moesys_compile.runtime.checkpoint import CheckpointError
    from moesys_compile.runtime.storage import StorageError
    assert mc.CheckpointError is CheckpointError and mc.StorageError is StorageError
