import pytest
import torch

import moesys_compile as mc
from moesys_compile import PlanError, Plan
from moesys_compile.plan import parse_bytes


def test_defaults_and_derived_fields():
    plan = Plan(mode="train", world_size=4, expert_parallel=2)
    assert plan.data_parallel == 2 and plan.capacity_factor is None and plan.device == "cpu"


def test_dtype_given_as_a_torch_dtype():
    plan = Plan(mode="infer", dtype=torch.bfloat16)
    assert plan.dtype == "bfloat16" and plan.torch_dtype is torch.bfloat16 and plan.to_dict()["dtype"] == "bfloat16"
    with pytest.raises(PlanError, match="dtype \\('int8'\\) must be one of"):
        Plan(dtype=torch.int8)


@pytest.mark.parametrize("text,value", [("512MiB", 512 * 2**20), ("2GB", 2 * 10**9), ("1.5 GiB", int(1.5 * 2**30)),
                                        (4096, 4096), ("100", 100)])
def test_budget_parsing(text, value):
    assert parse_bytes(text) == value
    assert Plan(mode="infer", device_budget=text).device_budget == value


@pytest.mark.parametrize("kwargs,message", [
    (dict(world_size=3, expert_parallel=2), "world_size (3) is not divisible by expert_parallel (2)"),
    (dict(mode="serve"), "mode ('serve') must be one of"),
    (dict(device_budget="lots"), "device_budget ('lots') is not a size"),
    (dict(device_budget=-1), "device_budget (-1) must be positive"),
    (dict(capacity_factor=-1), "capacity_factor (-1) must be a finite number > 0"),
    (dict(capacity_factor=float("inf")), "capacity_factor (inf) must be a finite number > 0"),
    (dict(bucket_mb=float("nan")), "bucket_mb (nan) must be a finite number > 0"),
    (dict(weights="tape"), "weights ('tape') must be one of"),
    (dict(ep_exchange="rows"), "ep_exchange ('rows') must be one of 'token', 'slot'"),
    (dict(world_size=0), "world_size (0) must be a positive integer"),
    (dict(device="tpu"), "device ('tpu')"),
    (dict(mode="infer", weights="disk"), "offload_dir is not set"),
    (dict(ring_slots=1), "ring_slots (1) must be >= 2"),
])
def test_invalid_plans_name_field_and_numbers(kwargs, message):
    with pytest.raises(PlanError) as info:
        Plan(**kwargs)
    assert message in str(info.value)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_file_round_trip(tmp_path, suffix):
    plan = Plan(mode="infer", world_size=2, expert_parallel=2, capacity_factor=1.25, device_budget="64MiB",
                weights="disk", offload_dir="/tmp/w", disable_passes=("fuse_comm",), options={"seed": 3})
    path = tmp_path / f"plan{suffix}"
    plan.to_file(path)
    assert Plan.from_file(path) == plan


def test_unknown_field_in_file_is_named(tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text("mode: train\nexpert_paralel: 2\n")
    with pytest.raises(PlanError, match="expert_paralel"):
        Plan.from_file(path)


def test_plan_checked_against_model_before_any_process_group():
    model = mc.models.build("tiny-moe", n_layers=2, num_experts=6)
    ids = torch.randint(0, 256, (2, 8))
    with pytest.raises(PlanError) as info:
        mc.compile(model, Plan(mode="train", world_size=4, expert_parallel=4), example_inputs=(ids,))
    assert "layers.0.ffn.num_experts (6) is not divisible by expert_parallel (4)" in str(info.value)
    assert not torch.distributed.is_initialized()


def test_expert_parallel_on_a_dense_model_is_an_error():
    model = mc.models.build("tiny-gpt")
    with pytest.raises(PlanError, match="has no MoE layers"):
        mc.compile(model, Plan(world_size=2, expert_parallel=2), example_inputs=(torch.zeros(1, 4, dtype=torch.long),))
