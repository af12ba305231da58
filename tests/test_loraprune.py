"""``loraprune`` (structured pruning of heads and FFN channels with a LoRA-gradient criterion
and LoRA recovery) and ``train.recipe.training_context`` (the training recipe as a model
step's ``loss_fn``/``batches``). Tiny random BERTs (3 layers, 4 heads, 64-d) with MiniLM's
tokenizer and adi pairs: a few optimizer steps, seconds on any CPU."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from retrieval_prune import registry
from retrieval_prune.preprocess.base import ModelContext
from retrieval_prune.preprocess.model.loraprune import (
    LoRAPrune,
    cubic_share,
    prune_structures,
    removed_count,
)
from tests.conftest import tiny_colbert

STEPS = 3


def tiny(seed=0, layers=3, heads=4, hidden=64, ffn=128, dim=32):
    return tiny_colbert(seed=seed, dim=dim, layers=layers, heads=heads, hidden=hidden, ffn=ffn)


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def copy_model(model):
    tok, model.tokenizer = model.tokenizer, None
    out = copy.deepcopy(model)
    model.tokenizer = out.tokenizer = tok
    return out


@pytest.fixture(scope="module")
def adi_pairs():
    from retrieval_prune.train.data import load_pairs

    return load_pairs("adi", split="test", allow_eval_split=True, negatives="none", max_queries=8)


@pytest.fixture(scope="module")
def model():
    return tiny()


@pytest.fixture(scope="module")
def ctx(model, adi_pairs):
    from retrieval_prune.train.recipe import training_context

    loss_fn, batches = training_context(model, ["adi"], steps=STEPS, batch_size=4,
                                        pairs=[adi_pairs], progress=False)
    return ModelContext(loss_fn=loss_fn, batches=batches, steps=STEPS, progress=False)


@pytest.fixture(scope="module")
def probe(model, adi_pairs):
    """A query batch and a document batch of adi, tokenized the ColBERT way."""
    from retrieval_prune.encode.checkpoint import colbert_spec
    from retrieval_prune.encode.model import TextTokenizer, collate

    tt = TextTokenizer(model.tokenizer, colbert_spec(doc_maxlen=64))
    q = tt.queries(adi_pairs.query_texts[:6])
    d = tt.documents(adi_pairs.doc_texts[:6])
    return [collate(q, range(6), tt.pad_id), collate(d, range(6), tt.pad_id)]


def vectors(model, batches):
    model.eval()
    with torch.no_grad():
        return [model(b.input_ids, b.attention_mask, b.vector_mask).vectors for b in batches]


@pytest.fixture(scope="module")
def pruned(model, ctx):
    """(input state before, result) of the default method at ratio 0.3."""
    before = state(model)
    return before, registry.build("loraprune:ratio=0.3").apply(model, ctx)


# -- spec, rounding, schedule --------------------------------------------------------------
def test_spec_round_trip():
    step = registry.build("loraprune")
    assert isinstance(step, LoRAPrune) and step.stage == "model" and step.needs_training
    assert step.spec == ("loraprune:ratio=0.3,rank=8,alpha=16.0,steps=0,lr=0.0003,beta=0.9,"
                         "keep_last=true,mode=lora,seed=0,distill=0.0")
    for spec in ("loraprune:ratio=0.5,mode=random,seed=3", "loraprune:mode=scratch,steps=7",
                 "loraprune:distill=0.5",
                 "loraprune:ratio=0,lr=0,keep_last=false,rank=4,alpha=8"):
        s = registry.build(spec)
        assert registry.build(s.spec).spec == s.spec
    for bad in ("loraprune:ratio=0.95", "loraprune:mode=magnitude", "loraprune:rank=0",
                "loraprune:steps=-1", "loraprune:nope=1", "loraprune:distill=1.5"):
        with pytest.raises(ValueError):
            registry.build(bad)


@pytest.mark.parametrize("ratio, n, want", [
    (0.3, 5, 2),      # 1.5 rounds half up
    (0.25, 2, 1),     # 0.5 rounds half up
    (0.3, 4, 1),      # 1.2
    (0.375, 4, 2),    # 1.5
    (0.1, 4, 0),      # 0.4
    (0.7, 10, 7),     # 7.000000000000001: float noise does not round up
    (0.3, 1536, 461),  # MiniLM's FFN: 460.8
    (0.3, 12, 4),     # MiniLM's heads: 3.6
    (0.0, 12, 0),
])
def test_removed_count_rounds_half_up(ratio, n, want):
    assert removed_count(ratio, n) == want


def test_cubic_schedule():
    assert cubic_share(0.3, 0, 4) == 0.0
    assert cubic_share(0.3, 4, 4) == 0.3 and cubic_share(0.3, 9, 4) == 0.3
    shares = [cubic_share(0.3, s, 6) for s in range(7)]
    assert all(a < b for a, b in zip(shares, shares[1:], strict=False))
    assert np.isclose(cubic_share(0.3, 3, 6), 0.3 * (1 - 0.5**3))


# -- the method ---------------------------------------------------------------------------
def test_exact_widths_last_layer_kept(pruned, model):
    _, res = pruned
    d = res.report.details
    # 4 heads: floor(1.2 + .5) = 1 removed; 128 channels: floor(38.4 + .5) = 38 removed
    assert d["heads_before"] == [4, 4, 4] and d["ffn_before"] == [128, 128, 128]
    assert d["heads_per_layer"] == [3, 3, 4]
    assert d["ffn_per_layer"] == [90, 90, 128]
    assert d["pruned_layers"] == [0, 1]
    layers = res.model.backbone.encoder.layer
    for i, (h, f) in enumerate(zip(d["heads_per_layer"], d["ffn_per_layer"], strict=True)):
        sa = layers[i].attention.self
        assert sa.num_attention_heads == h and sa.query.out_features == h * 16
        assert sa.key.out_features == sa.value.out_features == h * 16
        assert layers[i].attention.output.dense.in_features == h * 16
        assert layers[i].intermediate.dense.out_features == f
        assert layers[i].output.dense.in_features == f
        assert len(d["removed_heads"].get(str(i), [])) == 4 - h
        assert len(d["removed_ffn"].get(str(i), [])) == 128 - f
    # the last layer is untouched by pruning (its weights moved only by the merged LoRA)
    assert res.model.backbone.config.pruned_heads.keys() == {0, 1}
    # smaller: kept_fraction is parameters after / before, bytes dense
    n_before = sum(p.numel() for p in model.parameters())
    n_after = sum(p.numel() for p in res.model.parameters())
    assert res.report.kept_fraction == pytest.approx(n_after / n_before) and n_after < n_before
    assert res.report.bytes_after < res.report.bytes_before
    assert res.masks == {} and res.delta_of is None and res.report.stage == "model"
    assert res.report.step == registry.build("loraprune:ratio=0.3").spec
    assert d["steps"] == STEPS and d["prune_steps"] == 2
    assert len(d["losses"]) == STEPS and d["loss_first"] == d["losses"][0]
    # the cubic schedule reached the final counts at T_p and kept them
    assert [s[0] for s in d["schedule"]] == [1, 2]
    assert d["schedule"][-1][2:] == [2, 76]
    json.dumps(res.report.to_dict())  # the report is JSON-able


def test_keep_last_false_prunes_every_layer(model, ctx):
    d = registry.build("loraprune:ratio=0.375,keep_last=false,steps=2").apply(model, ctx)
    det = d.report.details
    assert det["heads_per_layer"] == [2, 2, 2]  # 1.5 -> 2 removed of 4
    assert det["ffn_per_layer"] == [80, 80, 80]  # 48 removed of 128
    assert det["steps"] == 2  # steps overrides context.steps


def test_input_not_mutated(pruned, model):
    before, res = pruned
    assert same_state(state(model), before)
    assert all(p.requires_grad for p in model.parameters())
    assert model.backbone.config.pruned_heads == {}
    assert all(la.attention.self.num_attention_heads == 4 for la in model.backbone.encoder.layer)
    assert all(p.requires_grad for p in res.model.parameters())
    assert not res.model.training


def test_identity_bit_for_bit(model, ctx):
    before = state(model)
    # no steps at all: context.steps = 0 and steps = 0
    zero = ModelContext(loss_fn=ctx.loss_fn, batches=ctx.batches, steps=0, progress=False)
    res = registry.build("loraprune:ratio=0,steps=0").apply(model, zero)
    assert same_state(state(res.model), before)
    assert res.report.details["steps"] == 0 and res.report.kept_fraction == 1.0
    # the registered identity setting: lr=0 keeps B at zero whatever the steps
    res = LoRAPrune(**LoRAPrune.identity_params).apply(model, ctx)
    assert same_state(state(res.model), before)
    assert res.report.details["steps"] == STEPS


def test_deterministic_under_seed(model, ctx, pruned):
    _, a = pruned
    b = registry.build("loraprune:ratio=0.3").apply(model, ctx)
    assert same_state(state(a.model), state(b.model))
    assert a.report.details["losses"] == b.report.details["losses"]
    c = registry.build("loraprune:ratio=0.3,seed=1").apply(model, ctx)
    assert not same_state(state(a.model), state(c.model))
    # the caller's global RNG is left as it was
    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    registry.build("loraprune:ratio=0.3,steps=1").apply(model, ctx)
    assert torch.equal(torch.rand(3), want)


def _expanded_masked(source, res):
    """The pruned model's weights put back at full width (removed rows/columns filled with
    garbage) plus output masks (hooks) on the removed heads' query/key/value rows and the
    removed FFN channels' pre-activations: the masked, unpruned equivalent."""
    full = copy_model(source)
    d = res.report.details
    src = res.model.state_dict()
    g = torch.Generator().manual_seed(99)
    hooks = []
    with torch.no_grad():
        for name, t in full.state_dict().items():
            if src[name].shape == t.shape:
                t.copy_(src[name])
            else:
                t.copy_(torch.randn(t.shape, generator=g))  # garbage where removed
        for i, layer in enumerate(full.backbone.encoder.layer):
            pre = f"backbone.encoder.layer.{i}."
            hd = layer.attention.self.attention_head_size
            nh = layer.attention.self.num_attention_heads
            gone_h = set(d["removed_heads"].get(str(i), []))
            rows = torch.tensor([h not in gone_h for h in range(nh)
                                 for _ in range(hd)])
            for part in ("query", "key", "value"):
                key = pre + f"attention.self.{part}"
                if src[key + ".weight"].shape[0] != rows.numel():
                    full.state_dict()[key + ".weight"][rows] = src[key + ".weight"]
                    full.state_dict()[key + ".bias"][rows] = src[key + ".bias"]
            key = pre + "attention.output.dense.weight"
            if src[key].shape[1] != rows.numel():
                full.state_dict()[key][:, rows] = src[key]
            nf = layer.intermediate.dense.out_features
            gone_f = set(d["removed_ffn"].get(str(i), []))
            ch = torch.tensor([j not in gone_f for j in range(nf)])
            key = pre + "intermediate.dense"
            if src[key + ".weight"].shape[0] != nf:
                full.state_dict()[key + ".weight"][ch] = src[key + ".weight"]
                full.state_dict()[key + ".bias"][ch] = src[key + ".bias"]
                full.state_dict()[pre + "output.dense.weight"][:, ch] = src[
                    pre + "output.dense.weight"]
            mask_rows, mask_ch = rows.float(), ch.float()
            for mod in (layer.attention.self.query, layer.attention.self.key,
                        layer.attention.self.value):
                hooks.append(mod.register_forward_hook(
                    lambda m, i, o, mk=mask_rows: o * mk))
            hooks.append(layer.intermediate.dense.register_forward_hook(
                lambda m, i, o, mk=mask_ch: o * mk))
    return full, hooks


def test_pruned_forward_equals_masked_forward(pruned, model, probe):
    _, res = pruned
    full, hooks = _expanded_masked(model, res)
    got = vectors(res.model, probe)
    want = vectors(full, probe)
    # float32 error of a forward pass: about eps times the inner sizes of the matrix products
    # it chains (q/k/v, scores, context, attention output, FFN in and out; per layer)
    cfg = model.backbone.config
    seq = max(b.input_ids.shape[1] for b in probe)
    inner = cfg.num_hidden_layers * (4 * cfg.hidden_size + 2 * (cfg.hidden_size // cfg.num_attention_heads)
                                     + seq + cfg.intermediate_size) + cfg.hidden_size
    tol = 4 * torch.finfo(torch.float32).eps * inner
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape
        assert float((a - b).abs().max()) <= tol
    for h in hooks:
        h.remove()
    # the masks matter: without them the garbage changes the vectors
    loose = vectors(full, probe)
    assert any(float((a - b).abs().max()) > 100 * tol for a, b in zip(got, loose, strict=True))


def test_prune_structures_maps_positions_of_a_pruned_backbone(model, probe):
    """Pruning twice: positions refer to the current heads; config records original ids."""
    m = copy_model(model)
    prune_structures(m, {0: [1]}, {0: [0, 5]})
    prune_structures(m, {0: [1]}, {0: [0]})  # current position 1 = original head 2
    assert sorted(m.backbone.config.pruned_heads[0]) == [1, 2]
    assert m.backbone.encoder.layer[0].attention.self.num_attention_heads == 2
    assert m.backbone.encoder.layer[0].intermediate.dense.out_features == 125
    with pytest.raises(ValueError, match="pruning would empty layer 0"):
        prune_structures(m, {0: [0, 1]}, {})


def test_save_load_ffn_only(tmp_path, model, ctx, probe):
    """FFN channels only (ratio 0.1 removes no head of 4): the checkpoint's ffn_sizes."""
    from retrieval_prune.encode.checkpoint import load_checkpoint, save_checkpoint

    res = registry.build("loraprune:ratio=0.1,steps=1").apply(model, ctx)
    assert res.report.details["heads_per_layer"] == [4, 4, 4]
    assert res.report.details["ffn_per_layer"] == [115, 115, 128]
    save_checkpoint(res.model, tmp_path / "c")
    back = load_checkpoint(tmp_path / "c").model
    assert same_state(state(back), state(res.model))
    for a, b in zip(vectors(back, probe), vectors(res.model, probe), strict=True):
        assert torch.equal(a, b)


def test_save_load_heads_and_ffn(tmp_path, pruned, probe):
    from retrieval_prune.encode.checkpoint import load_checkpoint, save_checkpoint

    _, res = pruned
    save_checkpoint(res.model, tmp_path / "c")
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    assert cfg["ffn_sizes"] == [90, 90, 128]
    assert {k: len(v) for k, v in cfg["backbone_config"]["pruned_heads"].items()} == {
        "0": 1, "1": 1}
    back = load_checkpoint(tmp_path / "c").model
    assert same_state(state(back), state(res.model))
    assert [la.attention.self.num_attention_heads for la in back.backbone.encoder.layer] == [
        3, 3, 4]
    for a, b in zip(vectors(back, probe), vectors(res.model, probe), strict=True):
        assert torch.equal(a, b)


def test_controls_same_widths(model, ctx, pruned):
    _, lora = pruned
    before = state(model)
    rnd = registry.build("loraprune:ratio=0.3,mode=random").apply(model, ctx)
    scr = registry.build("loraprune:ratio=0.3,mode=scratch").apply(model, ctx)
    assert same_state(state(model), before)
    for res in (rnd, scr):
        d = res.report.details
        for key in ("heads_per_layer", "ffn_per_layer", "steps"):
            assert d[key] == lora.report.details[key]
        assert {k: v.shape for k, v in res.model.state_dict().items()} == {
            k: v.shape for k, v in lora.model.state_dict().items()}
        assert res.report.kept_fraction == lora.report.kept_fraction
        assert len(d["losses"]) == STEPS
    # random picks other channels than the criterion (128 channels: a tie is ~impossible)
    assert rnd.report.details["removed_ffn"] != lora.report.details["removed_ffn"]
    # scratch re-initialises every weight: BERT's normal(0, initializer_range)
    w = scr.model.backbone.embeddings.word_embeddings.weight
    assert not torch.equal(w, model.backbone.embeddings.word_embeddings.weight)
    assert float(w.detach().std()) == pytest.approx(model.backbone.config.initializer_range, rel=0.05)
    # and is deterministic too
    again = registry.build("loraprune:ratio=0.3,mode=scratch").apply(model, ctx)
    assert same_state(state(again.model), state(scr.model))
    # random with no steps: the random choice at the final widths, no training
    zero = ModelContext(loss_fn=ctx.loss_fn, batches=ctx.batches, steps=0, progress=False)
    r0 = registry.build("loraprune:ratio=0.3,mode=random").apply(model, zero)
    assert r0.report.details["heads_per_layer"] == lora.report.details["heads_per_layer"]
    assert r0.report.details["losses"] == []


def test_error_when_ratio_would_empty_a_layer(ctx, adi_pairs):
    two_heads = tiny(layers=2, heads=2)
    # 0.75 of 2 heads = 1.5 -> 2 removed: the layer would have none
    with pytest.raises(ValueError, match="pruning would empty layer 0"):
        registry.build("loraprune:ratio=0.75").apply(two_heads, ctx)
    # keep_last: a one-layer model is not pruned at all
    one = tiny(layers=1, heads=2)
    res = registry.build("loraprune:ratio=0.9,steps=1").apply(one, ctx)
    assert res.report.details["heads_per_layer"] == [2]


def test_errors_without_training(model, ctx):
    step = registry.build("loraprune")
    with pytest.raises(ValueError, match="needs training pairs"):
        step.apply(model)
    with pytest.raises(ValueError, match="needs training pairs"):
        step.apply(model, ModelContext(loss_fn=ctx.loss_fn, progress=False))
    zero = ModelContext(loss_fn=ctx.loss_fn, batches=ctx.batches, steps=0, progress=False)
    with pytest.raises(ValueError, match="at least one training step"):
        step.apply(model, zero)
    bad = copy_model(model)
    with torch.no_grad():
        bad.projection.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        step.apply(bad, ctx)


def test_lora_gradients_estimate_the_merged_weight_gradient():
    """With B = 0: G_B = s·G_W·Aᵀ and G_A = 0, so the estimate is s·G_W·AᵀA and the score
    |W ⊙ s·G_W·AᵀA|; the wrapper's forward is W·x + s·B·A·x."""
    from retrieval_prune.preprocess.model.loraprune import _LoRALinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 5)
    ref = copy.deepcopy(lin)
    w = _LoRALinear(lin, 3, 2.0, torch.Generator().manual_seed(0))
    x = torch.randn(4, 6)
    target = torch.randn(4, 5)
    ((w(x) - target) ** 2).sum().backward()
    ((ref(x) - target) ** 2).sum().backward()
    gw = ref.weight.grad
    a = w.lora_A.detach()
    torch.testing.assert_close(w.lora_B.grad, 2.0 * gw @ a.T)
    torch.testing.assert_close(w.importance(), (lin.weight.detach() * (2.0 * gw @ a.T @ a)).abs())
    with torch.no_grad():
        w.lora_B.normal_()
    merged_out = w(x).detach()
    torch.testing.assert_close(w.merge()(x), merged_out)


# -- the recipe ---------------------------------------------------------------------------
def test_training_context_batches_replay(model, adi_pairs):
    from retrieval_prune.train.recipe import training_context

    loss_fn, batches = training_context(model, [], steps=4, batch_size=3, pairs=[adi_pairs],
                                        progress=False)
    first = [batches(s) for s in range(4)]
    again = [batches(s) for s in range(4)]  # replays from the start
    late = batches(2)
    for a, b in zip(first, again, strict=True):
        assert all(torch.equal(x.input_ids, y.input_ids) for x, y in zip(a[:2], b[:2],
                                                                         strict=True))
        assert torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])
    assert torch.equal(late[0].input_ids, first[2][0].input_ids)
    q, d, labels, exclude = first[0]
    assert q.input_ids.shape[0] == 3 and d.input_ids.shape[0] == 6  # positives + 1 negative
    assert labels.tolist() == [0, 1, 2] and exclude.shape == (3, 6)
    m = copy_model(model).train()
    loss = loss_fn(m, first[0])
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert m.projection.weight.grad is not None
    with pytest.raises(ValueError, match="steps"):
        training_context(model, [], steps=-1, pairs=[adi_pairs])
    with pytest.raises(ValueError, match="no training data"):
        training_context(model, [], steps=1)


def test_time_budget_stops_early_at_the_final_widths(model, ctx, pruned):
    """A deadline already passed: one step is taken, then the schedule jumps to the final
    widths (the same counts as the full run) and the report says it stopped early."""
    import time

    _, full = pruned
    late = ModelContext(loss_fn=ctx.loss_fn, batches=ctx.batches, steps=STEPS,
                        deadline=time.monotonic() - 1.0, progress=False)
    for mode in ("lora", "scratch"):
        res = registry.build(f"loraprune:ratio=0.3,mode={mode}").apply(model, late)
        d = res.report.details
        assert d["steps_taken"] == 1 and d["stopped_by_budget"] is True
        assert len(d["losses"]) == 1
        assert d["heads_per_layer"] == full.report.details["heads_per_layer"]
        assert d["ffn_per_layer"] == full.report.details["ffn_per_layer"]
    d = full.report.details
    assert d["steps_taken"] == STEPS and d["stopped_by_budget"] is False


def test_distill_kl_is_zero_on_itself_and_ignores_excluded_documents():
    from retrieval_prune.train.loop import distill_kl

    g = torch.Generator().manual_seed(0)
    t = torch.randn(5, 7, generator=g)
    s = torch.randn(5, 7, generator=g)
    assert float(distill_kl(t, t)) == pytest.approx(0.0, abs=1e-6)
    assert float(distill_kl(s, t)) > 0
    ex = torch.zeros(5, 7, dtype=torch.bool)
    ex[:, 3] = True  # an excluded (relevant) document: -inf for both
    tm, sm = t.masked_fill(ex, float("-inf")), s.masked_fill(ex, float("-inf"))
    got = distill_kl(sm, tm)
    keep = [i for i in range(7) if i != 3]
    want = distill_kl(s[:, keep], t[:, keep])
    assert torch.isfinite(got) and float(got) == pytest.approx(float(want), rel=1e-5)


def test_distillation_from_the_input_model(model, ctx, pruned):
    """distill > 0: the recipe loss mixes in KL to the unpruned input; same widths, the input
    untouched, deterministic, and the losses differ from the plain recipe's."""
    _, plain = pruned
    before = state(model)
    res = registry.build("loraprune:ratio=0.3,distill=0.5").apply(model, ctx)
    assert same_state(state(model), before) and model.training is False
    d = res.report.details
    assert d["heads_per_layer"] == plain.report.details["heads_per_layer"]
    assert d["ffn_per_layer"] == plain.report.details["ffn_per_layer"]
    assert all(np.isfinite(d["losses"])) and d["losses"] != plain.report.details["losses"]
    again = registry.build("loraprune:ratio=0.3,distill=0.5").apply(model, ctx)
    assert same_state(state(again.model), state(res.model))
    # a loss_fn that cannot distil is refused by name, not silently ignored
    bare = ModelContext(loss_fn=lambda m, b: ctx.loss_fn(m, b), batches=ctx.batches,
                        steps=STEPS, progress=False)
    with pytest.raises(TypeError, match="teacher"):
        registry.build("loraprune:ratio=0.3,distill=0.5").apply(model, bare)
