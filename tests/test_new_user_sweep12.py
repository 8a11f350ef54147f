"""A new user's models and habits: inputs in containers under torch.export, state dicts of
models holding tensors their forward never reads, checkpoint and model paths that are none,
training methods of infer programs, an infer program evaluating beside a training program, hooks
on a recognised block, and a parametrized module in the ring."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moesys_compile as mc

VOCAB, DIM = 64, 16


class Expert(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(DIM, 32)
        self.down = nn.Linear(32, DIM)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class LoopMoE(nn.Module):
    """A hand-written top-2 MoE over a ModuleList of experts."""

    def __init__(self, num_experts=4, top_k=2):
        super().__init__()
        self.gate = nn.Linear(DIM, num_experts, bias=False)
        self.experts = nn.ModuleList(Expert() for _ in range(num_experts))
        self.top_k = top_k

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, ids = self.gate(x).softmax(-1).topk(self.top_k, -1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(ids == e)
            out.index_add_(0, token, expert(x[token]) * weights[token, slot, None])
        return out.reshape(shape)


class BatchDictModel(nn.Module):
    """Takes its batch as one dict, and checks its length in Python (fx cannot trace that branch,
    torch.export can)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.moe = LoopMoE()
        self.head = nn.Linear(DIM, VOCAB)

    def hidden(self, ids):
        if ids.shape[1] > 32:
            raise ValueError("sequence too long")
        h = self.emb(ids)
        return h + self.moe(h)

    def forward(self, batch):
        return self.head(self.hidden(batch["input_ids"]))


class SummedInputsModel(BatchDictModel):
    def forward(self, *id_tensors):
        return self.head(sum(self.hidden(ids) for ids in id_tensors))


def ids_of(batch, seq, seed=0):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_inputs_inside_a_dict_or_star_args_keep_batch_and_sequence_symbolic_under_export():
    """torch.export kept only top-level tensor arguments symbolic: a batch dict or ``*args`` had
    the example's sizes fixed, so a train program refused every other batch size."""
    torch.manual_seed(0)
    model = BatchDictModel()
    program = mc.compile(model, mc.Plan(mode="train"), example_inputs=({"input_ids": ids_of(2, 8)},))
    assert program.context.capture == "export"
    batch = {"input_ids": ids_of(3, 5, seed=1)}
    torch.testing.assert_close(program(batch), model(batch), rtol=0, atol=0)

    torch.manual_seed(0)
    summed = SummedInputsModel()
    program = mc.compile(summed, mc.Plan(mode="train"), example_inputs=(ids_of(1, 1), ids_of(1, 1, seed=2)))
    first, second = ids_of(3, 5, seed=1), ids_of(3, 5, seed=3)
    torch.testing.assert_close(program(first, second), summed(first, second), rtol=0, atol=0)


class ModelWithUnreadTensors(nn.Module):
    """Its experts carry a persistent buffer the forward never reads, and it has a head the
    forward does not call (a classifier kept beside the LM head)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.moe = LoopMoE()
        for expert in self.moe.experts:
            expert.register_buffer("tokens_seen", torch.zeros(()))
        self.head = nn.Linear(DIM, VOCAB)
        self.classifier = nn.Linear(DIM, 3)

    def forward(self, ids):
        h = self.emb(ids)
        return self.head(h + self.moe(h))


def test_program_state_dict_holds_the_tensors_the_forward_never_reads():
    """The capture leaves out tensors the forward does not read, and program.state_dict() lost
    them: stripped of its prefix it did not load into the model (missing keys)."""
    torch.manual_seed(0)
    model = ModelWithUnreadTensors()
    program = mc.compile(model, mc.Plan(mode="train"), example_inputs=(ids_of(2, 8),))
    state = {k.removeprefix("graph_module."): v for k, v in program.state_dict().items()}
    assert set(state) == set(model.state_dict())
    fresh = ModelWithUnreadTensors()
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.classifier.weight, model.classifier.weight, rtol=0, atol=0)

    changed = program.state_dict()
    changed["graph_module.classifier.bias"] = torch.full((3,), 7.0)
    changed["graph_module.moe.experts.1.tokens_seen"] = torch.tensor(5.0)
    program.load_state_dict(changed)
    assert model.classifier.bias.tolist() == [7.0] * 3 and model.moe.experts[1].tokens_seen.item() == 5.0
    del changed["graph_module.classifier.weight"]
    missing = program.load_state_dict(changed, strict=False).missing_keys
    assert missing == ["graph_module.classifier.weight"]
    torch.testing.assert_close(model.classifier.weight, fresh.classifier.weight, rtol=0, atol=0)


def test_load_into_a_file_or_a_missing_path_says_which(tmp_path):
    """A state dict saved as one file (torch.save, a model.safetensors) given to load_into was told
    that its meta.json was missing and that an interrupted save leaves '.NAME.tmp-*' beside it."""
    model = BatchDictModel()
    torch.save(model.state_dict(), tmp_path / "full.pt")
    with pytest.raises(mc.CheckpointError, match=r"full.pt' is a file, and a checkpoint is a directory.*"
                                                 r"model.load_state_dict\(torch.load\(PATH\)\)"):
        mc.load_into(BatchDictModel(), str(tmp_path / "full.pt"))
    with pytest.raises(mc.CheckpointError, match=r"no complete checkpoint at '.*nothere': no such directory$"):
        mc.load_into(BatchDictModel(), str(tmp_path / "nothere"))


def test_a_model_path_that_is_a_file_or_missing_is_named_as_such(tmp_path):
    """MODEL on the command line: a mistyped directory or a weights file was an 'unknown MODEL'
    told to use a built-in name."""
    from moesys_compile.models.spec import load_model
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"config.json' is a file; give the Hugging Face directory .*\("
                                         + str(tmp_path)):
        load_model(str(tmp_path / "config.json"))
    with pytest.raises(ValueError, match=r"^MODEL '.*nothere': no such directory$"):
        load_model(str(tmp_path / "nothere"))


@pytest.mark.parametrize("budget", [None, "1MiB"])
def test_training_methods_of_an_infer_program_say_what_to_do_instead(budget):
    """program.save, load, full_state_dict, ... of an infer program were bare AttributeErrors."""
    program = mc.compile(BatchDictModel().eval(), mc.Plan(mode="infer", device_budget=budget),
                         example_inputs=({"input_ids": ids_of(2, 8)},))
    with pytest.raises(AttributeError, match=r"\.save: only a program compiled with mode='train' has save; save the "
                                             r"model itself \(model.save_pretrained"):
        program.save("ckpt")
    with pytest.raises(AttributeError, match=r"has load; load the weights into the model \(mc.load_into"):
        program.load("ckpt")
    with pytest.raises(AttributeError, match="has clip_grad_norm_; to train, compile with Plan"):
        program.clip_grad_norm_(1.0)
    assert not hasattr(program, "no_such_method")


class ScaledBatchModel(BatchDictModel):
    """Reads two tensors of its batch dict."""

    def forward(self, batch):
        ids = batch["input_ids"]
        if ids.shape[1] > 32:
            raise ValueError("sequence too long")
        h = self.emb(ids) * batch["scale"][..., None]
        return self.head(h + self.moe(h))


@pytest.mark.parametrize("budget", [None, "1MiB"])
def test_a_batch_dict_is_bound_by_its_keys_not_their_order(budget):
    """torch.export takes a dict's tensors in the example's key order: a call whose dict had the
    same keys in another order handed 'scale' to the embedding, and one with another key failed
    inside the graph ('forward() takes 2 positional arguments but 3 were given')."""
    torch.manual_seed(0)
    model = ScaledBatchModel().eval()
    plan = mc.Plan(mode="train" if budget is None else "infer", device_budget=budget)
    program = mc.compile(model, plan, example_inputs=({"input_ids": ids_of(2, 8), "scale": torch.rand(2, 8)},))
    assert program.context.capture == "export"
    ids, scale = ids_of(3, 5, seed=1), torch.rand(3, 5)
    want = model({"input_ids": ids, "scale": scale})
    torch.testing.assert_close(program({"scale": scale, "input_ids": ids}), want, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"batch has the keys \['input_ids', 'scale', 'labels'\], but the "
                                         r"example's were \['(input_ids|scale)', '(input_ids|scale)'\]"):
        program({"input_ids": ids, "scale": scale, "labels": ids})


class DropoutModel(BatchDictModel):
    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.5)

    def forward(self, ids):
        h = self.emb(ids)
        return self.head(self.drop(h + self.moe(h)))


@pytest.mark.parametrize("budget", [None, "1MiB"])
def test_an_infer_program_stays_in_eval_mode_while_a_training_program_of_its_model_trains(budget):
    """Evaluating with an infer program between training steps: the training program's train()
    (or model.train()) turned on the model's nn.Dropout, which the infer program calls too, so
    its outputs dropped out at random."""
    torch.manual_seed(0)
    model = DropoutModel()
    ids = ids_of(2, 8)
    trainer = mc.compile(model, mc.Plan(mode="train"), example_inputs=(ids,))
    with pytest.warns(UserWarning, match="an infer program runs it in eval mode"):
        evaluator = mc.compile(model, mc.Plan(mode="infer", device_budget=budget), example_inputs=(ids,))
    want = model(ids)
    trainer.train()
    assert not torch.equal(trainer(ids), trainer(ids))      # the training program drops out
    torch.testing.assert_close(evaluator(ids), want, rtol=0, atol=0)
    torch.testing.assert_close(evaluator(ids), want, rtol=0, atol=0)
    assert model.drop.training                              # left as the training program set it


class KeywordOnlyModel(BatchDictModel):
    config = type("Config", (), {"vocab_size": VOCAB})()

    def forward(self, *, input_ids):
        return self.head(self.hidden(input_ids))


def make_keyword_only_model():
    return KeywordOnlyModel()


def test_a_factory_model_whose_forward_takes_keywords_only_is_named_for_the_command_line():
    """The command line passes the token ids positionally: a forward(self, *, input_ids) failed
    'when run eagerly too', told to check the config's head size and rotary embeddings."""
    from moesys_compile.models.spec import load_model
    with pytest.raises(ValueError, match=r"KeywordOnlyModel.forward\(\*, input_ids\) takes no positional argument, "
                                         r"and the command line passes the token ids as its first one"):
        load_model(f"{__name__}:make_keyword_only_model")


def test_hooks_on_a_recognised_block_stay_on_the_model_and_the_capture_says_they_do_not_run_per_call():
    """A logging hook on an MoE block was dropped with the block when canonicalize swapped it (the
    model's own calls no longer ran it), and the program never ran it, without a word."""
    torch.manual_seed(0)
    model = BatchDictModel()
    seen = []
    handle = model.moe.register_forward_hook(lambda module, inputs, output: seen.append(tuple(output.shape)))
    ids = ids_of(2, 8)
    with pytest.warns(UserWarning, match=r"the hook\(s\) \['.*<lambda>'\] on 'moe' of BatchDictModel do not run "
                                         r"at the program's calls"):
        program = mc.compile(model, mc.Plan(mode="train"), example_inputs=({"input_ids": ids},))
    assert [r.action for r in program.context.blocks] == ["replaced"]
    seen.clear()
    model.hidden(ids)
    assert seen == [(2, 8, DIM)]
    handle.remove()
    model.hidden(ids)
    assert seen == [(2, 8, DIM)]


def test_a_parametrized_module_runs_through_the_ring():
    """A head under torch's weight_norm parametrization stopped the ring's first call: its
    sections copied the module with copy.copy, which a parametrized module refuses."""
    from torch.nn.utils.parametrizations import weight_norm
    torch.manual_seed(0)
    model = DropoutModel()            # fx keeps the head as one call
    model.head = weight_norm(model.head)
    model.eval()
    program = mc.compile(model, mc.Plan(mode="infer", device_budget="1MiB"), example_inputs=(ids_of(2, 8),))
    assert program.context.capture == "fx"
    ids = ids_of(3, 5, seed=1)
    torch.testing.assert_close(program(ids), model(ids), rtol=0, atol=0)
