"""ring_partition / schedule_prefetch: structure of the cut, the budget arithmetic, the errors."""

import pytest
import torch

import moesys_compile as mc
from moesys_compile.infer import model_bytes
from moesys_compile.ir import is_op
from moesys_compile.passes.ring_partition import RingLayout


def lowered(name="tiny-moe", n_layers=8, fraction=8, **plan):
    torch.manual_seed(0)
    model = mc.models.build(name, n_layers=n_layers).eval()
    ids = torch.randint(0, 256, (2, 8))
    budget = plan.pop("device_budget", None) or model_bytes(model) // fraction
    gm, ctx = mc.lower(model, mc.Plan(mode="infer", device_budget=budget, **plan), (ids,))
    return model, gm, ctx


def test_sections_cover_the_graph_in_order_and_fit_their_slots():
    _, gm, ctx = lowered()
    layout: RingLayout = ctx.extras["ring"]
    sections = [n.meta["moesys"]["section"] for n in gm.graph.nodes if n.op != "output"]
    assert sections == sorted(sections)                        # contiguous regions, graph order
    assert set(sections) == set(range(len(layout.sections)))
    assert len(layout.sections) > layout.slots                  # 1/8 of the model: the ring rotates
    assert len(layout.sections) % layout.slots == 0              # no slot is used twice in a row across calls
    for section in layout.sections:
        assert section.slot == section.index % layout.slots
        assert 0 < section.nbytes <= layout.slot_bytes
    assert layout.slots * layout.slot_bytes + layout.workspace <= layout.budget
    assert sum(len(s.state) for s in layout.sections) >= len(list(ctx.model.parameters()))


def test_weight_reads_stay_in_the_section_of_their_users():
    _, gm, _ = lowered()
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            assert {u.meta["moesys"]["section"] for u in node.users} == {node.meta["moesys"]["section"]}


def test_layer_granularity_when_layers_fit():
    _, gm, ctx = lowered(fraction=2, ring_slots=2)
    layout = ctx.extras["ring"]
    # every layer fits a slot at half the model: no layer is split across sections
    for layer in range(8):
        owners = {n.meta["moesys"]["section"] for n in gm.graph.nodes if n.meta.get("moesys", {}).get("layer") == layer}
        assert len(owners) == 1, f"layer {layer} split over sections {owners}"
    assert any(len([l for l in s.layers if l is not None]) > 1 for s in layout.sections)  # small layers share


def test_inspect_notes_show_sections_bytes_and_slots():
    _, _, ctx = lowered()
    layout = ctx.extras["ring"]
    notes = ctx.notes["ring_partition"]
    assert any(f"{layout.slots} slots x {layout.slot_bytes} B" in line for line in notes)
    for section in layout.sections:
        assert any(line.startswith(f"section {section.index:>3}  slot {section.slot}  {section.nbytes:>12} B")
                   for line in notes)



def test_each_load_waits_for_the_previous_occupant_of_its_slot():
    _, _, ctx = lowered(n_layers=7, fraction=6, ring_slots=3)
    layout = ctx.extras["ring"]
    count = len(layout.sections)
    for step in layout.schedule:
        assert layout.sections[step.after].slot == step.slot
        between = [(step.after + k) % count for k in range(1, (step.section - step.after) % count)]
        assert all(layout.sections[i].slot != step.slot for i in between)


def test_budget_below_minimum_states_the_minimum_in_bytes():
    model = mc.models.build("tiny-moe", n_layers=8)
    ids = torch.randint(0, 256, (2, 8))
    with pytest.raises(mc.PlanError, match=r"below the minimum (\d+) bytes") as info:
        mc.lower(model, mc.Plan(mode="infer", device_budget=model_bytes(model) // 64), (ids,))
    minimum = int(__import__("re").search(r"minimum (\d+) bytes", str(info.value)).group(1))
    gm, ctx = mc.lower(model, mc.Plan(mode="infer", device_budget=minimum), (ids,))   # the minimum is enough
    assert ctx.extras["ring"].min_budget == minimum
    with pytest.raises(mc.PlanError, match=f"minimum {minimum} bytes"):
        mc.lower(model, mc.Plan(mode="infer", device_budget=minimum - 1), (ids,))


def test_plan_ring_slots_is_the_ring_depth():
    _, _, ctx = lowered(fraction=2, ring_slots=3)
    assert ctx.extras["ring"].slots == 3
    assert {s.slot for s in ctx.extras["ring"].sections} == {0, 1, 2}


def test_works_on_the_canonical_op_without_decompose_moe():
    model, gm, ctx = lowered(n_layers=16, disable_passes=("decompose_moe",))   # the fused op cannot be split
    partitioned = next(s for s in ctx.snapshots if s.stage == "ring_partition")
    assert sum(r.target == "moesys.moe_experts" for r in partitioned.nodes) == 16
    fused = [n for n in gm.graph.nodes if is_op(n, "fused_experts", namespace="moesys_kernels")]
    assert len(fused) == 16 and not any(is_op(n, "moe_experts") for n in gm.graph.nodes)
    for node in fused:   # the kernel reads its weights in its own section
        weights = [a for a in node.all_input_nodes if a.op == "get_attr"]
        assert len(weights) == 2 and {w.meta["moesys"]["section"] for w in weights} == {node.meta["moesys"]["section"]}
    assert ctx.extras["ring"].sections


def test_ring_graph_runs_the_lowered_kernels():
    model, gm, ctx = lowered(fraction=2, ring_slots=2, kernels="torch")
    assert ctx.passes_run == ["decompose_moe", "ring_partition", "lower_kernels", "schedule_prefetch"]
    assert not any(is_op(n, "route", "permute", "grouped_mlp", "unpermute", "load_balancing_loss")
                   for n in gm.graph.nodes)
    labels = [n.meta["moesys"]["lowered_to"] for n in gm.graph.nodes if "lowered_to" in n.meta["moesys"]]
    assert labels.count("torch:moe_fused") == 8                 # every layer fits a slot: all are fused
    assert all(label.startswith("torch:") for label in labels)
    layout = ctx.extras["ring"]                                 # schedule_prefetch sees the lowered nodes
    assert [name for s in layout.sections for name in s.nodes] == [n.name for n in gm.graph.nodes if n.op != "output"]
    assert all(n.meta["moesys"]["slot"] == n.meta["moesys"]["section"] % layout.slots
               for n in gm.graph.nodes if n.op != "output")
    ids = torch.randint(0, 256, (2, 8))
    with torch.inference_mode():
        torch.testing.assert_close(gm(ids)[0], model(ids), atol=1e-5, rtol=1e-5)


def test_no_budget_means_no_ring():
    model = mc.models.build("tiny-gpt")
    gm, ctx = mc.lower(model, mc.Plan(mode="infer"), (torch.randint(0, 256, (1, 4)),))
    assert "ring" not in ctx.extras
    assert not isinstance(mc.compile(model, mc.Plan(mode="infer"), (torch.randint(0, 256, (1, 4)),)),
                          __import__("moesys_compile.programs.ring", fromlist=["RingProgram"]).RingProgram)


def test_experts_too_large_for_a_slot_run_as_expert_groups():
    torch.manual_seed(0)
    model = mc.models.build("tiny-moe").eval()                     # 2 layers: a quarter < one layer's experts
    ids = torch.randint(0, 256, (1, 8))
    gm, ctx = mc.lower(model, mc.Plan(mode="infer", device_budget=model_bytes(model) // 4), (ids,))
    groups = [n for n in gm.graph.nodes if is_op(n, "expert_group_mlp", namespace="moesys_ring")]
    assert not any(is_op(n, "grouped_mlp") for n in gm.graph.nodes)
    kernels = [n for n in gm.graph.nodes if "lowered_to" in n.meta["moesys"]]   # split experts cannot be fused
    assert {n.meta["moesys"]["lowered_to"] for n in kernels} == {"torch:route", "torch:permute", "torch:unpermute",
                                                                "torch:balance_loss", "torch:expert_group_mlp"}
    assert all(n.args[6] == "torch" and n.meta["moesys"]["scratch_bytes"] != 0 for n in groups)
    layout = ctx.extras["ring"]
    assert len(layout.slices) == 2 * len(groups)                   # an up and a down slice per group
    covered = {}
    for node in groups:
        (up, lo, hi), (down, lo2, hi2) = [layout.slices[a.target] for a in node.args[2:4]]
        assert node.args[4] == lo == lo2 and hi == hi2 and up.endswith("w_up") and down.endswith("w_down")
        covered.setdefault(up, []).append((lo, hi))
        assert sum(layout.sections[node.meta["moesys"]["section"]].state.values()) <= layout.slot_bytes
    assert len(covered) == 2                                       # both layers were split
    for ranges in covered.values():                                # the groups partition the 4 experts
        assert len(ranges) > 1 and sorted(ranges)[0][0] == 0 and sorted(ranges)[-1][1] == 4
        assert all(a[1] == b[0] for a, b in zip(sorted(ranges), sorted(ranges)[1:]))
    # the rewrite keeps the function: run the lowered graph eagerly
    with torch.inference_mode():
        torch.testing.assert_close(gm(ids)[0], model(ids), atol=1e-6, rtol=0)


def test_a_budget_far_above_the_model_is_a_cap_not_an_allocation():
    """Slots as large as the sections, not as the budget: a 1 GiB budget for a model of a few
    hundred KiB holds a ring the size of the model."""
    model = mc.models.build("tiny-moe", n_layers=2)
    gm, ctx = mc.lower(model, mc.Plan(mode="infer", device_budget="1GiB"), (torch.randint(0, 256, (2, 8)),))
    layout: RingLayout = ctx.extras["ring"]
    largest = max(sum(section.state.values()) for section in layout.sections)
    assert layout.slot_bytes == largest <= model_bytes(model)
