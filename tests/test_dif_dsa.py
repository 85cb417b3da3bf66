"""Known-answer tests of dif_dsa: brute-force references written plainly here, hand-computed
cases, and properties that follow from the definitions (Kim et al. arXiv 1808.08444, Eq. 1-3;
DESIGN.md "DSA (SADL)" and "DSA (centroid-kNN)")."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dif_dsa import DSAResult, dsa, flatten_activations  # noqa: E402


# ---------------------------------------------------------------------------------------------
# plain references: Python loops over queries, numpy norms, leave-one-out by index
# ---------------------------------------------------------------------------------------------
def brute_sadl(q, r, qc, rc, self_index=None):
    dsa_v, da_v, db_v, ia_v, ib_v = [], [], [], [], []
    for i in range(len(q)):
        usable = [j for j in range(len(r)) if self_index is None or j != self_index[i]]
        own = [j for j in usable if rc[j] == qc[i]]
        d_own = np.linalg.norm(q[i] - r[own], axis=1)
        a = own[int(np.argmin(d_own))]          # first index among ties, as np.argmin
        other = [j for j in usable if rc[j] != qc[i]]
        d_other = np.linalg.norm(r[a] - r[other], axis=1)
        b = other[int(np.argmin(d_other))]
        dsa_v.append(d_own.min() / d_other.min())
        da_v.append(d_own.min())
        db_v.append(d_other.min())
        ia_v.append(a)
        ib_v.append(b)
    return tuple(np.array(v) for v in (dsa_v, da_v, db_v, ia_v, ib_v))


def brute_centroid_knn(q, r, qc, rc, k, self_index=None):
    dsa_v, da_v, db_v, cb_v = [], [], [], []
    for i in range(len(q)):
        usable = [j for j in range(len(r)) if self_index is None or j != self_index[i]]
        dist = {}
        for c in sorted(set(rc.tolist())):
            members = np.array([j for j in usable if rc[j] == c])
            if len(members) == 0:
                continue
            d = np.linalg.norm(q[i] - r[members], axis=1)
            nearest = members[np.argsort(d, kind="stable")[:k]]   # all of them when fewer than k
            dist[c] = np.linalg.norm(q[i] - r[nearest].mean(axis=0))
        others = {c: v for c, v in dist.items() if c != qc[i]}
        cb = min(others, key=others.get)
        dsa_v.append(dist[qc[i]] / others[cb])
        da_v.append(dist[qc[i]])
        db_v.append(others[cb])
        cb_v.append(cb)
    return tuple(np.array(v) for v in (dsa_v, da_v, db_v, cb_v))


def rel(a, b):
    return np.max(np.abs(np.asarray(a) - np.asarray(b)) / np.maximum(np.abs(np.asarray(b)), 1e-300))


def clustered(rng, n, d, n_classes, spread=1.0):
    """Gaussian blobs, one per class, with labels."""
    centres = rng.normal(size=(n_classes, d)) * 2.0
    y = rng.integers(0, n_classes, n)
    y[:n_classes] = np.arange(n_classes)               # every class present
    return centres[y] + spread * rng.normal(size=(n, d)), y


# ---------------------------------------------------------------------------------------------
# brute-force agreement
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,d,n_classes", [(60, 3, 2), (90, 17, 5), (70, 40, 10)])
@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_self_dsa_equals_brute_force(n, d, n_classes, chunk_size):
    rng = np.random.default_rng(n * 1000 + d)
    x, y = clustered(rng, n, d, n_classes)
    selfi = np.arange(n)
    got = dsa(x, x, y, y, "sadl", self_index=selfi, chunk_size=chunk_size, progress=False)
    ref_dsa, ref_da, ref_db, ref_ia, ref_ib = brute_sadl(x, x, y, y, selfi)
    assert rel(got.dsa, ref_dsa) < 1e-6
    assert rel(got.dist_a, ref_da) < 1e-6 and rel(got.dist_b, ref_db) < 1e-6
    np.testing.assert_array_equal(got.index_a, ref_ia)
    np.testing.assert_array_equal(got.index_b, ref_ib)
    assert np.all(got.index_a != selfi)                       # never its own neighbour
    np.testing.assert_array_equal(got.class_b, y[ref_ib])

    k = 4
    got = dsa(x, x, y, y, "centroid_knn", k=k, self_index=selfi, chunk_size=chunk_size, progress=False)
    ref_dsa, ref_da, ref_db, ref_cb = brute_centroid_knn(x, x, y, y, k, selfi)
    assert rel(got.dsa, ref_dsa) < 1e-6
    assert rel(got.dist_a, ref_da) < 1e-6 and rel(got.dist_b, ref_db) < 1e-6
    np.testing.assert_array_equal(got.class_b, ref_cb)
    assert np.all(got.index_a == -1)


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_query_vs_reference_equals_brute_force(chunk_size):
    rng = np.random.default_rng(7)
    r, rc = clustered(rng, 80, 12, 4)
    q, _ = clustered(rng, 30, 12, 4, spread=2.0)
    qc = rng.integers(0, 4, len(q))                          # arbitrary (e.g. predicted) classes
    got = dsa(q.astype(np.float32), r.astype(np.float32), qc, rc, "sadl", chunk_size=chunk_size,
              progress=False)
    q32, r32 = q.astype(np.float32).astype(np.float64), r.astype(np.float32).astype(np.float64)
    ref_dsa, _, _, ref_ia, _ = brute_sadl(q32, r32, qc, rc)
    assert rel(got.dsa, ref_dsa) < 1e-6
    np.testing.assert_array_equal(got.index_a, ref_ia)
    # k larger than some class groups: those contribute the mean of all their points
    counts = np.bincount(rc)
    k = int(np.median(counts)) + 1
    assert (counts < k).any() and (counts >= k).any()
    got = dsa(q, r, qc, rc, "centroid_knn", k=k, chunk_size=chunk_size, progress=False)
    assert rel(got.dsa, brute_centroid_knn(q, r, qc, rc, k)[0]) < 1e-6


def test_self_exclusion_with_different_query_and_reference_groupings():
    """Corner-case-repo style: queries grouped by prediction, reference by true label. The query's
    own row may then sit in another class group; leave-one-out removes it there too."""
    rng = np.random.default_rng(3)
    x, label = clustered(rng, 70, 6, 3, spread=2.5)
    pred = label.copy()
    flip = rng.choice(len(x), 15, replace=False)
    pred[flip] = (label[flip] + 1) % 3
    selfi = np.arange(len(x))
    for chunk_size in (1, 64):
        got = dsa(x, x, pred, label, "sadl", self_index=selfi, chunk_size=chunk_size, progress=False)
        ref_dsa, _, _, ref_ia, ref_ib = brute_sadl(x, x, pred, label, selfi)
        assert rel(got.dsa, ref_dsa) < 1e-6
        np.testing.assert_array_equal(got.index_b, ref_ib)
        assert np.all(got.index_b != selfi)
        got = dsa(x, x, pred, label, "centroid_knn", k=3, self_index=selfi, chunk_size=chunk_size,
                  progress=False)
        assert rel(got.dsa, brute_centroid_knn(x, x, pred, label, 3, selfi)[0]) < 1e-6


def test_near_ties_beyond_float32_resolution_are_resolved_exactly():
    """Reference points on a sphere around the queries whose radii differ by ~1e-9: float32
    screening cannot order them, the certified fallback must (float64 re-screening path)."""
    rng = np.random.default_rng(11)
    d, n = 8, 120
    directions = rng.normal(size=(n, d))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    radii = 1.0 + 1e-9 * rng.permutation(n)                 # all distinct, all within 1.2e-7
    r = 5.0 + directions * radii[:, None]                    # offset: centring must handle it
    rc = np.arange(n) % 3
    q = np.full((6, d), 5.0) + 1e-12 * rng.normal(size=(6, d))
    qc = np.array([0, 1, 2, 0, 1, 2])
    got = dsa(q, r, qc, rc, "sadl", chunk_size=4, progress=False)
    ref_dsa, ref_da, _, ref_ia, ref_ib = brute_sadl(q, r, qc, rc)
    np.testing.assert_array_equal(got.index_a, ref_ia)
    np.testing.assert_array_equal(got.index_b, ref_ib)
    assert rel(got.dist_a, ref_da) < 1e-12
    got = dsa(q, r, qc, rc, "centroid_knn", k=5, chunk_size=4, progress=False)
    assert rel(got.dsa, brute_centroid_knn(q, r, qc, rc, 5)[0]) < 1e-9


# ---------------------------------------------------------------------------------------------
# self-exclusion by index, duplicates and ties
# ---------------------------------------------------------------------------------------------
def test_duplicate_at_another_index_is_a_neighbour_but_self_is_not():
    rng = np.random.default_rng(5)
    x, y = clustered(rng, 40, 5, 3)
    x[17] = x[4]                                              # exact duplicate, same class
    y[17] = y[4]
    selfi = np.arange(len(x))
    res = dsa(x, x, y, y, "sadl", self_index=selfi, progress=False)
    assert res.index_a[4] == 17 and res.index_a[17] == 4
    assert res.dist_a[4] == 0.0 and res.dsa[4] == 0.0
    others = np.setdiff1d(selfi, [4, 17])
    assert np.all(res.dist_a[others] > 0)                     # no DSA 0 from itself
    # without self-exclusion every point is its own nearest neighbour: DSA 0 everywhere
    res_no = dsa(x, x, y, y, "sadl", progress=False)
    assert np.all(res_no.dist_a == 0.0) and np.all(res_no.dsa == 0.0)
    # centroid-kNN with k = 1 is the distance to the nearest own-class point: same facts
    res_k1 = dsa(x, x, y, y, "centroid_knn", k=1, self_index=selfi, progress=False)
    assert res_k1.dist_a[4] == 0.0 and np.all(res_k1.dist_a[others] > 0)
    np.testing.assert_allclose(res_k1.dist_a, res.dist_a, rtol=1e-12)


def test_ties_go_to_the_smaller_reference_index():
    # query at the origin, two own-class points at equal distance (indices 1 and 3)
    r = np.array([[5.0, 5.0], [1.0, 0.0], [-7.0, 0.0], [0.0, 1.0], [0.0, -3.0]])
    rc = np.array([1, 0, 0, 0, 1])
    res = dsa(np.zeros((1, 2)), r, [0], rc, "sadl", progress=False)
    assert res.index_a[0] == 1
    assert res.dist_a[0] == 1.0
    # from (1, 0) the nearest class-1 point is (0, -3): sqrt(10)
    assert res.index_b[0] == 4
    np.testing.assert_allclose(res.dist_b[0], np.sqrt(10.0), rtol=1e-15)


# ---------------------------------------------------------------------------------------------
# grouping by predicted vs true labels: a hand-computed case (1-D activations)
# ---------------------------------------------------------------------------------------------
def test_class_grouping_follows_the_given_class_arrays():
    r = np.array([[0.0], [2.0], [10.0], [11.0]])
    ref_label = np.array([0, 1, 1, 1])
    ref_pred = np.array([0, 0, 1, 1])                        # the point at 2 is mispredicted
    q = np.array([[4.0]])

    # reference grouped by prediction: class 0 = {0, 2}, class 1 = {10, 11}
    res = dsa(q, r, [0], ref_pred, "sadl", progress=False)
    assert res.index_a[0] == 1 and res.dist_a[0] == 2.0      # x_a = 2
    assert res.index_b[0] == 2 and res.dist_b[0] == 8.0      # 2 -> 10
    assert res.dsa[0] == 0.25
    # reference grouped by true label: class 0 = {0}, class 1 = {2, 10, 11}
    res = dsa(q, r, [0], ref_label, "sadl", progress=False)
    assert res.index_a[0] == 0 and res.dist_a[0] == 4.0      # x_a = 0
    assert res.index_b[0] == 1 and res.dist_b[0] == 2.0      # 0 -> 2
    assert res.dsa[0] == 2.0
    # the query's class decides which group is "own": query class 1 under prediction grouping
    res = dsa(q, r, [1], ref_pred, "sadl", progress=False)
    assert res.dist_a[0] == 6.0 and res.dist_b[0] == 8.0     # x_a = 10, 10 -> 2
    assert res.dsa[0] == 0.75

    # centroid-kNN, prediction grouping: k = 1 -> nearest points 2 and 10
    res = dsa(q, r, [0], ref_pred, "centroid_knn", k=1, progress=False)
    assert res.dist_a[0] == 2.0 and res.dist_b[0] == 6.0 and res.class_b[0] == 1
    # k = 2 -> means 1 and 10.5
    res = dsa(q, r, [0], ref_pred, "centroid_knn", k=2, progress=False)
    assert res.dist_a[0] == 3.0 and res.dist_b[0] == 6.5
    # label grouping, k = 2: class 0 has one point (mean 0, distance 4); class 1 nearest 2 and
    # 10 (mean 6, distance 2)
    res = dsa(q, r, [0], ref_label, "centroid_knn", k=2, progress=False)
    assert res.dist_a[0] == 4.0 and res.dist_b[0] == 2.0 and res.dsa[0] == 2.0


def test_leave_one_out_also_in_other_class_groups():
    """Training set grouped by true label, the query (a training point) by its prediction: its own
    row lies in another class group and must not serve as x_a's other-class neighbour."""
    x = np.array([[0.0], [1.0], [5.0], [10.0]])
    label = np.array([0, 0, 1, 1])
    pred = np.array([0, 1, 1, 1])                            # the point at 1 is mispredicted
    res = dsa(x, x, pred, label, "sadl", self_index=np.arange(4), progress=False)
    # query 1 (x = 1, class 1): x_a = 5 (distance 4); nearest class-0 point to 5 other than the
    # query's own row is 0 (distance 5), not 1 (distance 4)
    assert res.index_a[1] == 2 and res.dist_a[1] == 4.0
    assert res.index_b[1] == 0 and res.dist_b[1] == 5.0 and res.dsa[1] == 0.8
    res = dsa(x, x, pred, label, "centroid_knn", k=1, self_index=np.arange(4), progress=False)
    # class 1 nearest: 5 (distance 4); class 0 without the query's own row: 0 (distance 1)
    assert res.dist_a[1] == 4.0 and res.dist_b[1] == 1.0 and res.dsa[1] == 4.0


# ---------------------------------------------------------------------------------------------
# properties of the definition
# ---------------------------------------------------------------------------------------------
def test_invariant_to_translation_and_uniform_scaling():
    rng = np.random.default_rng(9)
    x, y = clustered(rng, 50, 6, 4)
    selfi = np.arange(len(x))
    for variant in ("sadl", "centroid_knn"):
        base = dsa(x, x, y, y, variant, k=3, self_index=selfi, progress=False)
        moved = dsa(3.0 * x + 100.0, 3.0 * x + 100.0, y, y, variant, k=3, self_index=selfi,
                    progress=False)
        assert rel(moved.dsa, base.dsa) < 1e-9
        assert rel(moved.dist_a, 3.0 * base.dist_a) < 1e-9


def test_result_fields_and_torch_inputs():
    rng = np.random.default_rng(2)
    x, y = clustered(rng, 30, 4, 3)
    res = dsa(torch.from_numpy(x).float(), torch.from_numpy(x).float(), torch.from_numpy(y),
              torch.from_numpy(y), "sadl", self_index=torch.arange(30), progress=False)
    assert isinstance(res, DSAResult)
    for name, arr in res.as_dict("train_").items():
        assert name.startswith("train_") and arr.shape == (30,)
    assert np.all(res.class_b != y)                           # dist_b is to another class
    assert np.all(y[res.index_a] == y)                        # x_a is of the query's class
    np.testing.assert_allclose(res.dsa, res.dist_a / res.dist_b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_cuda_matches_cpu():
    rng = np.random.default_rng(4)
    x, y = clustered(rng, 200, 16, 5)
    for variant in ("sadl", "centroid_knn"):
        cpu = dsa(x, x, y, y, variant, k=5, self_index=np.arange(200), progress=False)
        gpu = dsa(x, x, y, y, variant, k=5, self_index=np.arange(200), device="cuda", progress=False)
        assert rel(gpu.dsa, cpu.dsa) < 1e-12


# ---------------------------------------------------------------------------------------------
# conv activations
# ---------------------------------------------------------------------------------------------
def test_conv_activations_are_averaged_over_space():
    rng = np.random.default_rng(1)
    conv = rng.normal(size=(6, 3, 4, 5)).astype(np.float32)
    flat = flatten_activations(conv)
    expected = np.array([[conv[n, c].astype(np.float64).sum() / 20.0 for c in range(3)] for n in range(6)])
    assert flat.shape == (6, 3)
    np.testing.assert_allclose(flat, expected, rtol=1e-6)
    dense = rng.normal(size=(6, 7))
    np.testing.assert_array_equal(flatten_activations(dense), dense)
    assert flatten_activations(rng.normal(size=(6, 2, 3))).shape == (6, 6)
    assert flatten_activations(torch.from_numpy(conv)).shape == (6, 3)
    with pytest.raises(ValueError, match="flatten_activations"):
        dsa(conv, conv, np.zeros(6, int), np.r_[0, 0, 0, 1, 1, 1], progress=False)


def test_flatten_matches_the_models_spatial_mean():
    from cnnmodel import build_model, layer_activations

    torch.manual_seed(0)
    model = build_model("mnist_convnet", 10).eval()
    x = torch.rand(5, 1, 28, 28)
    raw = layer_activations(model, x, ["last_conv"], spatial_mean=False)["last_conv"]
    pooled = layer_activations(model, x, ["last_conv"], spatial_mean=True)["last_conv"]
    assert raw.dim() == 4
    np.testing.assert_allclose(flatten_activations(raw), pooled.numpy(), rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# bad inputs: one clear error each
# ---------------------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors():
    rng = np.random.default_rng(0)
    x, y = clustered(rng, 20, 3, 2)
    with pytest.raises(ValueError, match=r"query_classes: class\(es\) \[5\]"):
        dsa(x[:2], x, [0, 5], y, progress=False)
    with pytest.raises(ValueError, match="dimensions differ"):
        dsa(x[:, :2], x, y, y, progress=False)
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"query: contains NaN \(first bad row 3\)"):
        dsa(bad, x, y, y, progress=False)
    with pytest.raises(ValueError, match="ref: contains NaN"):
        dsa(x, bad, y, y, progress=False)
    bad[3, 1] = np.inf
    with pytest.raises(ValueError, match="ref: contains inf"):
        dsa(x, bad, y, y, progress=False)
    with pytest.raises(ValueError, match="k: expected an integer >= 1"):
        dsa(x, x, y, y, "centroid_knn", k=0, progress=False)
    with pytest.raises(ValueError, match="variant"):
        dsa(x, x, y, y, "lsa", progress=False)
    with pytest.raises(ValueError, match="ref_classes: expected a 1-D array of length 20"):
        dsa(x, x, y, y[:5], progress=False)
    with pytest.raises(ValueError, match="query_classes: expected integers"):
        dsa(x, x, y.astype(float), y, progress=False)
    with pytest.raises(ValueError, match="self_index: expected reference rows"):
        dsa(x, x, y, y, self_index=np.arange(20) + 1, progress=False)
    with pytest.raises(ValueError, match="at least 2 reference classes"):
        dsa(x, x, np.zeros(20, int), np.zeros(20, int), progress=False)
    with pytest.raises(ValueError, match="chunk_size"):
        dsa(x, x, y, y, chunk_size=0, progress=False)
    # a class whose only reference point is the query itself has no x_a
    lonely = y.copy()
    lonely[0] = 2
    for variant in ("sadl", "centroid_knn"):
        with pytest.raises(ValueError, match="query 0: class 2 has no reference point other than"):
            dsa(x, x, lonely, lonely, variant, self_index=np.arange(20), progress=False)


def test_highest_precision_scope_restores_per_backend_settings():
    """With a per-backend fp32_precision set (the legacy getter then raises), the screening still
    runs in IEEE float32 and leaves that setting as it found it."""
    import dif_dsa

    try:
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        with dif_dsa._highest_matmul_precision():
            assert torch.get_float32_matmul_precision() == "highest"
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        with pytest.raises(RuntimeError):
            torch.get_float32_matmul_precision()
    finally:
        torch.backends.cuda.matmul.fp32_precision = "none"
    assert torch.get_float32_matmul_precision() == "highest"
