"""Training on cached lower-layer states (retrieval_prune.train.cached): the split forward
equals the model's own, the cache is exact and keyed by what it depends on, the frozen part
does not move, and a short curve runs both recipes. Tiny random BERT (synthetic weights)
with MiniLM's tokenizer; adi pairs for the loop (its test split, allowed for mechanics)."""

import numpy as np
import pytest
import torch

from retrieval_prune.encode.checkpoint import colbert_spec
from retrieval_prune.encode.model import TextTokenizer, collate
from retrieval_prune.evaluation.metrics import evaluate
from retrieval_prune.train.cached import (
    LayerCache,
    heldout_split,
    lower_forward,
    top_forward,
    train_curve,
)
from retrieval_prune.train.loop import TrainConfig
from tests.conftest import tiny_colbert

TEXTS = ["a short one", "a somewhat longer document about retrieval and pruning of indexes",
         "x", "multi vector late interaction with many many tokens in it " * 3]


def ndcg10(qrels, run) -> float:
    return evaluate(qrels, run, ("nDCG@10",))["ndcg@10"]


def _tok(model, maxlen=40):
    return TextTokenizer(model.tokenizer, colbert_spec(doc_maxlen=maxlen, query_maxlen=12))


def _tol(a: torch.Tensor) -> float:
    # float32 summation order differs between the padded batches: a few ulps of the values
    return 64 * float(torch.finfo(torch.float32).eps) * max(1.0, float(a.abs().max()))


@pytest.mark.parametrize("n_frozen", [1, 2])
def test_split_forward_equals_the_model_forward(n_frozen):
    model = tiny_colbert(layers=3)
    tok = _tok(model)
    for side in (tok.documents(TEXTS), tok.queries(TEXTS)):  # queries: [MASK] not attended
        b = collate(side, range(len(TEXTS)), tok.pad_id)
        with torch.no_grad():
            want = model(b.input_ids, b.attention_mask, b.vector_mask)
            h = lower_forward(model, n_frozen, b.input_ids, b.attention_mask)
            got, mask = top_forward(model, n_frozen, h, b.attention_mask, b.vector_mask)
        assert torch.equal(mask, want.mask)
        assert float((got - want.vectors).abs().max()) <= _tol(want.vectors)


def test_cache_holds_each_texts_own_states_and_is_keyed(tmp_path):
    model = tiny_colbert(layers=3)
    tok = _tok(model)
    d = tok.documents(TEXTS)
    cache = LayerCache(model, 2, d, folder=tmp_path, batch=2, progress=False)
    # every text alone (no padding at all) gives the rows the cache holds
    for i in range(len(TEXTS)):
        b = collate(d, [i], tok.pad_id)
        with torch.no_grad():
            alone = lower_forward(model, 2, b.input_ids, b.attention_mask)[0]
        rows = cache.states[cache.off[i] : cache.off[i + 1]]
        assert float((rows - alone).abs().max()) <= _tol(alone)
    # a batch through the cache = the split forward of the same batch
    h, am, vm = cache.batch([3, 0, 2])
    b = collate(d, [3, 0, 2], tok.pad_id)
    assert torch.equal(am, b.attention_mask) and torch.equal(vm, b.vector_mask)
    with torch.no_grad():
        v1, _ = top_forward(model, 2, h, am, vm)
        v2 = model(b.input_ids, b.attention_mask, b.vector_mask).vectors
    assert float((v1 - v2).abs().max()) <= _tol(v2)
    # reloaded from disk: the same array, no recomputation
    again = LayerCache(model, 2, d, folder=tmp_path, progress=False)
    assert again.seconds == 0.0 and torch.equal(again.states, cache.states)
    # a change of the frozen weights (or of the texts) is another key: never stale states
    with torch.no_grad():
        model.backbone.encoder.layer[0].output.dense.bias.add_(0.1)
    other = LayerCache(model, 2, d, folder=tmp_path, progress=False)
    assert other.key != cache.key and other.seconds > 0
    assert LayerCache(model, 2, tok.documents(TEXTS[:3]), progress=False).key != other.key
    with pytest.raises(ValueError, match="n_frozen"):
        LayerCache(model, 3, d, progress=False)
    with pytest.raises(ValueError, match="n_frozen"):
        LayerCache(model, 0, d, progress=False)


@pytest.fixture(scope="module")
def adi_pairs():
    from retrieval_prune.train.data import load_pairs

    return load_pairs("adi", split="test", allow_eval_split=True, negatives="none")


def test_heldout_split_is_disjoint_and_seeded(adi_pairs):
    tr, held = heldout_split(adi_pairs, 10, seed=3)
    assert len(held) == 10 and len(tr) == len(adi_pairs) - 10
    assert not set(tr.query_ids) & set(held.query_ids)
    assert heldout_split(adi_pairs, 10, seed=3)[1].query_ids == held.query_ids
    with pytest.raises(ValueError, match="heldout"):
        heldout_split(adi_pairs, len(adi_pairs))


@pytest.mark.parametrize("n_frozen,crisp", [(1, None), (1, "25%"), (0, None)])
def test_curve_trains_the_top_only_and_records_points(tmp_path, adi_pairs, n_frozen, crisp):
    model = tiny_colbert(layers=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tr, held = heldout_split(adi_pairs, 8, seed=0)
    cfg = TrainConfig(data=("adi",), crisp=crisp, max_steps=6, batch_size=4, negatives=1,
                      lr=1e-3, projection_lr=1e-2, warmup=0.0, doc_maxlen=64, seed=0,
                      threads=1, dim=32)
    model, points, info = train_curve(
        cfg, [tr], held, n_frozen=n_frozen, eval_steps=[0, 3, 6], metric=ndcg10,
        posthoc=["50%"] if crisp is None else [], cache_folder=tmp_path, distractors=20,
        model=model, progress=False, log=lambda s: None)
    assert [p.step for p in points] == [0, 3, 6] and info["steps"] == 6
    for p in points:
        assert np.isfinite(p.heldout_loss) and 0.0 <= p.ndcg["own"] <= 1.0
        if crisp is None:
            assert set(p.ndcg) == {"own", "C50 post-hoc"}
            assert p.vectors_per_doc["C50 post-hoc"] < p.vectors_per_doc["own"]
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert "projection.weight" in moved
    frozen = [n for n in before if (n.startswith("backbone.embeddings.") and n_frozen)
              or any(n.startswith(f"backbone.encoder.layer.{i}.") for i in range(n_frozen))]
    frozen.append("backbone.embeddings.word_embeddings.weight")  # frozen by the recipe too
    top = [n for n in before if n.startswith(f"backbone.encoder.layer.{n_frozen}.")]
    assert not moved & set(frozen)  # the cached part never changes
    assert set(top) & moved  # the trained part does
    assert info["seconds_per_step"] > 0
    if n_frozen:
        assert info["trainable_parameters"] < sum(p.numel() for p in model.parameters())


def test_crisp_long_report_flattening_markdown_and_plot(tmp_path):
    """The report of scripts/crisp_long.py on made-up rows (labelled synthetic)."""
    import importlib.util
    from pathlib import Path

    from retrieval_prune.evaluation.plot import training_curves_plot

    spec = importlib.util.spec_from_file_location(
        "crisp_long", Path(__file__).resolve().parents[1] / "scripts" / "crisp_long.py")
    cl = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cl)

    def pts(vals, extra=None):
        return [{"step": 50 * i, "seconds": 10.0 * i, "train_loss": 1.0, "heldout_loss": 1.0 - v,
                 "ndcg": {"own": v, **({"C25 post-hoc": v - 0.05} if extra else {})},
                 "vectors_per_doc": {"own": 100.0, **({"C25 post-hoc": 25.0} if extra else {})}}
                for i, v in enumerate(vals)]

    rising = pts([0.3, 0.5, 0.6, 0.62, 0.623, 0.624])
    assert cl.flatten_step(rising) == 150  # 0.62: nothing later more than 0.005 above
    assert cl.flatten_step(pts([0.1, 0.2, 0.3])) is None  # still rising at the end
    rows = [{"label": "no-crisp", "crisp": None, "trained_layers": 2, "steps": 250,
             "seconds_per_step": 0.9, "cache_seconds": 100.0, "flattens_at": 150,
             "points": pts([0.3, 0.5, 0.6, 0.62, 0.623, 0.624], extra=True)},
            {"label": "C25", "crisp": "25%", "trained_layers": 2, "steps": 250,
             "seconds_per_step": 1.0, "cache_seconds": 0.0, "flattens_at": None,
             "points": pts([0.2, 0.4, 0.5, 0.55, 0.58, 0.6])}]
    md = cl.markdown(rows)
    assert "| C25 | 0.6000 | 100.0 | 0.5740 | 25.0 | +0.0260 |" in md  # same-budget comparison
    assert "not yet" in md
    assert "## Time per step" not in md and "## Notes" not in md
    rows[1]["note"] = "shared the host with a build"
    timing = [{"label": "no-crisp", "frozen_layers": 4, "threads": 2, "steps": 20,
               "seconds_per_step": 0.8, "mean_seconds_per_step": 0.85,
               "trainable_parameters": 3_598_080},
              {"label": "full", "frozen_layers": 0, "threads": 2, "steps": 20,
               "seconds_per_step": 3.1, "mean_seconds_per_step": 3.2,
               "trainable_parameters": 22_000_000}]
    md = cl.markdown(rows, timing)
    assert "| full | 6 | 2 | 20 | 3.100 | 3.200 | 22,000,000 |" in md
    assert "- C25: shared the host with a build" in md
    png = training_curves_plot(rows, tmp_path / "c.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_curve_needs_a_metric_only_to_evaluate(adi_pairs):
    tr, held = heldout_split(adi_pairs, 8, seed=0)
    cfg = TrainConfig(data=("adi",), max_steps=1, batch_size=4, negatives=1, seed=0, threads=1,
                      dim=32)
    with pytest.raises(ValueError, match="eval_steps need metric"):
        train_curve(cfg, [tr], held, n_frozen=1, eval_steps=[0], model=tiny_colbert(layers=2),
                    progress=False, log=lambda s: None)
