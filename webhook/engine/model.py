"""The model: sparse item-to-item scores learned from weighted, time-ordered histories.

Two sparse item×item matrices, each pruned to the top ``k`` neighbours of every item:

* ``similar`` — co-occurrence in users' histories, cosine-normalised (implicit's
  ``CosineRecommender`` computes the top-k all-pairs product in C++), over a user×item
  matrix whose cells are the summed event weights (a purchase says more than a view);
* ``following`` — what users interacted with next: for each user's time-ordered history,
  item ``a`` → each of the next ``window`` items, weighted ``decay**(distance-1)`` and by the
  event weight of the later one; rows normalised by the popularity of ``a`` (a damped
  conditional probability), so a popular item does not drown everything it precedes.

At request time a user's *current* history (read from the store, so a new interaction counts
at once) is turned into scores: each past item contributes its ``similar`` row, weighted by
its event weight and by how recent it is (the latest weighs most), and the latest few items
contribute their ``following`` rows. Popularity (recency-decayed) breaks ties and fills the
list. No dense item×item matrix is ever built, so memory grows with the number of
neighbours kept, not with the square of the catalogue.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import scipy.sparse as sp

from ..popularity import decayed_popularity

# The one event-weight table of the service (popularity, the engine, its training);
# ENGINE_EVENT_WEIGHTS overrides and extends it.
DEFAULT_EVENT_WEIGHTS: dict[str, float] = {
    "Product Viewed": 1.0,
    "Viewed Product": 1.0,
    "Product Clicked": 2.0,
    "Clicked Product": 2.0,
    "Product Added": 3.0,
    "Added Product": 3.0,
    "Product Added to Wishlist": 3.0,
    "Added Product to Wishlist": 3.0,
    "Order Completed": 5.0,
    "Completed Order": 5.0,
}
UNKNOWN_EVENT_WEIGHT = 1.0


def event_weights(configured: Sequence[tuple[str, float]] = ()) -> dict[str, float]:
    """The defaults, overridden (and extended) by the configured ``(event, weight)`` pairs."""
    weights = dict(DEFAULT_EVENT_WEIGHTS)
    weights.update(dict(configured))
    return weights


@dataclass(frozen=True)
class Params:
    """Hyper-parameters; the defaults were chosen on a validation split carved from the
    training part of MovieLens-100k (see docs/engine.md)."""

    neighbours: int = 100  # kept per item in `similar`
    following_neighbours: int = 100  # kept per item in `following`
    window: int = 8  # how many later items an item "leads to"
    window_decay: float = 0.8  # weight of the d-th later item: decay**(d-1)
    following_damping: float = 0.5  # row normalisation: count(a) ** damping
    history: int = 100  # of those an answer reads, the latest this many score
    recency: float = 0.8  # weight of the j-th most recent item: recency**j
    following_recency: float = 0.8  # the same, for `following` (the very latest matters)
    following_weight: float = 2.0  # mix of `following` into the score
    popularity_weight: float = 1e-3  # tie-breaker; fills the list
    popularity_half_life_days: float = 30.0
    max_cell_weight: float = 10.0  # a user×item cell is capped (repeated views)


@dataclass
class Model:
    item_ids: np.ndarray  # object array of item id strings, index = item number
    similar: sp.csr_matrix  # items × items, top-k per row
    following: sp.csr_matrix  # items × items, top-k per row
    popularity: np.ndarray  # float32 per item, max 1
    params: Params = field(default_factory=Params)
    stats: dict = field(default_factory=dict)
    _index: dict | None = field(default=None, repr=False)

    @property
    def index(self) -> dict[str, int]:
        if self._index is None:
            self._index = {item: i for i, item in enumerate(self.item_ids.tolist())}
        return self._index

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    # -- scoring -----------------------------------------------------------------------

    def score_history(self, history: Sequence[tuple[int, float]]) -> np.ndarray:
        """Scores of every item for a history of (item number, event weight), oldest first
        (items the model does not know already removed)."""
        p = self.params
        scores = p.popularity_weight * self.popularity.astype(np.float32, copy=True)
        if not history:
            return scores
        history = list(history)[-p.history :]
        n = len(history)
        items = np.fromiter((h[0] for h in history), dtype=np.int64, count=n)
        weights = np.fromiter((h[1] for h in history), dtype=np.float32, count=n)
        age = np.arange(n - 1, -1, -1, dtype=np.float32)  # 0 = the latest
        a_sim = weights * np.power(np.float32(p.recency), age)
        a_fol = weights * np.power(np.float32(p.following_recency), age)
        scores += _weighted_rows(self.similar, items, a_sim, self.n_items)
        if p.following_weight:
            scores += p.following_weight * _weighted_rows(
                self.following, items, a_fol, self.n_items
            )
        return scores

    def score_item(self, item: int) -> np.ndarray:
        p = self.params
        scores = p.popularity_weight * self.popularity.astype(np.float32, copy=True)
        one = np.array([item]), np.array([1.0], dtype=np.float32)
        scores += _weighted_rows(self.similar, *one, self.n_items)
        scores += p.following_weight * _weighted_rows(self.following, *one, self.n_items)
        return scores

    # -- persistence -------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        arrays: dict[str, np.ndarray] = {
            "item_ids": np.array(self.item_ids.tolist(), dtype=np.str_),
            "popularity": self.popularity,
            **_csr_arrays("similar", self.similar),
            **_csr_arrays("following", self.following),
            "params": np.array(_json(asdict(self.params))),
            "stats": np.array(_json(self.stats)),
        }
        np.savez(buffer, **arrays)  # type: ignore[arg-type]  # numpy's stub: allow_pickle
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, blob: bytes) -> Model:
        import json

        with np.load(io.BytesIO(blob), allow_pickle=False) as data:
            item_ids = data["item_ids"].astype(object)
            n = len(item_ids)
            known = {f for f in Params.__dataclass_fields__}
            params = Params(
                **{k: v for k, v in json.loads(str(data["params"])).items() if k in known}
            )
            return cls(
                item_ids=item_ids,
                similar=_csr_from(data, "similar", n),
                following=_csr_from(data, "following", n),
                popularity=data["popularity"].astype(np.float32),
                params=params,
                stats=json.loads(str(data["stats"])),
            )


def _json(value) -> str:
    import json

    return json.dumps(value, sort_keys=True, default=float)


def _csr_arrays(name: str, m: sp.csr_matrix) -> dict[str, np.ndarray]:
    return {
        f"{name}_indptr": m.indptr.astype(np.int64),
        f"{name}_indices": m.indices.astype(np.int32),
        f"{name}_data": m.data.astype(np.float32),
    }


def _csr_from(data, name: str, n: int) -> sp.csr_matrix:
    return sp.csr_matrix(
        (data[f"{name}_data"], data[f"{name}_indices"], data[f"{name}_indptr"]), shape=(n, n)
    )


def _weighted_rows(m: sp.csr_matrix, rows: np.ndarray, weights: np.ndarray, n: int) -> np.ndarray:
    """sum_j weights[j] * m[rows[j]] as a dense vector, touching only those rows."""
    out = np.zeros(n, dtype=np.float32)
    indptr, indices, data = m.indptr, m.indices, m.data
    starts, ends = indptr[rows], indptr[rows + 1]
    lengths = ends - starts
    total = int(lengths.sum())
    if total == 0:
        return out
    # Gather every touched row at once, then one scatter-add.
    offsets = np.repeat(starts - np.concatenate(([0], np.cumsum(lengths)[:-1])), lengths)
    positions = np.arange(total) + offsets
    np.add.at(out, indices[positions], data[positions] * np.repeat(weights, lengths))
    return out


# -- training ---------------------------------------------------------------------------


@dataclass
class Interactions:
    """Training input: one row per interaction, already resolved to a person."""

    users: np.ndarray  # int per row (person number)
    items: np.ndarray  # int per row (item number)
    weights: np.ndarray  # float32 per row (event weight)
    times: np.ndarray  # float64 per row (epoch seconds)
    item_ids: np.ndarray  # object array: item number → item id
    n_users: int

    @property
    def n_items(self) -> int:
        return len(self.item_ids)


TOP_K_BLOCK = 4_000_000  # matrix entries ranked at a time when pruning rows to top k


def _top_k_rows(m: sp.csr_matrix, k: int, block: int = TOP_K_BLOCK) -> sp.csr_matrix:
    """Keep the k largest entries of every row (ties: the lower column). Vectorised over
    blocks of rows holding about ``block`` entries, so the sort's scratch memory is bounded
    whatever the matrix's size."""
    m = m.tocsr()
    m.sum_duplicates()
    lengths = np.diff(m.indptr)
    if lengths.size == 0 or lengths.max(initial=0) <= k:
        m.eliminate_zeros()
        return m
    kept = np.minimum(lengths, k)
    indptr = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(kept, out=indptr[1:])
    indices = np.empty(int(indptr[-1]), dtype=np.int32)
    data = np.empty(int(indptr[-1]), dtype=m.data.dtype)
    row, n_rows = 0, m.shape[0]
    while row < n_rows:
        end = int(np.searchsorted(m.indptr, m.indptr[row] + block, side="right")) - 1
        end = min(max(end, row + 1), n_rows)
        a, b = int(m.indptr[row]), int(m.indptr[end])
        block_lengths = lengths[row:end]
        rows = np.repeat(np.arange(end - row, dtype=np.int32), block_lengths)
        values = m.data[a:b]
        order = np.lexsort((-values, rows))  # by row, then by value descending
        rank = np.arange(b - a) - np.repeat(m.indptr[row:end] - a, block_lengths)
        chosen = np.sort(order[rank < k])  # row by row, columns ascending
        indices[indptr[row] : indptr[end]] = m.indices[a:b][chosen]
        data[indptr[row] : indptr[end]] = values[chosen]
        row = end
    pruned = sp.csr_matrix((data, indices, indptr), shape=m.shape)
    pruned.eliminate_zeros()
    return pruned


def train(data: Interactions, params: Params = Params(), now: float | None = None) -> Model:
    """Fit the model. Memory: the interactions as arrays (int32/float32), the user×item
    matrix, implicit's top-k product, and the transition pairs of one distance at a time
    summed into a sparse matrix; nothing items×items dense, no Python object per row."""
    p = params
    n_items, n_users = data.n_items, data.n_users
    users = np.asarray(data.users, dtype=np.int32)
    items = np.asarray(data.items, dtype=np.int32)
    weights = np.asarray(data.weights, dtype=np.float32)
    times = np.asarray(data.times, dtype=np.float64)
    stats: dict[str, float] = {
        "interactions": int(len(items)),
        "users": int(n_users),
        "items": int(n_items),
    }

    # Popularity: the service's one algorithm (webhook/popularity.py), decayed with age
    # relative to the newest interaction.
    latest = float(times.max()) if len(times) else 0.0
    popularity = decayed_popularity(
        items, weights, times, n_items, half_life_days=p.popularity_half_life_days
    ).astype(np.float32)
    similar = _similar(users, items, weights, n_users, n_items, p)
    following = _following(users, items, weights, times, n_items, p)
    stats.update(
        similar_nnz=int(similar.nnz), following_nnz=int(following.nnz), latest_interaction=latest
    )
    return Model(
        item_ids=np.asarray(data.item_ids, dtype=object),
        similar=similar.astype(np.float32),
        following=following.astype(np.float32),
        popularity=popularity,
        params=p,
        stats=stats,
    )


def _similar(users, items, weights, n_users: int, n_items: int, p: Params) -> sp.csr_matrix:
    """Cosine over the capped, weighted user×item matrix, top-k by implicit."""
    from implicit.nearest_neighbours import ItemItemRecommender, normalize

    if not n_items:
        return sp.csr_matrix((0, 0), dtype=np.float32)
    user_items = sp.csr_matrix((weights, (users, items)), shape=(n_users, n_items))
    user_items.sum_duplicates()
    np.minimum(user_items.data, p.max_cell_weight, out=user_items.data)
    # implicit's CosineRecommender, with the normalised matrix handed over as CSR.
    knn = ItemItemRecommender(K=p.neighbours + 1, num_threads=0)
    normalised = normalize(user_items.T).T.tocsr()
    del user_items
    knn.fit(normalised, show_progress=False)
    del normalised
    similar = knn.similarity.tocsr().astype(np.float32)
    similar.setdiag(0)
    similar.eliminate_zeros()
    return _top_k_rows(similar, p.neighbours)


def _following(users, items, weights, times, n_items: int, p: Params) -> sp.csr_matrix:
    """Item → later items in each user's time-ordered history."""
    order = np.lexsort((times, users))
    users, items, weights = users[order], items[order], weights[order]
    del order
    # Drop immediate repeats of the same item by the same user (a view, then a purchase).
    repeat = np.zeros(len(items), dtype=bool)
    repeat[1:] = (users[1:] == users[:-1]) & (items[1:] == items[:-1])
    if repeat.any():
        # Keep the stronger event of a repeat run on the row that stays.
        keep = ~repeat
        run = np.cumsum(keep) - 1
        strongest = np.zeros(int(keep.sum()), dtype=np.float32)
        np.maximum.at(strongest, run, weights)
        users, items, weights = users[keep], items[keep], strongest
        del keep, run
    del repeat
    following = sp.csr_matrix((n_items, n_items), dtype=np.float32)
    if not n_items:
        return following
    # One distance at a time, summed: at most one distance's pairs in memory at once.
    for distance in range(1, p.window + 1):
        same = users[distance:] == users[:-distance]
        r, c = items[:-distance][same], items[distance:][same]
        v = weights[distance:][same] * np.float32(p.window_decay ** (distance - 1))
        keep = r != c
        following = following + sp.csr_matrix(
            (v[keep], (r[keep], c[keep])), shape=(n_items, n_items)
        )
        del same, r, c, v, keep
    following.sum_duplicates()
    counts = np.bincount(items, minlength=n_items).astype(np.float32)
    scale = 1.0 / np.power(np.maximum(counts, 1.0), p.following_damping)
    following.data *= np.repeat(scale.astype(np.float32), np.diff(following.indptr))
    # Comparable to cosine: rescale rows' maxima into [0, 1] over the whole matrix.
    if following.nnz:
        following.data /= following.data.max()
    return _top_k_rows(following, p.following_neighbours)


def top_n(scores: np.ndarray, n: int, banned: np.ndarray | None = None) -> np.ndarray:
    """Item numbers of the n best scores, best first, never a banned one."""
    if banned is not None and len(banned):
        scores = scores.copy()
        scores[banned] = -np.inf
    n = min(n, len(scores))
    if n <= 0:
        return np.empty(0, dtype=np.int64)
    part = np.argpartition(-scores, n - 1)[:n]
    part = part[np.argsort(-scores[part], kind="stable")]
    return part[np.isfinite(scores[part])]
