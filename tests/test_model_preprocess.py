"""Model-stage plug-ins (``gmp``, ``dare``) and the checkpoint format they need (masked sparse
tensors, pruned FFN shapes, delta checkpoints). Tiny random BERTs with MiniLM's tokenizer
(synthetic weights), so every test runs in seconds on any CPU."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from retrieval_prune import registry
from retrieval_prune.encode.checkpoint import (
    load_checkpoint,
    save_checkpoint,
    set_ffn_sizes,
    stored_bytes,
)
from retrieval_prune.encode.model import ColBERTModel, backbone_identity, resolve_backbone
from retrieval_prune.preprocess.base import ModelContext
from tests.conftest import tiny_colbert


def tiny(seed=0, dim=32):
    return tiny_colbert(seed=seed, dim=dim)


def finetuned(base_model, seed=1, scale=1e-3, frozen=("word_embeddings",)):
    """A synthetic 'fine-tune': every tensor but the frozen ones moves a little."""
    import copy

    tok = base_model.tokenizer
    base_model.tokenizer = None
    ft = copy.deepcopy(base_model)
    base_model.tokenizer = tok
    ft.tokenizer = tok
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ft.named_parameters():
            if any(f in name for f in frozen):
                continue
            p.add_(scale * torch.randn(p.shape, generator=g))
    return ft


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def base_of(model):
    sd = state(model)
    return {k: v for k, v in sd.items() if k != "projection.weight"}, {"name": "tiny",
                                                                       "sha256": "0" * 64}


# -- checkpoint format ------------------------------------------------------------------
def test_sparse_save_load_exact(tmp_path):
    m = tiny()
    out = registry.build("gmp:sparsity=0.6").apply(m).model
    masks = registry.build("gmp:sparsity=0.6").apply(m).masks
    save_checkpoint(out, tmp_path / "c", masks=masks)
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    assert cfg["format_version"] == 2
    assert set(cfg["storage"]["tensors"].values()) == {"dense", "sparse"}
    back = load_checkpoint(tmp_path / "c").model
    assert same_state(state(back), state(out))
    dense = sum(t.numel() * 4 for t in out.state_dict().values())
    assert stored_bytes(out.state_dict(), masks) < dense


def test_mask_must_hold(tmp_path):
    m = tiny()
    name = "backbone.encoder.layer.0.intermediate.dense.weight"
    with pytest.raises(ValueError, match="outside its mask"):
        save_checkpoint(m, tmp_path / "c", masks={name: torch.zeros(128, 64, dtype=torch.bool)})
    assert not (tmp_path / "c").exists()


def test_refuses_non_finite(tmp_path):
    m = tiny()
    with torch.no_grad():
        m.projection.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        save_checkpoint(m, tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_ffn_sizes_round_trip(tmp_path):
    m = tiny()
    sd = state(m)
    set_ffn_sizes(m.backbone, [100, 60])
    with torch.no_grad():
        for i, n in enumerate([100, 60]):
            lay = m.backbone.encoder.layer[i]
            pre = f"backbone.encoder.layer.{i}."
            lay.intermediate.dense.weight.copy_(sd[pre + "intermediate.dense.weight"][:n])
            lay.intermediate.dense.bias.copy_(sd[pre + "intermediate.dense.bias"][:n])
            lay.output.dense.weight.copy_(sd[pre + "output.dense.weight"][:, :n])
            lay.output.dense.bias.copy_(sd[pre + "output.dense.bias"])
    save_checkpoint(m, tmp_path / "c")
    assert json.loads((tmp_path / "c" / "config.json").read_text())["ffn_sizes"] == [100, 60]
    back = load_checkpoint(tmp_path / "c").model
    assert same_state(state(back), state(m))


def test_version1_still_loads(tmp_path):
    m = tiny()
    save_checkpoint(m, tmp_path / "c")
    cfg_file = tmp_path / "c" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    for k in ("storage", "ffn_sizes", "tokenizer_from_base"):
        cfg.pop(k)
    cfg["format_version"] = 1
    cfg_file.write_text(json.dumps(cfg))
    assert same_state(state(load_checkpoint(tmp_path / "c").model), state(m))


def test_truncated_weights_refused(tmp_path):
    m = tiny()
    save_checkpoint(m, tmp_path / "c")
    f = tmp_path / "c" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(ValueError, match="corrupted"):
        load_checkpoint(tmp_path / "c")


# -- delta checkpoints over the real installed base --------------------------------------
@pytest.fixture(scope="module")
def minilm_pair():
    """The installed MiniLM as base and a synthetic fine-tune of it (frozen word table)."""
    from retrieval_prune.encode.checkpoint import base_state
    from retrieval_prune.encode.model import backbone_identity

    base = ColBERTModel.from_backbone(dim=32, seed=0)
    ft = finetuned(base, scale=2e-3)
    return ft, base_state(), backbone_identity(resolve_backbone(None))


def test_delta_checkpoint_exact_and_small(tmp_path, minilm_pair):
    ft, base, ident = minilm_pair
    step = registry.build("dare:p=0.9,seed=3")
    res = step.apply(ft, ModelContext(base=base, base_identity=ident))
    save_checkpoint(res.model, tmp_path / "d", masks=res.masks, delta_base=(base, ident))
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    kinds = cfg["storage"]["tensors"]
    assert kinds["backbone.embeddings.word_embeddings.weight"] == "base"
    assert kinds["projection.weight"] == "dense"
    assert cfg["tokenizer_from_base"] is True
    assert not (tmp_path / "d" / "vocab.txt").exists()
    back = load_checkpoint(tmp_path / "d").model
    assert same_state(state(back), state(res.model))
    size = (tmp_path / "d" / "model.safetensors").stat().st_size
    assert size < 0.25 * sum(t.numel() * 4 for t in ft.state_dict().values())
    assert abs(res.report.bytes_after - size) < 64 * 1024  # header only differs


def test_dare_p0_rebuilds_bit_for_bit(tmp_path, minilm_pair):
    ft, base, ident = minilm_pair
    res = registry.build("dare:p=0").apply(ft, ModelContext(base=base, base_identity=ident))
    assert same_state(state(res.model), state(ft))
    save_checkpoint(res.model, tmp_path / "d", masks=res.masks, delta_base=(base, ident))
    assert same_state(state(load_checkpoint(tmp_path / "d").model), state(ft))


def test_delta_refuses_other_base(tmp_path, minilm_pair):
    ft, base, ident = minilm_pair
    res = registry.build("dare:p=0.5").apply(ft, ModelContext(base=base, base_identity=ident))
    save_checkpoint(res.model, tmp_path / "d", masks=res.masks, delta_base=(base, ident))
    cfg_file = tmp_path / "d" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["storage"]["base"]["sha256"] = "f" * 64
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="delta over base weights"):
        load_checkpoint(tmp_path / "d")


def test_dare_needs_base():
    with pytest.raises(ValueError, match="needs the base"):
        registry.build("dare:p=0.5").apply(tiny())


def test_dare_on_the_base_itself_is_an_error():
    m = tiny()
    base, ident = base_of(m)
    with pytest.raises(ValueError, match="does not differ"):
        registry.build("dare").apply(m, ModelContext(base=base, base_identity=ident))


# -- the plug-ins' own rules ------------------------------------------------------------
@pytest.mark.parametrize("mode", ["dare", "magnitude"])
def test_dare_budget_rescale_and_determinism(mode):
    m0 = tiny()
    base, ident = base_of(m0)
    ft = finetuned(m0)
    before = state(ft)
    spec = f"dare:p=0.7,mode={mode},seed=1"
    a = registry.build(spec).apply(ft, ModelContext(base=base, base_identity=ident))
    b = registry.build(spec).apply(ft, ModelContext(base=base, base_identity=ident))
    assert same_state(state(ft), before)  # input untouched
    assert same_state(state(a.model), state(b.model))
    name = "backbone.encoder.layer.0.intermediate.dense.weight"
    w, bw, m = state(a.model)[name], base[name], a.masks[name]
    d = before[name] - bw
    assert torch.equal(w[~m], bw[~m])
    if mode == "magnitude":
        assert int(m.sum()) == round(0.3 * m.numel())
        assert d[m].abs().min() >= d[~m].abs().max()
        assert torch.equal(w[m], before[name][m])
    else:
        frac = float(m.float().mean())
        assert abs(frac - 0.3) < 4 * np.sqrt(0.3 * 0.7 / m.numel())
        expect = bw[m] + d[m] / 0.3
        tol = 4 * np.finfo(np.float32).eps * (bw[m].abs() + (d[m] / 0.3).abs())
        assert bool(((w[m] - expect).abs() <= tol).all())
    c = registry.build(f"dare:p=0.7,mode={mode},seed=2").apply(
        ft, ModelContext(base=base, base_identity=ident))
    assert mode == "magnitude" or not torch.equal(c.masks[name], a.masks[name])


def test_merge_task_arithmetic_over_dare_deltas():
    """merge: base + weight * sum_i m_i * d_i / (1 - p); entries no mask keeps stay the base;
    the projection (no base) is the fine-tunes' mean; deterministic; inputs untouched."""
    m0 = tiny()
    base, ident = base_of(m0)
    a, b = finetuned(m0, seed=1), finetuned(m0, seed=2)
    sa, sb = state(a), state(b)
    name = "backbone.encoder.layer.0.intermediate.dense.weight"
    bw, da, db = base[name], sa[name] - base[name], sb[name] - base[name]
    ctx = ModelContext(base=base, base_identity=ident, others=[b.state_dict()])

    plain = registry.build("dare_merge:p=0,weight=0.5").apply(a, ctx)  # Task Arithmetic: the mean
    w = state(plain.model)[name]
    expect = bw + 0.5 * (da + db)
    tol = 4 * np.finfo(np.float32).eps * (bw.abs() + da.abs() + db.abs())
    assert bool(((w - expect).abs() <= tol).all())
    proj = state(plain.model)["projection.weight"]
    pt = (sa["projection.weight"] + sb["projection.weight"]) / 2
    assert bool(((proj - pt).abs() <= 2 * np.finfo(np.float32).eps * pt.abs()).all())
    assert plain.report.details["fine_tunes"] == 2
    assert plain.report.details["averaged"] == ["projection.weight"]
    assert same_state(state(a), sa) and same_state(state(b), sb)

    spec = "dare_merge:p=0.8,weight=1.0,seed=3"
    r1, r2 = (registry.build(spec).apply(a, ctx) for _ in range(2))
    assert same_state(state(r1.model), state(r2.model))
    m = r1.masks[name]
    w = state(r1.model)[name]
    assert torch.equal(w[~m], bw[~m])  # dropped in both: the base
    # each fine-tune keeps ~20%; the union ~36%
    frac = float(m.float().mean())
    assert abs(frac - 0.36) < 4 * np.sqrt(0.36 * 0.64 / m.numel())
    assert r1.report.details["kept"] / r1.report.details["delta_params"] == pytest.approx(
        0.2, abs=4 * np.sqrt(0.2 * 0.8 / m.numel()))
    # the merged entries: base + (m_a * d_a + m_b * d_b) / (1 - p), each fine-tune's own mask
    from retrieval_prune.preprocess.model.dare import drop_mask
    from retrieval_prune.preprocess.model.dare_merge import _MASK_STRIDE

    i = list(sa).index(name)
    ma = drop_mask(bw.shape, 0.8, 3, i)
    mb = drop_mask(bw.shape, 0.8, 3, _MASK_STRIDE + i)
    assert torch.equal(m, ma | mb)
    want = bw + (torch.where(ma, da, 0.0) + torch.where(mb, db, 0.0)) * 5.0
    tol = 4 * np.finfo(np.float32).eps * (bw.abs() + 5 * (da.abs() + db.abs()))
    assert bool(((w - want).abs() <= tol).all())
    other = registry.build("dare_merge:p=0.8,weight=1.0,seed=4").apply(a, ctx)
    assert not torch.equal(other.masks[name], m)
    # one fine-tune, weight 1: DARE of it (same rule, same rescale)
    solo = registry.build("dare_merge:p=0.8,seed=3").apply(
        a, ModelContext(base=base, base_identity=ident))
    ms = solo.masks[name]
    exp1 = bw[ms] + da[ms] / 0.2
    tol1 = 4 * np.finfo(np.float32).eps * (bw[ms].abs() + (da[ms] / 0.2).abs())
    assert bool(((state(solo.model)[name][ms] - exp1).abs() <= tol1).all())


def test_merge_refuses_other_architectures_and_no_base():
    m0 = tiny()
    base, ident = base_of(m0)
    a = finetuned(m0, seed=1)
    with pytest.raises(ValueError, match="needs the base"):
        registry.build("dare_merge").apply(a, ModelContext(others=[a.state_dict()]))
    other = tiny(dim=16)  # another projection width
    with pytest.raises(ValueError, match="has shape"):
        registry.build("dare_merge").apply(a, ModelContext(base=base, base_identity=ident,
                                                      others=[other.state_dict()]))
    with pytest.raises(ValueError, match="does not differ|no fine-tune differs"):
        registry.build("dare_merge").apply(m0, ModelContext(base=base, base_identity=ident))


def test_merge_delta_checkpoint_round_trip(tmp_path, minilm_pair):
    """Two fine-tunes of the installed MiniLM merged and saved as a delta over it: loading
    rebuilds the merged weights bit for bit."""
    ft, base, ident = minilm_pair
    ft2 = finetuned(ft, seed=5, scale=2e-3)
    res = registry.build("dare_merge:p=0.9,weight=0.5").apply(
        ft, ModelContext(base=base, base_identity=ident, others=[ft2.state_dict()]))
    save_checkpoint(res.model, tmp_path / "m", masks=res.masks, delta_base=(base, ident))
    assert same_state(state(load_checkpoint(tmp_path / "m").model), state(res.model))


def test_cli_merge_with(tmp_path, capsys, minilm_pair):
    from retrieval_prune.cli import main

    ft, _, _ = minilm_pair
    save_checkpoint(ft, tmp_path / "a")
    save_checkpoint(finetuned(ft, seed=5, scale=2e-3), tmp_path / "b")
    out = tmp_path / "ab"
    assert main(["preprocess", "--checkpoint", str(tmp_path / "a"), "--merge-with",
                 str(tmp_path / "b"), "--pipeline", "dare_merge:p=0.9,weight=0.5",
                 "--out", str(out), "-q"]) == 0
    meta = load_checkpoint(out).config["metadata"]["preprocess"]
    assert meta["merged_with"][0]["sha256"] == load_checkpoint(tmp_path / "b").sha256
    assert meta["reports"][0]["details"]["fine_tunes"] == 2
    capsys.readouterr()
    for argv, msg in [
        (["--pipeline", "gmp", "--merge-with", str(tmp_path / "b")], "add one to --pipeline"),
        (["--pipeline", "dare_merge", "--merge-with", str(tmp_path / "nope")], "nope"),
    ]:
        bad = tmp_path / "bad"
        rc = main(["preprocess", "--checkpoint", str(tmp_path / "a"), "--out", str(bad), "-q",
                   *argv])
        err = capsys.readouterr().err
        assert rc == 2 and msg in err and "Traceback" not in err, (argv, err)
        assert not bad.exists()


def test_darex_q_picks_from_its_grid_and_needs_calibration():
    from retrieval_prune.encode.checkpoint import colbert_spec
    from retrieval_prune.encode.model import TextTokenizer, collate

    m0 = tiny()
    base, ident = base_of(m0)
    ft = finetuned(m0, scale=2e-2)
    with pytest.raises(ValueError, match="calibration"):
        registry.build("dare:p=0.9,mode=darex-q").apply(ft, ModelContext(base=base, base_identity=ident))
    tt = TextTokenizer(ft.tokenizer, colbert_spec(doc_maxlen=32))
    tk = tt.documents(["a short calibration text", "another one about cells and genes"])
    cal = [collate(tk, range(2), tt.pad_id)]
    res = registry.build("dare:p=0.9,mode=darex-q").apply(
        ft, ModelContext(base=base, base_identity=ident, calibration=cal))
    q = res.report.details["q"]
    curve = res.report.details["q_curve"]
    assert 0.05 - 1e-9 <= q <= 1.0 and min(e for _, e in curve) == dict(curve)[q]


def test_gmp_exact_budget_and_minimum():
    m = tiny()
    from retrieval_prune.preprocess.model._common import linear_weight_names

    names = linear_weight_names(m)
    total = sum(m.state_dict()[n].numel() for n in names)
    for sp, mk in [(0.3, 0.0), (0.7, 0.02), (0.9, 0.08)]:
        res = registry.build(f"gmp:sparsity={sp},min_keep={mk}").apply(m)
        sd = res.model.state_dict()
        kept = sum(int(res.masks[n].sum()) if n in res.masks else sd[n].numel() for n in names)
        assert kept == round((1 - sp) * total)
        for n in names:
            k = int(res.masks[n].sum()) if n in res.masks else sd[n].numel()
            assert k >= np.ceil(mk * sd[n].numel())
            assert int((sd[n] != 0).sum()) <= k


def test_gmp_identity_and_errors():
    m = tiny()
    res = registry.build("gmp:sparsity=0").apply(m)
    assert same_state(state(res.model), state(m)) and res.masks == {}
    with pytest.raises(ValueError, match="sparsity"):
        registry.build("gmp:sparsity=1.5")
    with pytest.raises(ValueError, match="minima"):
        registry.build("gmp:sparsity=0.9,min_keep=0.5").apply(m)
    bad = tiny()
    with torch.no_grad():
        bad.projection.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        registry.build("gmp").apply(bad)


# -- the preprocess command --------------------------------------------------------------
def test_cli_preprocess_gmp_and_errors(tmp_path, capsys):
    from retrieval_prune.cli import main

    src = tmp_path / "src"
    save_checkpoint(tiny(), src)
    out = tmp_path / "gmp"
    assert main(["preprocess", "--checkpoint", str(src), "--pipeline", "gmp:sparsity=0.5",
                 "--out", str(out), "-q"]) == 0
    ck = load_checkpoint(out)
    meta = ck.config["metadata"]["preprocess"]
    assert meta["pipeline"] == "gmp:sparsity=0.5,min_keep=0.02"
    assert meta["source"]["sha256"] == load_checkpoint(src).sha256
    assert meta["reports"][0]["stage"] == "model"
    # preprocess on a preprocessed checkpoint keeps the history
    assert main(["preprocess", "--checkpoint", str(out), "--pipeline", "gmp:sparsity=0.6",
                 "--out", str(tmp_path / "gmp2"), "-q"]) == 0
    meta2 = load_checkpoint(tmp_path / "gmp2").config["metadata"]["preprocess"]
    assert meta2["pipeline"] == "gmp:sparsity=0.6,min_keep=0.02"
    assert meta2["after"]["pipeline"] == meta["pipeline"]
    assert meta2["source"]["sha256"] == load_checkpoint(out).sha256
    # bad input: one line, exit 2, nothing written
    capsys.readouterr()
    for argv, msg in [
        (["--pipeline", "gmp:sparsity=2"], "must be <="),
        (["--pipeline", "gmp:bogus=1"], "unknown parameter"),
        (["--pipeline", "pool:factor=2"], "model and table steps"),
        (["--pipeline", "dare:p=0.5"], "not a fine-tune of this base"),
        (["--pipeline", "vocabtrim"], "calibration texts"),
        (["--pipeline", "gmp", "--minutes", "0"], "minutes=0.0 must be > 0"),
    ]:
        bad = tmp_path / "bad"
        rc = main(["preprocess", "--checkpoint", str(src), "--out", str(bad), "-q", *argv])
        err = capsys.readouterr().err
        assert rc == 2 and msg in err and "Traceback" not in err, (argv, err)
        assert not bad.exists()
    assert main(["preprocess", "--checkpoint", str(src), "--pipeline", "gmp",
                 "--out", str(out), "-q"]) == 2  # exists, no --overwrite
    assert "exists" in capsys.readouterr().err


def test_cli_data_step_needs_a_train_split(tmp_path, capsys, data_dir):
    from retrieval_prune.cli import main

    rc = main(["preprocess", "--data", str(data_dir / "adi"), "--pipeline",
               "random_pairs:keep=0.5", "--out", str(tmp_path / "sel.json"), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "train" in err and not (tmp_path / "sel.json").exists()
    # a data step's budget is keep=, not a training budget
    rc = main(["preprocess", "--data", "scifact", "--pipeline", "random_pairs:keep=0.5",
               "--minutes", "5", "--out", str(tmp_path / "sel.json"), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "keep=FRACTION" in err and not (tmp_path / "sel.json").exists()


def test_shipped_name_resolution_error_lists_names():
    from retrieval_prune.encode import Encoder

    with pytest.raises(FileNotFoundError, match="shipped checkpoint"):
        Encoder.load("no-such-checkpoint")


def test_shipped_ft128_loads_by_name_over_the_installed_base():
    """The fine-tuned 128-d encoder ships as a DARE delta (scripts/ship_ft128.py); it loads by
    name on a fresh clone, checked against the base's sha256."""
    from retrieval_prune.encode import Encoder
    from retrieval_prune.encode.checkpoint import SHIPPED, read_config

    folder = SHIPPED / "ft128"
    cfg = read_config(folder)
    assert cfg["storage"]["kind"] == "delta"
    base = cfg["storage"]["base"]
    assert base["sha256"] == backbone_identity(resolve_backbone(None))["sha256"]
    assert sum(f.stat().st_size for f in folder.iterdir()) <= 5_000_000
    enc = Encoder.load("ft128")
    assert enc.dim == 128 and enc.identity["name"] == "ft128"
    q = enc.encode_queries(["do statins reduce cardiovascular risk?"], progress=False)
    assert q.n_tokens == 32 and np.allclose(np.linalg.norm(q.embeddings, axis=1), 1, atol=1e-5)


def test_index_settings_reload_the_shipped_encoder():
    from retrieval_prune.encode import Encoder

    enc = Encoder.load("ft128")
    again = Encoder.from_settings(enc.settings)
    assert again.identity == enc.identity
    bad = {**enc.settings, "checkpoint": {**enc.identity, "sha256": "0" * 64}}
    with pytest.raises(ValueError, match="another"):
        Encoder.from_settings(bad)


def test_masked_recovery_run_keeps_the_pruned_entries_zero(tmp_path):
    """train --init on a gmp checkpoint: the weights move, the pruned entries stay zero, and
    the result is saved sparse again (a few steps on adi; mechanics only)."""
    from retrieval_prune.encode.checkpoint import stored_masks
    from retrieval_prune.train.data import load_pairs
    from retrieval_prune.train.loop import TrainConfig, train

    src = tmp_path / "src"
    save_checkpoint(tiny(), src)
    res = registry.build("gmp:sparsity=0.6").apply(load_checkpoint(src).model)
    save_checkpoint(res.model, tmp_path / "gmp", masks=res.masks)
    masks = stored_masks(tmp_path / "gmp")
    assert set(masks) == set(res.masks)
    assert all(torch.equal(masks[k], res.masks[k]) for k in masks)
    pairs = load_pairs("adi", split="test", allow_eval_split=True, negatives="none",
                       max_queries=12, progress=False)
    cfg = TrainConfig(data=("adi",), init=str(tmp_path / "gmp"), max_steps=3, dim=32,
                      batch_size=4, precision="float32", minutes=5, save_every_minutes=0,
                      lr=1e-3)
    out = train(cfg, tmp_path / "rec", pairs=[pairs], progress=False).path
    after = load_checkpoint(out).model.state_dict()
    before = res.model.state_dict()
    name = next(iter(masks))
    assert not torch.equal(after[name], before[name])  # it trained
    for k, m in masks.items():
        assert bool((after[k][~m] == 0).all())
    assert set(stored_masks(out)) == set(masks)
    with pytest.raises(ValueError, match="dim"):
        train(TrainConfig(data=("adi",), init=str(tmp_path / "gmp"), max_steps=1, dim=128,
                          precision="float32"), tmp_path / "x", pairs=[pairs], progress=False)
