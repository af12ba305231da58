"""Training: CRISP pooling in torch, --crisp parsing, data guards, a tiny real training run."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from retrieval_prune.train.crisp import CrispSpec, cluster_counts, kmeans_pool, parse_crisp


def _unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


# -- --crisp parsing -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, q, d, rel, label",
    [
        ("8x32", 8, 32, None, "C8x32"),
        ("4X8", 4, 8, None, "C4x8"),
        (" 4 x 8 ", 4, 8, None, "C4x8"),
        ("25%", None, None, 0.25, "C25"),
        ("50%", None, None, 0.5, "C50"),
        ("100%", None, None, 1.0, "C100"),
    ],
)
def test_parse_crisp_forms(text, q, d, rel, label):
    spec = parse_crisp(text)
    assert (spec.q, spec.d, spec.rel) == (q, d, rel)
    assert spec.label == label
    assert parse_crisp(text) == spec


@pytest.mark.parametrize(
    "text, match",
    [
        ("8", "not understood.*QxD.*P%"),
        ("8x", "not understood"),
        ("x32", "not understood"),
        ("0x32", "must be >= 1"),
        ("8x0", "must be >= 1"),
        ("0%", r"\(0%, 100%\]"),
        ("150%", r"\(0%, 100%\]"),
        ("-5%", "not understood"),
        ("0.25", "not understood"),
        ("", "not understood"),
    ],
)
def test_parse_crisp_errors_are_clear(text, match):
    with pytest.raises(ValueError, match=match) as info:
        parse_crisp(text)
    assert repr(text) in str(info.value)


def test_plugin_spec_matches_the_post_hoc_plugin():
    """The plug-in named by ``plugin_spec`` keeps as many vectors per sequence as training
    made clusters (``CrispSpec.k``, then at most the sequence's length), for both sides."""
    import numpy as np

    from retrieval_prune import registry
    from retrieval_prune.types import MultiVectors

    lengths = [1, 3, 5, 8, 9, 20, 33, 40]
    rng = np.random.default_rng(0)
    docs = MultiVectors.from_list([rng.standard_normal((n, 16)).astype(np.float32) for n in lengths])
    m = torch.tensor(lengths)
    for text in ("8x32", "4x8", "25%", "50%"):
        spec = parse_crisp(text)
        plugin = registry.build(spec.plugin_spec)
        assert plugin.spec.startswith(spec.plugin_spec)  # parses back, defaults appended
        for kind in ("documents", "queries"):
            kept = np.diff(plugin.transform(docs, kind).offsets)
            want = torch.minimum(spec.k(m, kind), m).numpy()
            np.testing.assert_array_equal(kept, want, err_msg=f"{text} {kind}")


# -- kmeans_pool ---------------------------------------------------------------------------
def test_kmeans_pool_gives_gradient_to_every_member_token():
    x = _unit(2, 40, 16).requires_grad_()
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, 25:] = False
    cent, cmask = kmeans_pool(x, mask, parse_crisp("4x8"), "documents")
    assert cent.shape == (2, 8, 16) and cmask.shape == (2, 8)
    w = torch.randn(cent.shape, generator=torch.Generator().manual_seed(1))
    (cent * w).sum().backward()
    has_grad = x.grad.abs().sum(-1) > 0
    assert has_grad[0].all()
    assert has_grad[1, :25].all() and not has_grad[1, 25:].any()  # padding gets none


def test_kmeans_pool_centroids_are_normalised_means_of_members():
    x = _unit(1, 12, 8)
    mask = torch.ones(1, 12, dtype=torch.bool)
    spec = CrispSpec(q=3, d=3, normalize=False)
    cent, cmask = kmeans_pool(x, mask, spec, "documents")
    # every centroid equals the mean of the tokens nearest to it (a Lloyd fixed point check
    # is too strict after 5 steps; check means of a consistent partition instead)
    from retrieval_prune.train.crisp import _assign

    labels, _ = _assign(x, mask, torch.tensor([3]), spec.iters)
    for c in range(3):
        members = x[0][labels[0] == c]
        if len(members):
            torch.testing.assert_close(cent[0, c], members.mean(0))
    normed, _ = kmeans_pool(x, mask, CrispSpec(q=3, d=3), "documents")
    norms = normed[0][cmask[0]].norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms))


def test_kmeans_pool_masks_empty_clusters():
    # 10 copies of one vector and 10 of another: 2 distinct points, k=5 -> 3 empty clusters
    a, b = _unit(2, 8).unbind(0)
    x = torch.stack([a] * 10 + [b] * 10)[None]
    mask = torch.ones(1, 20, dtype=torch.bool)
    cent, cmask = kmeans_pool(x, mask, CrispSpec(q=5, d=5), "documents")
    assert int(cmask.sum()) == 2
    assert torch.all(cent[0][~cmask[0]] == 0)  # zero where masked, and masked, never used
    got = cent[0][cmask[0]]
    assert torch.allclose(got @ a, torch.tensor([1.0, float(a @ b)]), atol=1e-5) or torch.allclose(
        got @ a, torch.tensor([float(a @ b), 1.0]), atol=1e-5
    )


def test_kmeans_pool_keeps_all_tokens_when_shorter_than_k():
    x = _unit(2, 10, 8)
    x[0, 4] = x[0, 3]  # a duplicate must not merge: a short sequence keeps every token
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, :6] = True
    mask[1, [0, 2, 5, 7]] = True  # holes (dropped punctuation) inside the sequence
    cent, cmask = kmeans_pool(x, mask, parse_crisp("8x32"), "documents")
    assert cmask.sum(1).tolist() == [6, 4]
    torch.testing.assert_close(cent[0, :6], x[0, :6])
    torch.testing.assert_close(cent[1, :4], x[1, [0, 2, 5, 7]])


def test_kmeans_pool_k_per_kind_and_relative():
    x = _unit(2, 40, 8)
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, 10:] = False
    spec = parse_crisp("4x8")
    assert cluster_counts(mask, spec, "queries").tolist() == [4, 4]
    assert cluster_counts(mask, spec, "documents").tolist() == [8, 8]
    rel = parse_crisp("25%")
    assert cluster_counts(mask, rel, "documents").tolist() == [10, 3]  # ceil(0.25 * 10) = 3
    cent, cmask = kmeans_pool(x, mask, rel, "queries")
    assert cent.shape[1] == 10 and cmask.sum(1).tolist() == [10, 3]


def test_kmeans_pool_is_deterministic_and_batch_independent():
    x = _unit(3, 30, 8)
    mask = torch.ones(3, 30, dtype=torch.bool)
    mask[2, 17:] = False
    spec = parse_crisp("4x8")
    c1, m1 = kmeans_pool(x, mask, spec, "documents")
    c2, m2 = kmeans_pool(x[2:], mask[2:], spec, "documents")
    torch.testing.assert_close(c1[2], c2[0])
    assert torch.equal(m1[2], m2[0])


def test_kmeans_pool_empty_sequence():
    x = _unit(2, 5, 4)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, :3] = True
    cent, cmask = kmeans_pool(x, mask, parse_crisp("2x2"), "documents")
    assert cmask[1].sum() == 0 and cmask[0].sum() == 2


def test_kmeans_pool_rejects_bad_shapes():
    with pytest.raises(ValueError, match="batch, seq"):
        kmeans_pool(
            torch.zeros(4, 8), torch.ones(4, dtype=torch.bool), parse_crisp("2x2"), "documents"
        )


def test_maxsim_logits_matches_a_loop():
    from retrieval_prune.train.loop import maxsim_logits

    q, d = _unit(2, 4, 8, seed=1), _unit(3, 6, 8, seed=2)
    qm = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    dm = torch.ones(3, 6, dtype=torch.bool)
    dm[1, 2:] = False
    got = maxsim_logits(q, qm, d, dm, temperature=0.5)
    for i in range(2):
        for j in range(3):
            s = (q[i][qm[i]] @ d[j][dm[j]].T).max(dim=1).values.mean() / 0.5
            assert abs(float(got[i, j]) - float(s)) < 1e-5


# -- data guards ---------------------------------------------------------------------------
def test_train_pairs_refuse_evaluation_splits():
    from retrieval_prune.train.data import load_pairs

    with pytest.raises(ValueError, match="no qrels/train.tsv"):
        load_pairs("adi", negatives="none")
    with pytest.raises(ValueError, match="evaluation split"):
        load_pairs("scifact", split="test", negatives="none")
    pairs = load_pairs("scifact", negatives="none", max_queries=5)
    assert pairs.split == "train" and len(pairs) == 5


def test_squad_pairs_use_same_article_negatives():
    from retrieval_prune.train.data import load_pairs

    pairs = load_pairs("squad", negatives="auto", max_queries=20)
    assert pairs.negatives_source == "same-title"
    titles = [
        m["title"]
        for m in __import__("retrieval_prune.data", fromlist=["load_beir"])
        .load_beir("squad-v1.1-dev-retrieval")
        .metadata
    ]
    for pos, neg in zip(pairs.positives, pairs.negatives, strict=True):
        assert len(neg) > 0 and not set(neg.tolist()) & set(pos.tolist())
        assert {titles[j] for j in neg} == {titles[pos[0]]}


def test_train_config_rejects_bad_values():
    from retrieval_prune.train.loop import TrainConfig

    with pytest.raises(ValueError, match="--crisp '3'"):
        TrainConfig(crisp="3")
    with pytest.raises(ValueError, match="batch_size=0"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp8")


# -- a tiny real run -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def adi_pairs():
    from retrieval_prune.train.data import load_pairs

    return load_pairs("adi", split="test", allow_eval_split=True, negatives="none", max_queries=8)


def _fixed_batch_loss(model, pairs, crisp=None):
    from retrieval_prune.encode.checkpoint import colbert_spec
    from retrieval_prune.encode.model import TextTokenizer, collate
    from retrieval_prune.train.loop import batch_loss

    tok = TextTokenizer(model.tokenizer, colbert_spec(doc_maxlen=64))
    qt = tok.queries(pairs.query_texts)
    docs = [int(p[0]) for p in pairs.positives]
    dt = tok.documents([pairs.doc_texts[j] for j in docs])
    n = len(docs)
    exclude = torch.zeros((n, n), dtype=torch.bool)
    for r in range(n):
        for c in range(n):
            exclude[r, c] = c != r and docs[c] in set(pairs.positives[r].tolist())
    model.eval()
    with torch.no_grad():
        return float(
            batch_loss(
                model,
                collate(qt, range(n), tok.pad_id),
                collate(dt, range(n), tok.pad_id),
                torch.arange(n),
                exclude,
                crisp=crisp,
            )
        )


def _tiny_model(seed=0):
    """MiniLM's tokenizer over a small random BERT (2 layers, 64-d): the loop's mechanics in
    seconds, on any machine. The real backbone runs in the ``slow`` variant."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from retrieval_prune.encode.model import ColBERTModel, resolve_backbone

    path = resolve_backbone(None)
    cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    cfg.update(
        {
            "num_hidden_layers": 2,
            "hidden_size": 64,
            "num_attention_heads": 2,
            "intermediate_size": 128,
        }
    )
    torch.manual_seed(seed)
    backbone = AutoModel.from_config(cfg, attn_implementation="sdpa")
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True, use_fast=True)
    return ColBERTModel(backbone, 32, tokenizer=tok, seed=seed)


def _run_and_check(tmp_path, pairs, model, crisp, lr):
    from retrieval_prune.encode import Encoder, load_checkpoint
    from retrieval_prune.train.loop import TrainConfig, train

    spec = parse_crisp(crisp) if crisp else None
    before = _fixed_batch_loss(model, pairs, spec)
    cfg = TrainConfig(
        data=("adi",),
        crisp=crisp,
        max_steps=6,
        batch_size=8,
        negatives=1,
        lr=lr,
        projection_lr=3e-3,
        warmup=0.0,
        doc_maxlen=64,
        dim=32,
        index_doc_maxlen=64,
        minutes=5,
        seed=0,
        save_every_minutes=0,
        threads=1,
    )
    out = tmp_path / "ckpt"
    res = train(cfg, out, pairs=[pairs], model=model, progress=False)
    assert res.steps == 6 and res.stopped_by == "max_steps" and len(res.losses) == 6
    after = _fixed_batch_loss(model, pairs, spec)
    assert after < before - 0.05, (before, after)

    ckpt = load_checkpoint(out)
    meta = ckpt.config["metadata"]
    assert meta["training"]["config"]["crisp"] == crisp
    assert meta["training"]["config"]["seed"] == 0 and meta["training"]["steps"] == 6
    assert meta["training"]["finished"] is True
    assert meta["training"]["data"][0]["name"] == "adi"
    assert meta["index_pipeline"] == (spec.plugin_spec if spec else "exact")
    assert (out / "model.safetensors").is_file()
    json.dumps(ckpt.config)
    for (k1, v1), (k2, v2) in zip(
        model.state_dict().items(), ckpt.model.state_dict().items(), strict=True
    ):
        assert k1 == k2 and torch.equal(v1, v2)
    enc = Encoder.load(out)
    assert enc.dim == 32 and enc.spec.doc_maxlen == 64
    with pytest.raises(FileExistsError):
        train(cfg, out, pairs=[pairs], progress=False)
    return res


@pytest.mark.parametrize("crisp", [None, "2x4"])
def test_tiny_training_run_lowers_loss_and_saves_loadable_checkpoint(tmp_path, adi_pairs, crisp):
    _run_and_check(tmp_path, adi_pairs, _tiny_model(), crisp, lr=1e-3)


def test_training_is_deterministic_under_a_seed(tmp_path, adi_pairs):
    from retrieval_prune.train.loop import TrainConfig, train

    cfg = TrainConfig(
        data=("adi",),
        crisp="2x4",
        max_steps=2,
        batch_size=4,
        doc_maxlen=48,
        dim=32,
        index_doc_maxlen=48,
        minutes=5,
        seed=3,
        save_every_minutes=0,
        threads=1,
        precision="float32",
    )
    a = train(cfg, tmp_path / "a", pairs=[adi_pairs], model=_tiny_model(3), progress=False)
    b = train(cfg, tmp_path / "b", pairs=[adi_pairs], model=_tiny_model(3), progress=False)
    assert a.losses == b.losses


@pytest.mark.slow
@pytest.mark.parametrize("crisp", [None, "2x4"])
def test_real_backbone_training_run(tmp_path, adi_pairs, crisp):
    from retrieval_prune.encode.model import ColBERTModel

    _run_and_check(tmp_path, adi_pairs, ColBERTModel.from_backbone(dim=32, seed=0), crisp, lr=1e-4)


def test_cli_train_rejects_bad_crisp_and_test_split(tmp_path, capsys):
    from retrieval_prune.cli import main

    assert (
        main(["train", "--data", "scifact", "--out", str(tmp_path / "x"), "--crisp", "8by32"]) == 2
    )
    assert "--crisp '8by32' is not understood" in capsys.readouterr().err
    assert main(["train", "--data", "adi", "--out", str(tmp_path / "y")]) == 2
    assert "no qrels/train.tsv" in capsys.readouterr().err


def test_precision_auto_resolves_to_what_the_cpu_computes_natively():
    from retrieval_prune.train.loop import TrainConfig, native_bf16

    cfg = TrainConfig(data=("adi",))
    assert cfg.precision == ("bfloat16" if native_bf16() else "float32")
    assert TrainConfig(data=("adi",), precision="float32").precision == "float32"
