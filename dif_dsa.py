"""Exact, batched distance-based surprise adequacy (DSA).

Two variants, as defined in DESIGN.md ("Definitions the stages must agree on"):

* ``sadl`` -- Kim et al., "Guiding Deep Learning System Testing using Surprise Adequacy"
  (ICSE 2019, arXiv 1808.08444), Sec. III-B, Eq. (1)-(3). For a query x of class c:
  x_a = argmin_{x_i in ref, class(x_i) = c} ||a(x) - a(x_i)||   and dist_a = ||a(x) - a(x_a)||,
  dist_b = min_{x_i in ref, class(x_i) != c} ||a(x_a) - a(x_i)||, DSA = dist_a / dist_b.
  This follows the reference code (coinse/sadl ``sa.py``: ``find_closest_at`` then a second
  ``find_closest_at`` from x_a's activation to the reference points of the other classes).
* ``centroid_knn`` -- the corner-case repository's "DSA3" (Ouyang et al.): for every class j,
  the mean of the k reference activations of class j nearest to the query; dist_a = distance
  to the own class's mean, dist_b = the smallest distance to another class's mean.
  The repository's ``cal_dsa3`` uses k = 50, hard-codes 10 classes, does not exclude the query
  from its own neighbours and groups the reference set by *true* labels while the query side uses
  the predicted label. Here k comes from the config (``dsa_k``), classes are whatever the
  reference class array holds, self-exclusion is by index (below), and the grouping on both sides
  is whatever class arrays the caller passes (DESIGN.md: predicted labels by default).

Self-exclusion. When the query set is (part of) the reference set, ``self_index[i]`` gives the
reference row of query i and every part of the computation runs as if that row were removed from
the reference set (leave-one-out). An exact duplicate at another index stays a legitimate neighbour.

Exactness and speed. Every nearest-neighbour question is answered in two steps:

1. screening in float32 with one matrix product per block of ``chunk_size`` query rows: for
   activations centred on the reference mean, ||r||^2 - 2 q.r (= ||q - r||^2 - ||q||^2; the row
   constant does not change the ranking) is the product of [q, 1] with [-2r, ||r||^2]; the k+1
   smallest per row come from ``torch.topk``. Columns a row must not use (its own row, another
   class group sharing the block) are set to +inf first;
2. certification and refinement in float64. With the rounding-error bound of inner products
   (Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed., Sec. 3.1:
   |fl(x.y) - x.y| <= gamma_d |x|.|y|, gamma_d ~ d u) plus the rounding of the inputs, each
   screened value is within E_i = 2 (d + 16) u (||q_i||^2 + max_j ||r_j||^2) of the true one
   (u = 2^-24). A row is certified when its (k+1)-th screened value exceeds its k-th by more than
   2 E_i: the screened k-set is then provably the exact one. Otherwise every column within 2 E_i of
   the k-th value is a candidate (the true k nearest provably are among them) and the choice is
   made on exact float64 distances, ties going to the smaller reference index (as ``np.argmin`` and
   a stable sort do); rows with very many candidates are re-screened in float64 first. Reported
   distances are recomputed in float64 as ||q - r|| from the inputs, so results agree with a plain
   float64 loop to rounding (~1e-15).

Work: SADL step 1 compares each query with its own class group only; step 2 runs once per
distinct x_a, against the whole reference set with x_a's class masked; centroid-kNN needs every
query against every reference point, one product per query chunk, then ``topk`` per class slice.
Memory: one block is ``chunk_size`` x N_ref float32 values (about 0.5 GB for 2048 x 60,000);
no N_q x N_ref x d tensor is ever formed.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

VARIANTS = ("sadl", "centroid_knn")

# unit roundoff of the screening precisions
_U32 = 2.0 ** -24
_U64 = 2.0 ** -53
# a row whose uncertified candidates exceed this many per needed neighbour is re-screened in
# float64 (tight bound) instead of refining a long candidate list
_MAX_CANDIDATES_PER_NEIGHBOUR = 16
# multiply-adds below which a CPU screening product goes through NumPy rather than torch
_SMALL_PRODUCT = 1 << 24


@dataclass
class DSAResult:
    """Per-query DSA and its parts (numpy arrays of length N_q).

    ``index_a``/``index_b``: reference rows of x_a and of x_a's nearest other-class point (sadl);
    -1 for ``centroid_knn`` (the anchors are means, not reference points).
    ``class_b``: class of the point (sadl) or class mean (centroid_knn) that gives dist_b.
    ``dsa`` is ``dist_a / dist_b``; it is ``inf`` when dist_b is 0 (sadl: x_a coincides with a
    reference point of another class; centroid_knn: the query coincides with another class's
    mean), also when dist_a is 0 too. Callers computing AUROC should treat it as the largest value.
    """

    dsa: np.ndarray
    dist_a: np.ndarray
    dist_b: np.ndarray
    index_a: np.ndarray
    index_b: np.ndarray
    class_b: np.ndarray
    variant: str = "sadl"
    k: int = field(default=1)

    def as_dict(self, prefix: str = "") -> dict[str, np.ndarray]:
        """Arrays for ``artifacts.atomic_savez`` (keys optionally prefixed)."""
        return {f"{prefix}{name}": getattr(self, name)
                for name in ("dsa", "dist_a", "dist_b", "index_a", "index_b", "class_b")}


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------
def flatten_activations(a) -> np.ndarray:
    """N x C x H x W conv activations -> N x C (mean over H x W, SADL's treatment of conv
    layers, Kim et al. Sec. III-A); N x d stays as is; other shapes are flattened to N x -1.

    Returns a numpy array (float32 or float64, the mean is taken in float64).
    """
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu()
        a = a.numpy() if a.dtype in (torch.float32, torch.float64) else a.float().numpy()
    a = np.asarray(a)
    if a.ndim < 2:
        raise ValueError(f"activations: expected at least 2 dimensions (N x ...), got shape {a.shape}")
    out_dtype = a.dtype if a.dtype in (np.float32, np.float64) else np.float32
    if a.ndim == 4:
        return a.astype(np.float64).mean(axis=(2, 3)).astype(out_dtype)
    return a.reshape(len(a), -1).astype(out_dtype, copy=False)


def _as_activations(name: str, a) -> np.ndarray:
    """A C-contiguous float32/float64 N x d numpy array (no copy when already one), checked."""
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu()
        a = a.numpy() if a.dtype in (torch.float32, torch.float64) else a.double().numpy()
    arr = np.asarray(a)
    if arr.dtype == object or arr.dtype == bool or not (np.issubdtype(arr.dtype, np.floating) or
                                                        np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name}: expected a numeric N x d array, got dtype {arr.dtype}")
    if arr.ndim != 2:
        hint = " (average conv maps over H x W with flatten_activations first)" if arr.ndim == 4 else ""
        raise ValueError(f"{name}: expected a 2-D N x d array, got shape {arr.shape}{hint}")
    if arr.dtype not in (np.float32, np.float64):
        arr = arr.astype(np.float64)
    arr = np.ascontiguousarray(arr)
    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0])
        what = "NaN" if np.isnan(arr[bad]).any() else "inf"
        raise ValueError(f"{name}: contains {what} (first bad row {bad})")
    return arr


def _as_index_array(name: str, a, n: int) -> np.ndarray:
    arr = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    if arr.ndim != 1 or len(arr) != n:
        raise ValueError(f"{name}: expected a 1-D array of length {n}, got shape {arr.shape}")
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name}: expected integers, got dtype {arr.dtype}")
    return arr.astype(np.int64)


@contextlib.contextmanager
def _highest_matmul_precision():
    """The error bound assumes IEEE float32 products: no TF32/bf16 shortcuts while screening.
    Restores either the legacy setting or, when per-backend ``fp32_precision`` settings are in use
    (the legacy getter then raises), those."""
    try:
        previous = torch.get_float32_matmul_precision()
        backends = None
    except RuntimeError:
        previous = None
        backends = [(obj, obj.fp32_precision) for obj in
                    (torch.backends, torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)
                    if hasattr(obj, "fp32_precision")]
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        if backends is None:
            torch.set_float32_matmul_precision(previous)
        else:
            for obj, value in backends:
                obj.fp32_precision = value


# ---------------------------------------------------------------------------------------------
# the core: exact k nearest columns per row, chunked and certified
# ---------------------------------------------------------------------------------------------
class _Space:
    """Activations prepared once.

    ``q``/``r``: the originals (numpy, float32 or float64) from which every reported distance is
    recomputed exactly in float64. ``q32a``/``r32a``: centred float32 copies with an appended
    column of ones (numpy; the screening rows [q - mu, 1]). ``qn``/``rn``: float64 squared norms
    of the centred vectors (they scale the rounding-error bound).
    """

    def __init__(self, query: np.ndarray, ref: np.ndarray, device: torch.device):
        self.q, self.r = query, ref
        self.d = ref.shape[1]
        self.device = device
        # centring does not change distances but shrinks the norms that the error bound scales with
        self.mu = ref.mean(axis=0, dtype=np.float64)
        self.q32a, self.qn = self._centred(query)
        self.r32a, self.rn = self._centred(ref)

    def _centred(self, x: np.ndarray, block: int = 8192):
        out = np.ones((len(x), self.d + 1), dtype=np.float32)
        norms = np.empty(len(x))
        for s in range(0, len(x), block):
            c = x[s:s + block] - self.mu
            out[s:s + block, :-1] = c
            norms[s:s + block] = np.einsum("ij,ij->i", c, c)
        return out, norms

    def columns(self, cols: np.ndarray, exact64: bool = False):
        """Screening matrix [-2 (r - mu), ||r - mu||^2] of reference rows ``cols`` (n x (d+1));
        scaling by -2 is exact. float32, or float64 for the tight re-screening."""
        if exact64:
            mat = np.empty((len(cols), self.d + 1))
            mat[:, :-1] = -2.0 * (self.r[cols] - self.mu)
        else:
            mat = np.empty((len(cols), self.d + 1), dtype=np.float32)
            mat[:, :-1] = self.r32a[cols, :-1]
            mat[:, :-1] *= -2.0
        mat[:, -1] = self.rn[cols]
        return mat if self.device.type == "cpu" else torch.from_numpy(mat).to(self.device)

    def screen(self, rows: np.ndarray, colmat):
        """The m x n screening block ||r - mu||^2 - 2 (q - mu).(r - mu) = ||q - r||^2 - ||q - mu||^2.

        On CPU a NumPy array. Large products go through torch (the same thread pool as the
        ``topk`` that follows); small ones through NumPy's BLAS, because torch's stalled for
        milliseconds on tiny products when both cores were busy. Both are IEEE products."""
        if self.device.type == "cpu":
            rows = rows.astype(colmat.dtype, copy=False)
            if rows.shape[0] * colmat.shape[0] * colmat.shape[1] < _SMALL_PRODUCT:
                return rows @ colmat.T
            return (torch.from_numpy(rows) @ torch.from_numpy(colmat).T).numpy()
        return torch.from_numpy(rows).to(self.device, colmat.dtype) @ colmat.T


def _exact_sq(a: np.ndarray, idx_a: np.ndarray, b: np.ndarray, idx_b: np.ndarray,
              max_elems: int = 1 << 22) -> np.ndarray:
    """Exact float64 squared distances ||a[idx_a] - b[idx_b]||^2 for index pairs."""
    out = np.empty(len(idx_a))
    step = max(1, max_elems // a.shape[1])
    for s in range(0, len(idx_a), step):
        diff = a[idx_a[s:s + step]].astype(np.float64) - b[idx_b[s:s + step]]
        out[s:s + step] = np.einsum("ij,ij->i", diff, diff)
    return out


def _select_smallest(row: np.ndarray, col: np.ndarray, val: np.ndarray, order_key: np.ndarray,
                     kk: int):
    """Among (row, col, val) triples keep, per row, the kk smallest val (ties: smaller order_key)."""
    order = np.lexsort((order_key, val, row))
    row, col, val = row[order], col[order], val[order]
    first = np.r_[0, np.flatnonzero(np.diff(row)) + 1] if len(row) else np.zeros(0, dtype=np.int64)
    rank = np.arange(len(row)) - np.repeat(first, np.diff(np.r_[first, len(row)]))
    keep = rank < kk
    return row[keep], col[keep], val[keep]


def _mask(block, rows: np.ndarray, cols) -> None:
    """block[rows, cols] = +inf in place (numpy array or device tensor); ``cols`` is a slice or
    an index array aligned with ``rows``."""
    if isinstance(cols, slice) and len(rows) and rows[-1] - rows[0] + 1 == len(rows):
        block[rows[0]:rows[-1] + 1, cols] = math.inf      # contiguous rows (sorted by class)
        return
    if isinstance(block, np.ndarray):
        if isinstance(cols, slice):
            block[rows[:, None], np.arange(block.shape[1])[cols][None, :]] = np.inf
        else:
            block[rows, cols] = np.inf
        return
    r = torch.from_numpy(rows).to(block.device)
    if isinstance(cols, slice):
        block[r[:, None], torch.arange(block.shape[1], device=block.device)[cols][None, :]] = math.inf
    else:
        block[r, torch.from_numpy(cols).to(block.device)] = math.inf


def _knn_block(space: _Space, rows32a: np.ndarray, rows_exact: np.ndarray, rows_n: np.ndarray,
               cols: np.ndarray, excl: np.ndarray, kk: int, need_dist: bool, colmat=None,
               band: np.ndarray | None = None, block=None, exact64: bool = False):
    """Exact kk nearest columns (reference rows ``cols``) for each of m query rows.

    ``rows32a``: the rows' screening vectors [q - mu, 1] (float32); ``rows_exact``: the original
    m rows; ``rows_n``: float64 ||q - mu||^2. The m x n screening block is ``block`` when given
    (e.g. a column slice of a larger block), else ``rows32a @ colmat.T``. Columns that must not
    be used: per row the position ``excl`` (self-exclusion; -1 for none) and the position range
    ``band[:, 0]:band[:, 1]`` (another class group sharing the block; may be empty).
    Returns (row, position, squared distance or None) with min(kk, usable columns) entries per
    row, grouped by row; the set is exact, and so are the distances when ``need_dist``.
    """
    m, n = len(rows32a), len(cols)
    cpu = space.device.type == "cpu"
    if block is None:
        if exact64:   # tight re-screening in float64 from the original vectors
            rows_s = np.concatenate([rows_exact - space.mu, np.ones((m, 1))], axis=1)
            colmat = space.columns(cols, exact64=True)
        else:
            rows_s = rows32a
        block = space.screen(rows_s, colmat)
    n_valid = np.full(m, n, dtype=np.int64)
    if band is not None:
        width = band[:, 1] - band[:, 0]
        n_valid -= width
        for lo, hi in np.unique(band[width > 0], axis=0):
            _mask(block, np.flatnonzero((band[:, 0] == lo) & (band[:, 1] == hi)), slice(lo, hi))
    has_excl = excl >= 0
    if band is not None:
        has_excl &= ~((excl >= band[:, 0]) & (excl < band[:, 1]))
    if has_excl.any():
        er = np.flatnonzero(has_excl)
        _mask(block, er, excl[er])
        n_valid -= has_excl
    take = np.minimum(kk, n_valid)                      # a group smaller than kk: use all of it
    q_top = min(kk + 1, n)
    block_t = torch.from_numpy(block) if cpu else block
    vals, idx = torch.topk(block_t, q_top, dim=1, largest=False, sorted=True)
    vals = vals.cpu().numpy().astype(np.float64)
    idx = idx.cpu().numpy()
    u = _U64 if exact64 else _U32
    err = 2.0 * (space.d + 16) * u * (rows_n + float(space.rn[cols].max()))   # E_i (module doc)
    ar = np.arange(m)
    kth = vals[ar, np.maximum(take - 1, 0)]
    nxt = vals[ar, np.minimum(take, q_top - 1)]
    certified = (take >= n_valid) | (nxt > kth + 2.0 * err)
    # certified rows: the screened kk-set is provably the exact one
    cr = np.flatnonzero(certified)
    row = np.repeat(cr, take[cr])
    pos = idx[cr][np.arange(q_top)[None, :] < take[cr, None]]
    unc = np.flatnonzero(~certified)
    if len(unc):
        # every column within 2 E_i of the screened k-th value is a candidate (3 E_i: margin for
        # rounding the threshold itself); the true kk nearest are provably among them
        thr = kth[unc] + 3.0 * err[unc]
        if cpu:
            c_row, c_pos = np.nonzero(block[unc] <= thr[:, None].astype(block.dtype))
        else:
            thr_t = torch.from_numpy(thr).to(block.device, block.dtype)
            c_row, c_pos = (block[torch.from_numpy(unc).to(block.device)]
                            <= thr_t[:, None]).nonzero().cpu().numpy().T
        if not exact64 and len(c_row) > _MAX_CANDIDATES_PER_NEIGHBOUR * (kk + 1) * len(unc):
            u_row, u_pos, _ = _knn_block(space, rows32a[unc], rows_exact[unc], rows_n[unc], cols,
                                         excl[unc], kk, False,
                                         band=None if band is None else band[unc], exact64=True)
        else:
            d2 = _exact_sq(rows_exact[unc], c_row, space.r, cols[c_pos])
            u_row, u_pos, _ = _select_smallest(c_row, c_pos, d2, cols[c_pos], kk)
        row = np.concatenate([row, unc[u_row]])
        pos = np.concatenate([pos, u_pos])
        order = np.argsort(row, kind="stable")
        row, pos = row[order], pos[order]
    d2 = _exact_sq(rows_exact, row, space.r, cols[pos]) if need_dist else None
    return row, pos, d2


def _row_means(ref: np.ndarray, row: np.ndarray, ref_rows: np.ndarray, max_elems: int = 1 << 22):
    """Float64 mean of ``ref[ref_rows]`` per distinct ``row`` (``row`` grouped ascending).
    Returns (distinct rows, means)."""
    starts = np.r_[0, np.flatnonzero(np.diff(row)) + 1]
    counts = np.diff(np.r_[starts, len(row)])
    d = ref.shape[1]
    means = np.empty((len(starts), d))
    if (counts == counts[0]).all():         # the usual case: k neighbours for every row
        c = int(counts[0])
        per = max(1, max_elems // (d * c))
        for s in range(0, len(starts), per):
            x = ref[ref_rows[s * c:(s + per) * c]].reshape(-1, c, d)
            means[s:s + per] = x.sum(axis=1, dtype=np.float64) / c
        return row[starts], means
    per = max(1, max_elems // (d * int(counts.max())))
    for s in range(0, len(starts), per):
        lo, hi = starts[s], (starts[s + per] if s + per < len(starts) else len(row))
        x = ref[ref_rows[lo:hi]].astype(np.float64)
        means[s:s + per] = np.add.reduceat(x, starts[s:s + per] - lo, axis=0) / counts[s:s + per, None]
    return row[starts], means


def _row_chunks(n: int, chunk_size: int):
    return [(s, min(n, s + chunk_size)) for s in range(0, n, chunk_size)]


# ---------------------------------------------------------------------------------------------
# the two variants
# ---------------------------------------------------------------------------------------------
def dsa(query, ref, query_classes, ref_classes, variant: str = "sadl", k: int = 20,
        self_index=None, chunk_size: int = 2048, device="cpu", progress: bool = True) -> DSAResult:
    """Exact DSA of ``query`` (N_q x d activations) against ``ref`` (N_r x d).

    ``query_classes`` (N_q ints) gives each query's class c; ``ref_classes`` (N_r ints) groups
    the reference set (pass predicted labels, or true labels, as the experiment requires).
    ``variant``: ``sadl`` or ``centroid_knn`` (k nearest per class; a class with fewer than k
    usable reference points contributes the mean of all of them). ``self_index`` (N_q ints or
    None): reference row of each query, excluded from that query's computation (leave-one-out);
    pass ``np.arange(N)`` when the query set is the reference set.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {list(VARIANTS)}, got {variant!r}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k: expected an integer >= 1, got {k!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected an integer >= 1, got {chunk_size!r}")
    q = _as_activations("query", query)
    r = _as_activations("ref", ref)
    if q.shape[1] != r.shape[1]:
        raise ValueError(f"query and ref: activation dimensions differ ({q.shape[1]} vs {r.shape[1]})")
    if len(r) == 0:
        raise ValueError("ref: the reference set is empty")
    qc = _as_index_array("query_classes", query_classes, len(q))
    rc = _as_index_array("ref_classes", ref_classes, len(r))
    if self_index is None:
        selfi = np.full(len(q), -1, dtype=np.int64)
    else:
        selfi = _as_index_array("self_index", self_index, len(q))
        if len(selfi) and (selfi.min() < 0 or selfi.max() >= len(r)):
            raise ValueError(f"self_index: expected reference rows in [0, {len(r)}), got values in "
                             f"[{selfi.min()}, {selfi.max()}]")
    ref_set = np.unique(rc)
    missing = np.setdiff1d(np.unique(qc), ref_set)
    if len(missing):
        raise ValueError(f"query_classes: class(es) {missing.tolist()} have no reference points "
                         f"(reference classes: {ref_set.tolist()})")
    if len(ref_set) < 2:
        raise ValueError(f"ref_classes: DSA needs at least 2 reference classes, got {ref_set.tolist()}")
    device = torch.device(device)
    n_q = len(q)
    if n_q == 0:
        empty_f, empty_i = np.zeros(0), np.zeros(0, dtype=np.int64)
        return DSAResult(empty_f, empty_f, empty_f, empty_i, empty_i, empty_i, variant, int(k))
    with torch.no_grad(), _highest_matmul_precision():
        space = _Space(q, r, device)
        if variant == "sadl":
            return _dsa_sadl(space, qc, rc, selfi, int(chunk_size), progress)
        return _dsa_centroid_knn(space, qc, rc, selfi, int(k), int(chunk_size), progress)


class _Groups:
    """The reference set sorted by class (stable, so ascending rows within a class): ``order``;
    class ``classes[j]`` occupies positions ``start[j]:end[j]`` of ``order``; ``pos[row]`` is a
    reference row's position in ``order``."""

    def __init__(self, rc: np.ndarray):
        self.order = np.argsort(rc, kind="stable")
        self.classes, self.start = np.unique(rc[self.order], return_index=True)
        self.end = np.r_[self.start[1:], len(rc)]
        self.pos = np.empty(len(rc), dtype=np.int64)
        self.pos[self.order] = np.arange(len(rc))
        self.index = {int(c): j for j, c in enumerate(self.classes)}

    def members(self, j: int) -> np.ndarray:
        return self.order[self.start[j]:self.end[j]]


def _dsa_sadl(space: _Space, qc, rc, selfi, chunk_size: int, progress: bool) -> DSAResult:
    n_q, n_r = len(qc), len(rc)
    g = _Groups(rc)

    # step 1 (Kim et al. Eq. 1): x_a = nearest reference point of the query's own class; one
    # class group at a time (only 1/#classes of all pairs is needed)
    index_a = np.full(n_q, -1, dtype=np.int64)
    dist_a2 = np.zeros(n_q)
    q_groups = {g.index[int(c)]: np.flatnonzero(qc == c) for c in np.unique(qc)}
    jobs = [(j, s, e) for j, qi in q_groups.items() for s, e in _row_chunks(len(qi), chunk_size)]
    colmat, colmat_class = None, None
    for j, s, e in tqdm(jobs, desc="DSA sadl: x_a", unit="chunk", disable=not progress):
        qi = q_groups[j][s:e]
        cols = g.members(j)
        if colmat_class != j:
            colmat, colmat_class = space.columns(cols), j
        own = (selfi[qi] >= 0) & (rc[np.maximum(selfi[qi], 0)] == g.classes[j])
        excl = np.where(own, g.pos[np.maximum(selfi[qi], 0)] - g.start[j], -1)
        if len(cols) == 1 and own.any():
            bad = int(qi[np.flatnonzero(own)[0]])
            raise ValueError(f"query {bad}: class {g.classes[j]} has no reference point other "
                             f"than the query itself")
        row, pos, d2 = _knn_block(space, space.q32a[qi], space.q[qi], space.qn[qi], cols, excl, 1,
                                  need_dist=True, colmat=colmat)
        index_a[qi[row]] = cols[pos]
        dist_a2[qi[row]] = d2

    # step 2 (Kim et al. Eq. 2): dist_b from x_a to the nearest reference point of another class,
    # computed once per distinct (x_a, excluded row), against the whole reference set with x_a's
    # own class group masked (one large product instead of one per class). The query's own row
    # is excluded only when it lies in another class group (possible when query and reference
    # groupings differ).
    excl_row = np.where((selfi >= 0) & (rc[np.maximum(selfi, 0)] != qc), selfi, -1)
    pairs, inverse = np.unique(np.stack([index_a, excl_row], axis=1), axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    pair_j = np.array([g.index[int(c)] for c in rc[pairs[:, 0]]], dtype=np.int64)
    band_all = np.stack([g.start[pair_j], g.end[pair_j]], axis=1)
    n_usable = n_r - (band_all[:, 1] - band_all[:, 0]) - (pairs[:, 1] >= 0)
    if (n_usable < 1).any():
        bad = int(np.flatnonzero(inverse == np.flatnonzero(n_usable < 1)[0])[0])
        raise ValueError(f"query {bad}: no reference point of a class other than {qc[bad]} "
                         f"besides the query itself")
    index_b_pair = np.full(len(pairs), -1, dtype=np.int64)
    dist_b2_pair = np.zeros(len(pairs))
    colmat = space.columns(g.order)
    by_class = np.argsort(pair_j, kind="stable")      # rows of a chunk share few bands
    for s, e in tqdm(_row_chunks(len(pairs), chunk_size), desc="DSA sadl: dist_b", unit="chunk",
                     disable=not progress):
        pi = by_class[s:e]
        xa, ex = pairs[pi, 0], pairs[pi, 1]
        excl = np.where(ex >= 0, g.pos[np.maximum(ex, 0)], -1)
        row, pos, d2 = _knn_block(space, space.r32a[xa], space.r[xa], space.rn[xa], g.order, excl,
                                  1, need_dist=True, colmat=colmat, band=band_all[pi])
        index_b_pair[pi[row]] = g.order[pos]
        dist_b2_pair[pi[row]] = d2
    index_b = index_b_pair[inverse]
    dist_a = np.sqrt(dist_a2)
    dist_b = np.sqrt(dist_b2_pair[inverse])
    return DSAResult(_ratio(dist_a, dist_b), dist_a, dist_b, index_a, index_b, rc[index_b], "sadl", 1)


def _dsa_centroid_knn(space: _Space, qc, rc, selfi, k: int, chunk_size: int,
                      progress: bool) -> DSAResult:
    n_q = len(qc)
    g = _Groups(rc)
    n_cls = len(g.classes)
    # dist_to_mean[i, j]: distance from query i to the mean of its k nearest class-j points
    dist_to_mean = np.full((n_q, n_cls), np.inf)
    colmat = space.columns(g.order)
    for s, e in tqdm(_row_chunks(n_q, chunk_size), desc=f"DSA centroid_knn (k={k})", unit="chunk",
                     disable=not progress):
        qi = np.arange(s, e)
        block = space.screen(space.q32a[qi], colmat)        # all classes in one product
        for j in range(n_cls):
            cols = g.members(j)
            own = (selfi[qi] >= 0) & (rc[np.maximum(selfi[qi], 0)] == g.classes[j])
            excl = np.where(own, g.pos[np.maximum(selfi[qi], 0)] - g.start[j], -1)
            row, pos, _ = _knn_block(space, space.q32a[qi], space.q[qi], space.qn[qi], cols, excl,
                                     k, need_dist=False, block=block[:, g.start[j]:g.end[j]])
            if len(row) == 0:
                continue  # the class's only point is the query itself: no mean (inf distance)
            # mean of the selected reference activations per row (fewer than k when the group is
            # smaller), then the exact distance from the query to it
            has, means = _row_means(space.r, row, cols[pos])
            diff = space.q[qi[has]] - means
            dist_to_mean[qi[has], j] = np.sqrt(np.einsum("ij,ij->i", diff, diff))
        del block
    own_col = np.array([g.index[int(c)] for c in qc], dtype=np.int64)
    ar = np.arange(n_q)
    dist_a = dist_to_mean[ar, own_col]
    if np.isinf(dist_a).any():
        bad = int(np.flatnonzero(np.isinf(dist_a))[0])
        raise ValueError(f"query {bad}: class {qc[bad]} has no reference point other than the query itself")
    other = dist_to_mean.copy()
    other[ar, own_col] = np.inf
    j_b = other.argmin(axis=1)
    dist_b = other[ar, j_b]
    if np.isinf(dist_b).any():
        bad = int(np.flatnonzero(np.isinf(dist_b))[0])
        raise ValueError(f"query {bad}: no other class has a reference point besides the query itself")
    minus = np.full(n_q, -1, dtype=np.int64)
    return DSAResult(_ratio(dist_a, dist_b), dist_a, dist_b, minus, minus.copy(),
                     g.classes.astype(np.int64)[j_b], "centroid_knn", k)


def _ratio(dist_a: np.ndarray, dist_b: np.ndarray) -> np.ndarray:
    """dist_a / dist_b, with inf where dist_b is 0 (maximal surprise, also for 0/0)."""
    out = np.full(len(dist_a), np.inf)
    ok = dist_b > 0
    out[ok] = dist_a[ok] / dist_b[ok]
    return out
