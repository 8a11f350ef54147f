import torch

import moesys_compile as mc
from moesys_compile.analysis import contiguous_partitions, critical_path, layers, to_networkx


def _graph(n_layers=3):
    model = mc.models.build("tiny-moe", n_layers=n_layers)
    return to_networkx(mc.trace(model, (torch.randint(0, 256, (2, 8)),)))


def test_layers_group_nodes_in_order():
    grouped = layers(_graph())
    assert set(grouped) == {None, 0, 1, 2}
    assert all(name.startswith(("layers_0", "getattr", "getitem", "view", "permute", "float", "chunk", "mul",
                                "sub", "add", "cat", "to", "scaled", "transpose", "reshape", "route",
                                "moe_experts", "load_balancing", "l"))
               for name in grouped[0])


def test_critical_path_runs_input_to_output_and_counts_flops():
    graph = _graph(2)
    path, flops = critical_path(graph, batch=2, seq=8)
    assert path[0] == "ids_bs" and path[-1] == "output"
    assert "lm_head" in path and any("moe_experts" in name for name in path)
    head_flops = graph.nodes["lm_head"]["cost"].evaluate(2, 8)["flops"]
    assert flops > head_flops


def test_contiguous_partitions_respect_budget_and_layer_boundaries():
    graph = _graph(4)
    size = lambda data: data["cost"].evaluate(1, 1)["param_bytes"]
    layer_bytes = sum(size(graph.nodes[n]) for n in layers(graph)[1])
    groups = contiguous_partitions(graph, size, budget=2 * layer_bytes)
    order = [n for g in groups for n in g]
    assert order == sorted(graph.nodes, key=lambda n: graph.nodes[n]["order"])
    for group in groups:
        assert sum(size(graph.nodes[n]) for n in group) <= 2 * layer_bytes or len({graph.nodes[n]["layer"] for n in group}) == 1
