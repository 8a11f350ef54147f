"""What ring_partition and fuse_comm say about themselves: slots never beyond the sections, the
minimum budget, the budget equation, the gradient buckets; and what --list-passes shows."""

import re

import pytest
import torch

import moesys_compile as mc
from moesys_compile.cli import list_passes
from moesys_compile.passes import PIPELINES

torch.set_num_threads(1)


def tiny(n_layers=1):
    torch.manual_seed(0)
    return mc.models.build("tiny-moe", n_layers=n_layers).eval(), torch.randint(0, 256, (2, 16))


def budget_line(notes):
    (line,) = [n for n in notes if n.startswith("budget ")]
    return line


def minimum_in(line):
    return int(re.search(r"minimum budget (\d+) B", line).group(1))


def test_a_generous_budget_is_a_cap_not_an_allocation():
    model, ids = tiny()
    program = mc.compile(model, mc.Plan(mode="infer", device_budget="100MiB"), example_inputs=(ids,))
    with torch.no_grad():
        torch.testing.assert_close(program(ids), model(ids))
    layout = program.forward_graph[1].extras["ring"]
    assert layout.slots == len(layout.sections) == 1           # one section: one slot, never four
    assert layout.slot_bytes == layout.state_bytes             # the slot is as large as the model, not the budget
    assert program.forward_runtime().pool.nbytes == layout.slot_bytes
    assert program.stats["peak_device_bytes"] < layout.state_bytes + 2 * layout.workspace < layout.budget // 100


def test_plan_ring_slots_beyond_the_sections_is_clamped_with_a_note():
    model, ids = tiny()
    gm, ctx = mc.lower(model, mc.Plan(mode="infer", device_budget="100MiB", ring_slots=3), (ids,))
    layout = ctx.extras["ring"]
    assert layout.slots == len(layout.sections) == 1
    assert any("ring_slots=3 but only 1 section(s): 1 slot(s)" in n for n in ctx.notes["ring_partition"])


def test_the_minimum_budget_note_is_the_smallest_budget_that_compiles():
    model, ids = tiny()
    gm, ctx = mc.lower(model, mc.Plan(mode="infer", device_budget=10**6), (ids,))
    assert ctx.extras["ring"].slots > 2                 # the budget chose more slots than the minimum needs
    minimum = minimum_in(budget_line(ctx.notes["ring_partition"]))
    assert ctx.extras["ring"].min_budget == minimum
    program = mc.compile(model, mc.Plan(mode="infer", device_budget=minimum), example_inputs=(ids,))
    with torch.no_grad():
        torch.testing.assert_close(program(ids), model(ids))
    with pytest.raises(mc.PlanError, match=f"below the minimum {minimum} bytes"):
        mc.lower(model, mc.Plan(mode="infer", device_budget=minimum - 1), (ids,))


@pytest.mark.parametrize("n_layers, budget, spare", [(2, "300KiB", "partial sums"),   # expert groups
                                                     (1, "100MiB", "B (unused)")])
def test_the_budget_equation_adds_up(n_layers, budget, spare):
    model, ids = tiny(n_layers)
    gm, ctx = mc.lower(model, mc.Plan(mode="infer", device_budget=budget), (ids,))
    layout = ctx.extras["ring"]
    line = budget_line(ctx.notes["ring_partition"])
    stated, equation = re.match(r"budget (\d+) B \([^)]*\) = (.*); minimum", line).groups()
    terms = [int(t) for t in re.findall(r"(?:^| \+ )(\d+) B \(", equation)]
    assert len(terms) == len(layout.budget_terms()) >= 3
    assert sum(terms) == int(stated) == layout.budget
    assert f"{layout.slots} slots x {layout.slot_bytes} B" in equation and spare in equation


def bucket_lowering(n_layers):
    model, ids = tiny(n_layers)
    plan = mc.Plan(mode="train", world_size=2, expert_parallel=2, bucket_mb=0.01)
    return mc.lower(model, plan, (ids,), rank=0)


def test_the_bucket_note_says_buckets_close_at_the_cap_in_mib_and_the_largest():
    gm, ctx = bucket_lowering(2)
    buckets = ctx.extras["grad_buckets"]
    cap = int(0.01 * 2**20)
    assert max(b.nbytes for b in buckets) > cap          # a bucket closes once it reaches the cap: it can pass it
    (line,) = [n for n in ctx.notes["fuse_comm"] if "bucket(s)" in n]
    largest = mc.plan.format_bytes(max(b.nbytes for b in buckets))
    assert line == (f"{len(buckets)} bucket(s), each closed once it reaches bucket_mb=0.01 MiB ({cap} B), "
                    f"the largest {largest}; launched in backward order")


def test_a_pass_that_only_annotates_the_graph_is_a_change():
    gm, ctx = bucket_lowering(1)              # one MoE layer: no losses to fuse, only bucket metadata
    snapshot = next(s for s in ctx.snapshots if s.stage == "fuse_comm")
    previous = ctx.snapshots[ctx.snapshots.index(snapshot) - 1]
    assert [r.name for r in snapshot.nodes] == [r.name for r in previous.nodes]
    assert any("bucket" in r.extra for r in snapshot.nodes) and snapshot.changed


def test_list_passes_shows_whole_sentences():
    text = list_passes(None)
    rows = [row for row in text.splitlines() if row.startswith("    ")]
    assert len(rows) == sum(len(passes) for passes in PIPELINES.values())
    for row in rows:
        assert row.rstrip().endswith("."), row
