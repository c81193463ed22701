"""Offline evaluation: temporal hold-out, recall@k and NDCG@k, four baselines and the engine.

``run_evaluation`` is what ``flask --app webhook evaluate`` prints. For each user, the most
recent ``holdout`` share of their interactions is held out; everything earlier goes into a
fresh store through ``Ingestor.ingest`` (the webhook's own code), the engine trains from
that store the way it does in production, and answers through ``LocalRecommender``. The
baselines learn from the same stored interactions. Ranking is over the full catalogue with
the user's already-seen items excluded.

Hyper-parameters (the engine's and the baselines') are chosen on a validation split carved
out of the training part alone: the last ``holdout`` share of each user's *training*
interactions. The test hold-out is looked at once, for the final figures.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC
from typing import Any

import numpy as np
import scipy.sparse as sp

from .model import Interactions, Params, top_n
from .model import train as train_model

ML100K_WHEEL = "recbole==1.2.1"
ML100K_MEMBER = "recbole/dataset_example/ml-100k/ml-100k.inter"


# -- data -------------------------------------------------------------------------------


@dataclass
class Ratings:
    users: list[str]
    items: list[str]
    times: list[float]


def cache_dir() -> str:
    path = os.environ.get("ENGINE_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "segment-webhook"
    )
    os.makedirs(path, exist_ok=True)
    return path


def ml100k_path() -> str:
    """The extracted ``ml-100k.inter``, downloaded once (``pip download`` of the wheel that
    ships it) into the cache folder. The data is never copied into the repository."""
    target = os.path.join(cache_dir(), "ml-100k.inter")
    if os.path.exists(target):
        return target
    import subprocess
    import sys

    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--quiet",
                ML100K_WHEEL,
                "-d",
                tmp,
            ],
            check=True,
        )
        wheel = next(os.path.join(tmp, f) for f in os.listdir(tmp) if f.endswith(".whl"))
        with zipfile.ZipFile(wheel) as z:
            data = z.read(ML100K_MEMBER)
    with open(target + ".part", "wb") as out:
        out.write(data)
    os.replace(target + ".part", target)
    return target


def read_ml100k(path: str) -> Ratings:
    """The interactions of an ml-100k.inter file: a header line, then tab-separated user,
    item, rating and timestamp; lines of fewer fields are passed over. A timestamp that is
    not a number is a ValueError naming its line."""
    users, items, times = [], [], []
    with open(path, encoding="utf-8") as f:
        next(f, None)  # header
        for number, line in enumerate(f, start=2):
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 4:
                continue
            try:
                times.append(float(parts[3]))
            except ValueError:
                raise ValueError(f"line {number}: the timestamp is not a number") from None
            users.append(parts[0])
            items.append(parts[1])
    return Ratings(users, items, times)


def temporal_split(
    users: np.ndarray, times: np.ndarray, holdout: float
) -> tuple[np.ndarray, np.ndarray]:
    """Row masks (train, test): each user's latest ``holdout`` share (at least one, and at
    least one left for training) is test. Ties in time keep the input order."""
    users_arr = np.asarray(users)
    order = np.lexsort((np.arange(len(times)), np.asarray(times, dtype=float), users_arr))
    test = np.zeros(len(times), dtype=bool)
    sorted_users = users_arr[order]
    boundaries = np.flatnonzero(sorted_users[1:] != sorted_users[:-1]) + 1
    for chunk in np.split(order, boundaries):
        n = len(chunk)
        if n < 2:
            continue
        k = min(n - 1, max(1, int(math.ceil(holdout * n))))
        test[chunk[n - k :]] = True
    return ~test, test


# -- metrics ----------------------------------------------------------------------------


def recall_ndcg(ranked: Sequence, relevant: set, k: int) -> tuple[float, float]:
    """recall@k = hits / min(k, |relevant|) (so 1.0 is reachable); NDCG@k, binary gains."""
    if not relevant:
        return 0.0, 0.0
    top = list(ranked)[:k]
    hits = [1.0 if item in relevant else 0.0 for item in top]
    dcg = sum(h / math.log2(i + 2) for i, h in enumerate(hits))
    ideal = sum(1.0 / math.log2(i + 2) for i in range(min(k, len(relevant))))
    return sum(hits) / min(k, len(relevant)), dcg / ideal


# -- baselines over a user×item matrix -------------------------------------------------

Scorer = Callable[[int], np.ndarray]  # user number → scores over item numbers


def popularity_scorer(x: sp.csr_matrix) -> Scorer:
    counts = np.asarray((x > 0).sum(axis=0)).ravel().astype(np.float32)
    return lambda u: counts


def als_scorer(
    x: sp.csr_matrix,
    factors: int = 64,
    regularization: float = 0.05,
    alpha: float = 1.0,
    iterations: int = 15,
) -> Scorer:
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, "blas"):  # implicit's advice: its own threads, not BLAS's
        return _als(x, factors, regularization, alpha, iterations, AlternatingLeastSquares)


def _als(x, factors, regularization, alpha, iterations, AlternatingLeastSquares) -> Scorer:
    model = AlternatingLeastSquares(
        factors=factors,
        regularization=regularization,
        alpha=alpha,
        iterations=iterations,
        random_state=42,
        num_threads=0,
    )
    model.fit(x, show_progress=False)
    users, items = np.asarray(model.user_factors), np.asarray(model.item_factors)
    return lambda u: items @ users[u]


def knn_scorer(x: sp.csr_matrix, k: int = 100) -> Scorer:
    import warnings

    from implicit.nearest_neighbours import CosineRecommender

    model = CosineRecommender(K=k, num_threads=0)
    with warnings.catch_warnings():  # implicit passes itself a COO matrix and warns
        warnings.simplefilter("ignore")
        model.fit(x, show_progress=False)
    sim = model.similarity.tocsr()
    return lambda u: np.asarray((x[u] @ sim).todense()).ravel()


def ease_scorer(x: sp.csr_matrix, lam: float = 500.0) -> Scorer:
    """EASE (Steck 2019): B = I - P·diag(1/diag(P)), P = (XᵀX + λI)⁻¹, diag(B) = 0. Dense
    items×items: fine for MovieLens, impossible at 50,000 items (20 GB)."""
    g = (x.T @ x).toarray().astype(np.float64)
    g[np.diag_indices_from(g)] += lam
    p = np.linalg.inv(g)
    b = -p / np.diag(p)
    b[np.diag_indices_from(b)] = 0.0
    return lambda u: np.asarray(x[u] @ b).ravel()


# -- the evaluation ---------------------------------------------------------------------


@dataclass
class Split:
    """Numbered interactions (sorted by user, time) and who holds what out."""

    users: np.ndarray
    items: np.ndarray
    times: np.ndarray
    item_ids: np.ndarray
    user_ids: np.ndarray


def number(ratings: Ratings) -> Split:
    user_ids, users = np.unique(np.asarray(ratings.users), return_inverse=True)
    item_ids, items = np.unique(np.asarray(ratings.items), return_inverse=True)
    return Split(
        users,
        items,
        np.asarray(ratings.times, dtype=float),
        item_ids.astype(object),
        user_ids.astype(object),
    )


def _matrix(users, items, n_users, n_items) -> sp.csr_matrix:
    x = sp.csr_matrix(
        (np.ones(len(users), dtype=np.float32), (users, items)), shape=(n_users, n_items)
    )
    x.data[:] = 1.0
    return x


def evaluate_scorers(
    scorers: dict[str, Scorer],
    train_x: sp.csr_matrix,
    test_users: np.ndarray,
    test_items: np.ndarray,
    k: int = 10,
) -> dict[str, tuple[float, float]]:
    relevant: dict[int, set] = {}
    for u, i in zip(test_users.tolist(), test_items.tolist()):
        relevant.setdefault(u, set()).add(i)
    results = {}
    for name, scorer in scorers.items():
        recalls, ndcgs = [], []
        for u, rel in relevant.items():
            seen = train_x.indices[train_x.indptr[u] : train_x.indptr[u + 1]]
            ranked = top_n(np.asarray(scorer(u), dtype=np.float64), k, seen)
            r, n = recall_ndcg(ranked.tolist(), rel, k)
            recalls.append(r)
            ndcgs.append(n)
        results[name] = (float(np.mean(recalls)), float(np.mean(ndcgs)))
    return results


def engine_scorer_in_memory(
    users, items, times, n_users, n_items, item_ids, params: Params
) -> Scorer:
    """The engine without the store (for tuning): same model, histories from arrays."""
    data = Interactions(
        users=users,
        items=items,
        weights=np.ones(len(users), dtype=np.float32),
        times=times,
        item_ids=item_ids,
        n_users=n_users,
    )
    model = train_model(data, params)
    order = np.lexsort((np.arange(len(times)), times, users))
    su, si = users[order], items[order]
    starts = np.searchsorted(su, np.arange(n_users + 1))

    def score(u: int) -> np.ndarray:
        hist = si[starts[u] : starts[u + 1]]
        return model.score_history([(int(i), 1.0) for i in hist])

    return score


def baseline_grid() -> dict[str, list[dict]]:
    return {
        "ALS": [
            dict(factors=f, regularization=r, alpha=a)
            for f in (32, 64, 128)
            for r in (0.01, 0.1)
            for a in (1.0, 10.0)
        ],
        "item-kNN": [dict(k=k) for k in (20, 50, 100, 200, 400)],
        "EASE": [dict(lam=lam) for lam in (50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0)],
    }


ENGINE_GRID: list[dict] = [
    dict(recency=r, following_recency=fr, following_weight=fw, window=w)
    for r in (0.7, 0.8, 0.9)
    for fr in (0.6, 0.8)
    for fw in (1.0, 2.0, 4.0)
    for w in (8,)
]


def tune(
    split: Split,
    train_mask: np.ndarray,
    holdout: float,
    k: int = 10,
    log: Callable[[str], None] = print,
    quick: bool = False,
) -> dict[str, dict]:
    """Pick every method's hyper-parameters on a validation split of the training part."""
    users, items, times = split.users[train_mask], split.items[train_mask], split.times[train_mask]
    fit_mask, val_mask = temporal_split(users, times, holdout)
    n_users, n_items = len(split.user_ids), len(split.item_ids)
    x_fit = _matrix(users[fit_mask], items[fit_mask], n_users, n_items)
    chosen: dict[str, dict] = {}
    factories: dict[str, Callable[..., Any]] = {
        "ALS": als_scorer,
        "item-kNN": knn_scorer,
        "EASE": ease_scorer,
    }
    grids = baseline_grid()
    for name, factory in factories.items():
        grid = grids[name][:2] if quick else grids[name]
        best: tuple[float, dict] | None = None
        for params in grid:
            res = evaluate_scorers(
                {name: factory(x_fit, **params)}, x_fit, users[val_mask], items[val_mask], k
            )[name]
            if best is None or res[0] > best[0]:
                best = (res[0], params)
        assert best is not None  # every grid has an entry
        chosen[name] = best[1]
        log(f"  validation {name}: {best[1]} recall@{k}={best[0]:.4f}")
    best = None
    for overrides in ENGINE_GRID[:2] if quick else ENGINE_GRID:
        engine_params = replace(Params(), **overrides)
        scorer = engine_scorer_in_memory(
            users[fit_mask],
            items[fit_mask],
            times[fit_mask],
            n_users,
            n_items,
            split.item_ids,
            engine_params,
        )
        res = evaluate_scorers({"engine": scorer}, x_fit, users[val_mask], items[val_mask], k)[
            "engine"
        ]
        if best is None or res[0] > best[0]:
            best = (res[0], overrides)
    assert best is not None
    chosen["engine"] = best[1]
    log(f"  validation engine: {best[1]} recall@{k}={best[0]:.4f}")
    return chosen


def rating_messages(
    users: Sequence, items: Sequence, times: Sequence[float], item_property: str = "product_id"
) -> Iterable[dict]:
    """Ratings as Segment track messages (every rating one implicit interaction)."""
    from datetime import datetime

    for n, (user, item, when) in enumerate(zip(users, items, times)):
        yield {
            "type": "track",
            "event": "Product Viewed",
            "userId": str(user),
            "messageId": f"eval-{n}",
            "timestamp": datetime.fromtimestamp(float(when), tz=UTC).isoformat(),
            "properties": {item_property: str(item)},
        }


def run_evaluation(
    ratings: Ratings,
    holdout: float = 0.2,
    k: int = 10,
    tune_params: bool = True,
    log: Callable[[str], None] = print,
    workdir: str | None = None,
    quick: bool = False,
    history_max: int | None = None,
) -> dict[str, tuple[float, float]]:
    """The whole evaluation; returns {method: (recall@k, NDCG@k)} on the test hold-out.
    ``history_max``: the engine's ENGINE_HISTORY_MAX (default: the setting's default)."""
    from .. import create_app
    from . import recommender_for
    from .importer import ImportReport, import_messages
    from .persistence import load_training_data
    from .service import train_once

    split = number(ratings)
    train_mask, test_mask = temporal_split(split.users, split.times, holdout)
    log(
        f"{len(split.users)} interactions, {len(split.user_ids)} users, "
        f"{len(split.item_ids)} items; held out (latest {holdout:.0%} of each user's): "
        f"{int(test_mask.sum())}"
    )
    chosen: dict[str, dict] = {}
    if tune_params:
        log("choosing hyper-parameters on a validation split of the training part:")
        chosen = tune(split, train_mask, holdout, k, log, quick)

    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        app = create_app(
            {
                "database_url": f"sqlite:///{tmp}/evaluate.db",
                # MovieLens is from 1998: keep it, whatever its age.
                "interaction_retention_days": 0.0,
                "engine_background_training": False,
                "engine_model_refresh_seconds": 0.001,
                **({"engine_history_max": history_max} if history_max else {}),
            }
        )
        services = app.extensions["segment"]
        try:
            started = time.perf_counter()
            report = import_messages(
                services.ingestor,
                rating_messages(
                    split.user_ids[split.users[train_mask]],
                    split.item_ids[split.items[train_mask]],
                    split.times[train_mask],
                    services.settings.item_id_properties[0],
                ),
                ImportReport(),
            )
            services.drain(["local"], timeout=600)
            log(
                f"ingested {report.interactions} training interactions through "
                f"Ingestor.ingest in {time.perf_counter() - started:.1f} s"
            )

            # Baselines: the same stored interactions, as a binary user×item matrix.
            data, people = load_training_data(services.store, {"Product Viewed": 1.0})
            x = _matrix(data.users, data.items, data.n_users, data.n_items)
            item_number = {item: i for i, item in enumerate(data.item_ids.tolist())}
            test_users = np.array(
                [people[str(u)] for u in split.user_ids[split.users[test_mask]]], dtype=np.int64
            )
            test_items_ids = split.item_ids[split.items[test_mask]]
            # An item never seen in training cannot be recommended by anyone: it still
            # counts as relevant (number -1 never matches), so recall is not flattered.
            test_items = np.array(
                [item_number.get(str(i), -1) for i in test_items_ids], dtype=np.int64
            )
            scorers: dict[str, Scorer] = {
                "popularity": popularity_scorer(x),
                "ALS (implicit)": als_scorer(x, **chosen.get("ALS", {})),
                "item-kNN cosine (implicit)": knn_scorer(x, **chosen.get("item-kNN", {})),
                "EASE": ease_scorer(x, **chosen.get("EASE", {})),
            }

            # The engine: trained from the store, answering through LocalRecommender.
            params = replace(Params(), **chosen.get("engine", {}))
            started = time.perf_counter()
            train_once(services.store, services.settings, params)
            log(f"engine trained in {time.perf_counter() - started:.1f} s with {params}")
            recommender = recommender_for(app)
            person_ids = {n: p for p, n in people.items()}
            n_items = data.n_items

            def engine(u: int) -> np.ndarray:
                answer = recommender.recommend(
                    user_id=person_ids[u], num_results=k, exclude_seen=True
                )
                scores = np.full(n_items, -np.inf)
                for rank, scored in enumerate(answer.items):
                    scores[item_number[scored.item_id]] = k - rank
                return scores

            scorers["engine"] = engine
            results = evaluate_scorers(scorers, x, test_users, test_items, k)
        finally:
            services.store.dispose()
    log("")
    log(f"{'method':<30} {'recall@' + str(k):>10} {'NDCG@' + str(k):>10}")
    for name, (recall, ndcg) in results.items():
        log(f"{name:<30} {recall:>10.4f} {ndcg:>10.4f}")
    best = max((v[0] for n, v in results.items() if n != "engine"), default=0.0)
    if best > 0:
        log(
            f"\nengine vs best baseline on recall@{k}: "
            f"{(results['engine'][0] / best - 1) * 100:+.1f} %"
        )
    return results
