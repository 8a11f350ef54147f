"""What the seventh new-user sweep found, each refused or fixed now:

- ``moesys-compile train --seed`` did not change the initial values of an ``hf:<family>`` model
  (always seed 0); ``moesys-compile infer`` of a built-in model without a checkpoint drew other
  weights, so other tokens, at every run.
- A plan file given as a directory was said not to exist, an empty one was named a ``NoneType``.
- ``Plan(device=torch.device(...))`` raised a bare TypeError from a regular expression, and a plan
  with ``pathlib.Path`` directories could not be written by ``to_file``.
- ``program.generate`` of an empty prompt (no tokens, or no prompts) failed with an IndexError
  inside decoding (a Hugging Face model's with an ``UntraceableModelError`` blaming its attention).
- A budget below the ring's minimum advised lowering ``Plan.ring_slots`` where the ring had its
  least, 2 slots, already.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

import moesys_compile as mc
from moesys_compile import infer, train


def test_train_seed_picks_the_initial_values_of_a_hugging_face_model():
    pytest.importorskip("transformers")
    from moesys_compile.models.hf import build_hf

    def first_embedding(seed, *overrides):
        args = train.parse_args(["--model", "hf:mixtral", "--seed", seed, "--override", "num_hidden_layers=1",
                                 *overrides])
        return train.build_model(args, mc.Plan(mode="train")).model.embed_tokens.weight.detach()

    seeded = first_embedding("3")
    assert torch.equal(seeded, build_hf("mixtral", 3, num_hidden_layers=1).model.embed_tokens.weight)
    assert not torch.equal(seeded, first_embedding("4"))
    assert torch.equal(first_embedding("4", "seed=3"), seeded)      # the override names the init


def test_infer_of_fresh_weights_decodes_the_same_tokens_at_every_run(tmp_path):
    tokens = []
    for run, weights in enumerate(("host", "disk")):
        torch.manual_seed(run)                           # whatever the caller's generator holds
        out = tmp_path / f"{weights}.json"
        argv = ["tiny-moe", "--config", "n_layers=1", "--budget", "300KB", "--weights", weights, "--prompt-ids",
                "1", "2", "3", "--max-new-tokens", "3", "--no-compare", "--json", str(out)]
        assert infer.main(argv) == 0
        tokens.append(json.loads(out.read_text())["tokens"])
    assert tokens[0] == tokens[1]


def test_a_plan_file_that_is_a_directory_or_empty_is_named_as_such(tmp_path):
    with pytest.raises(mc.PlanError, match="is a directory; give the YAML or JSON file"):
        mc.Plan.from_file(tmp_path)
    (tmp_path / "plan.yaml").write_text("")
    with pytest.raises(mc.PlanError, match="is empty"):
        mc.Plan.from_file(tmp_path / "plan.yaml")


def test_a_plan_takes_a_torch_device_and_paths_and_writes_them(tmp_path):
    assert mc.Plan(mode="train", device=torch.device("cuda", 1)).device == "cuda:1"
    with pytest.raises(mc.PlanError, match=r"device \(0\) must be 'cpu', 'cuda' or 'cuda:N'"):
        mc.Plan(mode="train", device=0)
    plan = mc.Plan(mode="infer", device=torch.device("cpu"), device_budget="1MiB", weights="disk",
                   offload_dir=tmp_path / "offload", weights_checkpoint=tmp_path)
    plan.to_file(tmp_path / "plan.yaml")
    assert mc.Plan.from_file(tmp_path / "plan.yaml") == plan
    assert (plan.device, plan.offload_dir, plan.weights_checkpoint) == ("cpu", str(tmp_path / "offload"), str(tmp_path))


@pytest.mark.parametrize("shape", [(2, 0), (0, 4)])
def test_generate_of_an_empty_prompt_is_refused_before_decoding(shape):
    model = mc.models.build("tiny-moe", n_layers=1, num_experts=4)
    ids = torch.randint(0, 256, (2, 4))
    program = mc.compile(model, mc.Plan(mode="infer", device="cpu", device_budget="300KB"), example_inputs=(ids,))
    with pytest.raises(ValueError, match=re.escape(f"at least one prompt of at least one token (got shape {shape})")):
        program.generate(torch.zeros(shape, dtype=torch.long), 2)
    assert program.generate(ids, 2).shape == (2, 6)


def test_a_budget_refusal_advises_fewer_slots_only_where_there_can_be_fewer():
    model = mc.models.build("tiny-moe", n_layers=1, num_experts=4)
    ids = torch.randint(0, 256, (2, 4))
    refusals = {}
    for slots in (None, 3):
        with pytest.raises(mc.PassError, match="below the minimum") as refused:
            mc.compile(model, mc.Plan(mode="infer", device="cpu", device_budget="1KiB", ring_slots=slots),
                       example_inputs=(ids,))
        refusals[slots] = str(refused.value)
    assert refusals[None].endswith("raise Plan.device_budget") and "2 slots x" in refusals[None]
    assert refusals[3].endswith("raise Plan.device_budget or lower Plan.ring_slots") and "3 slots x" in refusals[3]
