"""Codec protocol: round trips, idempotence, spec round trips, persistence, bad input.

Data here is synthetic (seeded clustered unit vectors), not a benchmark.
"""

import numpy as np
import pytest

from retrieval_prune import registry
from retrieval_prune.compress import (
    BinaryCodec,
    CodecChain,
    Float16Codec,
    HierarchicalKMeansCodec,
    KMeansCodec,
    NotFittedError,
    PCACodec,
    ResidualCodec,
    colbert_num_centroids,
    id_geometry,
)
from retrieval_prune.compress.residual import pack_bits, unpack_bits

DIM = 64

#: one chain per codec and option worth covering (small K: the data is small)
SPECS = [
    "f32",
    "fp16",
    "pca:dim=16",
    "kmeans:k=64",
    "kmeans:k=300",  # uint16 codes
    "kmeans:k=64,score=hamming",
    "hkmeans:k=64",
    "hkmeans:k=64,score=prefix",
    "residual:k=64,nbits=1",
    "residual:k=64,nbits=2",
    "residual:k=64,nbits=4",
    "residual:k=64,nbits=2,candidates=1",
    "binary:kind=sign",
    "binary:kind=sign,score=hamming",
    "pca:dim=32 | residual:k=32,nbits=2",
    "pca:dim=32 | binary:kind=sign",
]


def clustered_tokens(n=4000, dim=DIM, n_centers=48, noise=0.15, seed=0):
    """Synthetic: unit vectors scattered around random unit centres."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_centers, dim))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    x = centers[rng.integers(0, n_centers, n)] + noise * rng.standard_normal((n, dim)) / np.sqrt(
        dim
    )
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def tokens():
    return clustered_tokens()


@pytest.fixture(scope="module")
def fitted(tokens):
    return {spec: CodecChain.from_spec(spec).fit(tokens, seed=0) for spec in SPECS}


@pytest.mark.parametrize("spec", SPECS)
def test_round_trip_shapes_and_code_size(spec, fitted, tokens):
    chain = fitted[spec]
    codes = chain.encode(tokens)
    assert codes.shape[0] == tokens.shape[0]
    assert codes.nbytes == tokens.shape[0] * chain.code_size
    out = chain.decode(codes)
    assert out.dtype == np.float32 and out.shape == tokens.shape
    parts = chain.encode_parts(tokens)
    assert sum(p.nbytes for p in parts.values()) == codes.nbytes
    np.testing.assert_array_equal(chain.storage.decode_parts(parts), chain.storage.decode(codes))


@pytest.mark.parametrize("spec", SPECS)
def test_decode_encode_is_idempotent_on_second_round(spec, fitted, tokens):
    chain = fitted[spec]
    once = chain.decode(chain.encode(tokens))
    twice = chain.decode(chain.encode(once))
    if "candidates=1" in spec:
        # plain nearest-centroid coding (colbert-ai) may move a decoded vector to another
        # centroid; the default (best of 8 candidates) is exactly idempotent
        moved = np.any(np.abs(twice - once) > 2e-5, axis=1).mean()
        assert moved < 0.01
        return
    np.testing.assert_allclose(twice, once, atol=2e-5)
    if not chain.transforms:  # no float re-projection: the codes themselves are a fixed point
        np.testing.assert_array_equal(chain.encode(twice), chain.encode(once))


def test_code_sizes_match_the_formats(fitted):
    assert fitted["f32"].code_size == 4 * DIM
    assert fitted["fp16"].code_size == 2 * DIM
    assert fitted["pca:dim=16"].code_size == 4 * 16
    assert fitted["kmeans:k=64"].code_size == 1
    assert fitted["kmeans:k=300"].code_size == 2
    assert fitted["residual:k=64,nbits=1"].code_size == 1 + DIM // 8
    assert fitted["residual:k=64,nbits=2"].code_size == 1 + DIM // 4
    assert fitted["residual:k=64,nbits=4"].code_size == 1 + DIM // 2
    assert fitted["binary:kind=sign"].code_size == DIM // 8
    assert fitted["pca:dim=32 | residual:k=32,nbits=2"].code_size == 1 + 32 // 4


def test_reconstruction_error_falls_with_more_bits(fitted, tokens):
    err = {}
    for nbits in (1, 2, 4):
        c = fitted[f"residual:k=64,nbits={nbits}"]
        err[nbits] = float(np.mean((c.decode(c.encode(tokens)) - tokens) ** 2))
    km = fitted["kmeans:k=64"]
    err[0] = float(np.mean((km.decode(km.encode(tokens)) - tokens) ** 2))
    assert err[0] > err[1] > err[2] > err[4]
    # trying 8 candidate centroids never codes worse than the nearest one alone
    one = fitted["residual:k=64,nbits=2,candidates=1"]
    err_one = float(np.mean((one.decode(one.encode(tokens)) - tokens) ** 2))
    assert err[2] <= err_one + 1e-7


def test_residual_bit_layout_matches_the_kernel_contract():
    rng = np.random.default_rng(1)
    for nbits in (1, 2, 4):
        b = rng.integers(0, 1 << nbits, (5, 16)).astype(np.uint8)
        packed = pack_bits(b, nbits)
        per = 8 // nbits
        assert packed.shape == (5, 16 * nbits // 8)
        # byte j holds dims j*per .. (j+1)*per-1, dim t of the byte at bit t*nbits
        for j in range(packed.shape[1]):
            for t in range(per):
                got = (packed[:, j] >> (t * nbits)) & ((1 << nbits) - 1)
                np.testing.assert_array_equal(got, b[:, j * per + t])
        np.testing.assert_array_equal(unpack_bits(packed, nbits, 16), b)
    bits = rng.integers(0, 2, (3, 16)).astype(np.uint8)
    np.testing.assert_array_equal(pack_bits(bits, 1), np.packbits(bits, axis=1, bitorder="little"))


def test_residual_decode_is_centroid_plus_bucket_values(fitted, tokens):
    c = fitted["residual:k=64,nbits=2"].storage
    parts = c.encode_parts(tokens[:50])
    buckets = unpack_bits(parts["residuals"], 2, DIM)
    expect = c.centroids_[parts["codes"].astype(np.int64)] + c.bucket_values_[buckets]
    np.testing.assert_array_equal(c.decode_parts(parts), expect)
    assert c.cutoffs_.shape == (3,) and c.bucket_values_.shape == (4,)
    assert np.all(np.diff(c.bucket_values_) > 0)
    # bucket values (midpoint quantiles) lie between the cutoffs
    assert np.all(c.bucket_values_[:-1] < c.cutoffs_) and np.all(c.cutoffs_ < c.bucket_values_[1:])


def test_binary_is_packbits_of_signs(fitted, tokens):
    c = fitted["binary:kind=sign"]
    np.testing.assert_array_equal(
        c.encode(tokens), np.packbits(tokens > 0, axis=1, bitorder="little")
    )
    out = c.decode(c.encode(tokens))
    np.testing.assert_allclose(np.abs(out), 1 / np.sqrt(DIM), rtol=1e-6)
    np.testing.assert_array_equal(out > 0, tokens > 0)


def test_pca_keeps_inner_products_in_the_principal_subspace(tokens):
    p = PCACodec(dim=DIM).fit(tokens)  # full rank: an exact rotation
    y = p.transform(tokens[:100])
    np.testing.assert_allclose(y @ y.T, tokens[:100] @ tokens[:100].T, atol=1e-4)
    p16 = PCACodec(dim=16).fit(tokens)
    assert p16.dim_in == DIM and p16.dim_out == 16
    comp = p16.components_
    np.testing.assert_allclose(comp.T @ comp, np.eye(16), atol=1e-5)


def test_hierarchical_ids_carry_geometry_arbitrary_ids_do_not():
    # synthetic data with nested clusters (4 x 4 x 4 centres at shrinking scales)
    rng = np.random.default_rng(0)
    centres = [np.zeros(DIM)]
    for scale in (1.0, 0.5, 0.25):
        centres = [
            p + scale * rng.standard_normal(DIM) / np.sqrt(DIM) for p in centres for _ in range(4)
        ]
    centres = np.array(centres)
    x = centres[rng.integers(0, 64, 6000)] + 0.05 * rng.standard_normal((6000, DIM)) / np.sqrt(DIM)
    x = x.astype(np.float32)
    hier = id_geometry(HierarchicalKMeansCodec(k=64).fit(x).centroids_)
    flat = id_geometry(KMeansCodec(k=64).fit(x).centroids_)
    # measured 0.76 / 0.40 (tree ids) vs 0.02 / 0.01 (k-means ids)
    assert hier["prefix"] > 0.5 and hier["hamming"] > 0.25
    assert abs(flat["prefix"]) < 0.15 and abs(flat["hamming"]) < 0.15


# -- specs ---------------------------------------------------------------------------
def test_every_codec_is_registered_and_its_spec_round_trips():
    codecs = registry.available("codec")
    assert {"f32", "fp16", "pca", "kmeans", "hkmeans", "residual", "binary"} <= set(codecs)
    for cls in codecs.values():
        c = cls()
        again = registry.build(c.spec)
        assert again == c and again.spec == c.spec


@pytest.mark.parametrize("spec", SPECS)
def test_chain_spec_round_trips(spec):
    chain = CodecChain.from_spec(spec)
    again = CodecChain.from_spec(chain.spec)
    assert again == chain and again.spec == chain.spec


def test_issue_spec_examples_parse():
    assert CodecChain.from_spec("kmeans:k=4096").storage.k == 4096
    r = CodecChain.from_spec("residual:k=4096,nbits=2").storage
    assert (r.k, r.nbits) == (4096, 2)
    assert CodecChain.from_spec("binary:sign").storage.score == "asym"
    assert CodecChain.from_spec("binary:sign,score=hamming").storage.score == "hamming"
    assert registry.normalize_spec("binary:sign,score=hamming") == "binary:kind=sign,score=hamming"
    ch = CodecChain.from_spec("pca:dim=128 | residual:nbits=2")
    assert [s.name for s in ch.steps] == ["pca", "residual"]
    assert CodecChain.from_spec("pca:dim=64").storage.name == "f32"


def test_colbert_default_k():
    assert colbert_num_centroids(1_000_000) == 8192  # 16 * 1000 = 16000 -> 2**13
    assert colbert_num_centroids(4000) == 512  # 16 * 63.2 = 1012 -> 2**9
    assert colbert_num_centroids(10**12) == 65536  # capped: uint16 codes
    assert colbert_num_centroids(100) == 64  # never more centroids than tokens


# -- persistence and determinism ----------------------------------------------------
@pytest.mark.parametrize("spec", SPECS)
def test_state_arrays_reload_to_an_identical_codec(spec, fitted, tokens):
    chain = fitted[spec]
    arrays = chain.state_arrays()
    assert all(isinstance(a, np.ndarray) and not a.dtype.hasobject for a in arrays.values())
    fresh = CodecChain.from_spec(chain.spec).load_state(arrays)
    np.testing.assert_array_equal(fresh.encode(tokens), chain.encode(tokens))
    np.testing.assert_array_equal(
        fresh.decode(chain.encode(tokens)), chain.decode(chain.encode(tokens))
    )


@pytest.mark.parametrize(
    "spec", ["kmeans:k=64", "hkmeans:k=64", "residual:k=64,nbits=2", "pca:dim=16"]
)
def test_fit_is_deterministic_under_a_seed(spec, tokens):
    a = CodecChain.from_spec(spec).fit(tokens, seed=3)
    b = CodecChain.from_spec(spec).fit(tokens, seed=3)
    for name, arr in a.state_arrays().items():
        np.testing.assert_array_equal(arr, b.state_arrays()[name])
    np.testing.assert_array_equal(a.encode(tokens), b.encode(tokens))


def test_default_k_follows_colbert_formula(tokens):
    c = KMeansCodec(niter=2).fit(tokens[:1000])
    assert c.n_centroids == colbert_num_centroids(1000) == 256
    assert c.encode(tokens[:5]).dtype == np.uint8


def test_k_scale_multiplies_the_default_codebook(tokens):
    # after pool:factor=2 the formula would halve-ish K; k_scale=2 restores the unpooled size
    c = ResidualCodec(niter=2, k_scale=2).fit(tokens[:1000])
    assert c.n_centroids == 2 * colbert_num_centroids(1000) == 512
    assert KMeansCodec(niter=2, k_scale=0.5).fit(tokens[:1000]).n_centroids == 128
    assert registry.build(c.spec).spec == c.spec  # round-trips
    assert ResidualCodec(k=64, k_scale=4).fit(tokens[:1000]).n_centroids == 64  # explicit k wins
    with pytest.raises(ValueError, match="k_scale"):
        ResidualCodec(k_scale=0)


# -- bad input -------------------------------------------------------------------------
def test_fitting_on_fewer_tokens_than_k(tokens):
    for cls in (KMeansCodec, ResidualCodec, HierarchicalKMeansCodec):
        with pytest.raises(ValueError, match=r"n_tokens=10 should be >= k=64"):
            cls(k=64).fit(tokens[:10])


@pytest.mark.parametrize("spec", ["fp16", "pca:dim=8", "kmeans:k=8", "residual:k=8", "binary:sign"])
def test_nan_tokens_rejected(spec, tokens):
    bad = tokens[:200].copy()
    bad[17, 3] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        CodecChain.from_spec(spec).fit(bad)
    chain = CodecChain.from_spec(spec).fit(tokens[:200])
    with pytest.raises(ValueError, match="NaN or Inf"):
        chain.encode(bad)
    bad[17, 3] = np.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        chain.encode(bad)


def test_wrong_dtype_dim_and_shape_rejected(fitted, tokens):
    chain = fitted["residual:k=64,nbits=2"]
    with pytest.raises(ValueError, match="float64.*astype"):
        chain.encode(tokens.astype(np.float64))
    with pytest.raises(ValueError, match="float64"):
        ResidualCodec(k=8).fit(tokens.astype(np.float64))
    with pytest.raises(ValueError, match="dim=32 but the codec was fitted on dim=64"):
        chain.encode(tokens[:, :32].copy())
    with pytest.raises(ValueError, match="2-D"):
        chain.encode(tokens[0])
    with pytest.raises(ValueError, match="numpy"):
        chain.encode(tokens.tolist())
    with pytest.raises(ValueError, match="empty"):
        KMeansCodec(k=2).fit(np.zeros((0, DIM), np.float32))
    with pytest.raises(ValueError, match=r"uint8 \(n, 17\)"):
        chain.decode(np.zeros((3, 5), np.uint8))


@pytest.mark.parametrize("nbits", [0, 3, 5, 8, -1])
def test_nbits_outside_1_2_4(nbits):
    with pytest.raises(
        ValueError, match=rf"nbits={nbits} is not supported; choose nbits in \[1, 2, 4\]"
    ):
        ResidualCodec(nbits=nbits)
    with pytest.raises(ValueError, match="nbits"):
        registry.build(f"residual:nbits={nbits}")


@pytest.mark.parametrize("k", [0, 1, 65537, 100000])
def test_k_out_of_range(k):
    for name in ("kmeans", "residual", "hkmeans"):
        with pytest.raises(ValueError, match=rf"k={k} must be"):
            registry.build(f"{name}:k={k}")


def test_other_bad_parameters(tokens):
    with pytest.raises(ValueError, match="k=1000 must be a power of two.*k=512 or k=1024"):
        HierarchicalKMeansCodec(k=1000)
    with pytest.raises(ValueError, match="dim=100 exceeds the input dim=64"):
        PCACodec(dim=100).fit(tokens)
    with pytest.raises(ValueError, match="multiple of 4 for nbits=2"):
        ResidualCodec(k=4, nbits=2).fit(tokens[:, :30].copy())
    with pytest.raises(ValueError, match="not one of"):
        registry.build("binary:score=cosine")
    with pytest.raises(ValueError, match="projections come first"):
        CodecChain.from_spec("residual:k=8 | pca:dim=8")
    with pytest.raises(ValueError, match="projections come first"):
        CodecChain.from_spec("kmeans:k=8 | binary:sign")
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['signs'\]; known: kind"):
        CodecChain.from_spec("binary:signs")
    with pytest.raises(ValueError, match="overflows float16"):
        Float16Codec().fit(tokens).encode(tokens * 1e6)


def test_use_before_fit_is_a_clear_error(tokens):
    for c in (KMeansCodec(k=4), ResidualCodec(k=4), BinaryCodec(), PCACodec(dim=4)):
        with pytest.raises(NotFittedError, match="not fitted; call fit") as info:
            c.encode(tokens)
        # the error raised is catchable as ValueError (what callers of encode expect)
        assert isinstance(info.value, ValueError), type(info.value).__mro__
    with pytest.raises(ValueError, match="not fitted"):
        CodecChain.from_spec("pca:dim=8 | kmeans:k=8").encode(tokens)
