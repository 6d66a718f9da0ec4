"""Spatial cross-validation of the candidate surfaces, the one-standard-error choice, and outlier screening.

* :class:`BlockKFold` — spatially blocked K-fold (as verde's ``BlockKFold``): stations are binned into square
  blocks ``block_size_km`` wide and whole blocks are dealt to folds, so a test station's neighbours are not in
  the training set and the score measures how well a surface predicts *between* stations.
* :func:`make_splitter` — leave-one-station-out (:class:`sklearn.model_selection.LeaveOneOut`) below
  ``loo_below`` stations, else :class:`BlockKFold`.
* :func:`cross_validate_candidates` — out-of-fold predictions of every candidate; score = weighted RMSE
  sqrt(Σw r²/Σw) with a standard error (delta method, over stations for LOO and over folds for block K-fold).
* :func:`select_model` — lowest CV RMSE (a non-smooth tree ensemble only when it beats the best smooth surface
  by more than one paired standard error); optionally the one-standard-error rule: the simplest candidate not
  worse than the best by more than one standard error of the paired per-station differences of the CV errors
  (complexity order: :func:`gpu_insar_adjust.adjust.models.candidate_complexity`).
* :func:`flag_outliers` — iterative MAD-scaled screening of stations that disagree with the surface of their
  neighbours (standardised leave-one-out residuals of a Gaussian-process surface, or of a plane for small
  sets).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
from sklearn.model_selection import BaseCrossValidator, LeaveOneOut

from ..errors import AdjustmentError
from . import models as _models

__all__ = ["BlockKFold", "make_splitter", "weighted_rmse", "CandidateScore", "cross_validate_candidates",
           "select_model", "flag_outliers"]


def _xy(X) -> np.ndarray:
    cols = _models.feature_columns(X, ("x_km", "y_km"))
    return np.column_stack([cols["x_km"], cols["y_km"]])


class BlockKFold(BaseCrossValidator):
    """K-fold over square spatial blocks of ``block_size_km`` (a scikit-learn splitter).

    Stations are binned into blocks; the blocks are shuffled and dealt to ``n_splits`` folds. With
    ``balance=True`` the dealing is repeated ``n_tries`` times and the deal whose folds hold the most even
    numbers of stations is kept (as in verde). ``X`` needs ``x_km``/``y_km`` columns (or those as its first two
    columns). Raises ``ValueError`` when there are fewer non-empty blocks than splits.
    """

    def __init__(self, block_size_km: float = 50.0, n_splits: int = 5, shuffle: bool = True,
                 random_state: int | None = 0, balance: bool = True, n_tries: int = 25):
        self.block_size_km = block_size_km
        self.n_splits = n_splits
        self.shuffle = shuffle
        self.random_state = random_state
        self.balance = balance
        self.n_tries = n_tries

    def block_labels(self, X) -> np.ndarray:
        """Block number of each station."""
        P = _xy(X)
        size = float(self.block_size_km)
        if not size > 0:
            raise ValueError(f"block_size_km must be positive, got {self.block_size_km}")
        ij = np.floor((P - P.min(axis=0)) / size).astype(np.int64)
        _, labels = np.unique(ij, axis=0, return_inverse=True)
        return labels.reshape(-1)

    def get_n_splits(self, X=None, y=None, groups=None) -> int:
        return int(self.n_splits)

    def _iter_test_indices(self, X=None, y=None, groups=None):
        labels = self.block_labels(X)
        blocks = np.unique(labels)
        k = int(self.n_splits)
        if k < 2:
            raise ValueError(f"n_splits must be at least 2, got {k}")
        if blocks.size < k:
            raise ValueError(f"Cannot split {blocks.size} spatial blocks into {k} folds; use smaller blocks or "
                             "fewer splits")
        rng = np.random.default_rng(self.random_state)
        counts = np.bincount(labels)
        best, best_spread = None, np.inf
        for _ in range(int(self.n_tries) if self.balance else 1):
            order = rng.permutation(blocks) if self.shuffle else blocks
            folds = np.array_split(order, k)
            sizes = np.array([counts[f].sum() for f in folds])
            spread = float(sizes.std())
            if spread < best_spread:
                best, best_spread = folds, spread
        for fold_blocks in best:
            yield np.flatnonzero(np.isin(labels, fold_blocks))


def make_splitter(X, *, cv: str = "auto", loo_below: int = 30, block_size_km: float | None = None,
                  n_splits: int = 5, random_state: int | None = 0):
    """The splitter for a frame's stations and a short description of it.

    ``cv="loo"`` → leave-one-station-out; ``"block"`` → :class:`BlockKFold`; ``"auto"`` → LOO below
    ``loo_below`` stations, else block K-fold. ``block_size_km=None`` uses 1.5 × the median nearest-neighbour
    spacing; the number of folds is reduced to the number of non-empty blocks when needed, and LOO is used
    when fewer than 3 blocks remain.
    """
    n = len(_xy(X))
    if cv not in ("auto", "loo", "block"):
        raise AdjustmentError(f"Unknown cross-validation scheme {cv!r}.", field="adjust.cv",
                              fix="use 'auto', 'loo' or 'block'")
    if cv == "loo" or (cv == "auto" and n < loo_below):
        return LeaveOneOut(), {"scheme": "leave-one-station-out", "n_splits": n}
    if block_size_km is None:
        from scipy.spatial import cKDTree

        P = _xy(X)
        d, _ = cKDTree(P).query(P, k=2)
        block_size_km = max(1.5 * float(np.median(d[:, 1])), 1e-3)
    probe = BlockKFold(block_size_km=block_size_km)
    n_blocks = int(np.unique(probe.block_labels(X)).size)
    if n_blocks < 3:
        return LeaveOneOut(), {"scheme": "leave-one-station-out", "n_splits": n,
                               "note": f"only {n_blocks} spatial blocks of {block_size_km:.1f} km"}
    k = min(int(n_splits), n_blocks)
    return (BlockKFold(block_size_km=block_size_km, n_splits=k, random_state=random_state),
            {"scheme": "spatial block K-fold", "n_splits": k, "block_size_km": float(block_size_km),
             "n_blocks": n_blocks})


def weighted_rmse(residuals, weights=None) -> float:
    """sqrt(Σ w r² / Σ w) (mm/yr); plain RMS without weights."""
    r = np.asarray(residuals, dtype=np.float64)
    w = np.ones_like(r) if weights is None else np.asarray(weights, dtype=np.float64)
    return float(math.sqrt(np.sum(w * r * r) / np.sum(w)))


@dataclass
class CandidateScore:
    """Cross-validation result of one candidate (mm/yr); ``skipped`` holds the reason when not scored."""

    name: str
    rmse: float = float("nan")
    se: float = float("nan")
    complexity: float = float("nan")
    n_folds: int = 0
    skipped: str | None = None
    oof_residual: list = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("oof_residual")
        for k in ("rmse", "se", "complexity"):
            d[k] = None if not np.isfinite(d[k]) else round(float(d[k]), 4)
        return d


def _rmse_and_se(r: np.ndarray, w: np.ndarray, folds: list[np.ndarray], per_station: bool) -> tuple[float, float]:
    wn = w / np.mean(w)
    mse = float(np.sum(wn * r * r) / np.sum(wn))
    if per_station:  # LOO: stations are the replicates
        terms = wn * r * r / np.mean(wn)
        se_mse = float(np.std(terms, ddof=1) / math.sqrt(len(r))) if len(r) > 1 else float("nan")
    else:  # block K-fold: folds are the replicates
        fm = np.array([np.sum(wn[f] * r[f] ** 2) / np.sum(wn[f]) for f in folds])
        se_mse = float(np.std(fm, ddof=1) / math.sqrt(len(fm))) if len(fm) > 1 else float("nan")
    rmse = math.sqrt(mse)
    return rmse, (se_mse / (2.0 * rmse) if rmse > 0 else 0.0)


def cross_validate_candidates(X, y, sample_weight=None, *, candidates=_models.DEFAULT_CANDIDATES, splitter=None,
                              min_stations: dict | None = None, available_features=None) -> dict[str, CandidateScore]:
    """Out-of-fold weighted RMSE (± SE) of each candidate; candidates that cannot be scored are skipped.

    A candidate is skipped (``score.skipped`` says why) when the frame has fewer stations than its minimum
    (:func:`~gpu_insar_adjust.adjust.models.candidate_min_stations`, overridable by ``min_stations``), when a
    feature it needs is unavailable, or when it cannot be fitted on some training fold (e.g. collinear stations
    for a plane).
    """
    y = np.asarray(y, dtype=np.float64)
    n = len(y)
    w = np.ones(n) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    if splitter is None:
        splitter, _ = make_splitter(X)
    splits = list(splitter.split(X, y))
    per_station = isinstance(splitter, LeaveOneOut)
    available = set(_models.FEATURES if available_features is None else available_features)
    mins = dict(min_stations or {})
    scores: dict[str, CandidateScore] = {}
    Xi = X.reset_index(drop=True) if hasattr(X, "reset_index") else np.asarray(X)
    for name in candidates:
        sc = CandidateScore(name=name, complexity=_models.candidate_complexity(name))
        scores[name] = sc
        need = _models.candidate_features(name)
        missing = [f for f in need if f not in available]
        if missing:
            sc.skipped = f"feature(s) {', '.join(missing)} not available in this frame"
            continue
        nmin = int(mins.get(name, _models.candidate_min_stations(name)))
        if n < nmin:
            sc.skipped = f"{n} stations < {nmin} needed"
            continue
        oof = np.full(n, np.nan)
        try:
            for train, test in splits:
                model = _models.make_candidate(name)
                sub = Xi.iloc[train] if hasattr(Xi, "iloc") else Xi[train]
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model.fit(sub, y[train], None if sample_weight is None else w[train])
                oof[test] = model.predict(Xi.iloc[test] if hasattr(Xi, "iloc") else Xi[test])
        except (AdjustmentError, np.linalg.LinAlgError, ValueError) as exc:
            first = str(exc).splitlines()[0]
            sc.skipped = f"not determined on a training fold: {first}"
            continue
        if not np.all(np.isfinite(oof)):
            sc.skipped = "non-finite out-of-fold predictions"
            continue
        r = y - oof
        sc.rmse, sc.se = _rmse_and_se(r, w, [t for _, t in splits], per_station)
        sc.n_folds = len(splits)
        sc.oof_residual = r.tolist()
    return scores


def _paired_se(a: CandidateScore, b: CandidateScore, w: np.ndarray | None) -> tuple[float, float] | None:
    """Mean and standard error of the per-station difference of weighted squared CV errors, a minus b.

    Both candidates were scored on the same stations and folds, so most of the station-to-station spread of
    the CV error (station noise, an unlucky station) is common to both and cancels in the difference; this SE
    is far tighter than the SE of either score. None when the out-of-fold residuals are not available.
    """
    ra, rb = np.asarray(a.oof_residual, dtype=np.float64), np.asarray(b.oof_residual, dtype=np.float64)
    if ra.size < 3 or ra.shape != rb.shape:
        return None
    wn = np.ones_like(ra) if w is None or len(w) != ra.size else np.asarray(w, dtype=np.float64) / np.mean(w)
    d = wn * (ra * ra - rb * rb)
    return float(np.mean(d)), float(np.std(d, ddof=1) / math.sqrt(d.size))


def _paired_or_unpaired_within(s: CandidateScore, best: CandidateScore, w, paired: bool):
    """(within one SE of ``best``?, paired test (mean, SE) or None) for candidate ``s``."""
    t = _paired_se(s, best, w) if (paired and s is not best) else None
    if t is not None:
        return t[0] <= t[1], t
    se = best.se if np.isfinite(best.se) else 0.0
    return (s is best or s.rmse <= best.rmse + se), None


def select_model(scores: dict[str, CandidateScore], *, one_se_rule: bool = False, sample_weight=None,
                 paired: bool = True) -> tuple[str, str]:
    """Name of the chosen candidate and why.

    Default: the candidate with the lowest CV RMSE (the estimate of prediction error at unseen stations), except
    that a surface which is not smooth (a tree ensemble: piecewise constant, its steps between stations are
    never tested by the CV) is replaced by the best smooth candidate when that one is not worse by more than one
    standard error.

    With ``one_se_rule`` the simplest candidate (complexity order:
    :func:`gpu_insar_adjust.adjust.models.candidate_complexity`) that is not worse than the best by more than one
    standard error is chosen instead. With ``paired`` (default) and the out-of-fold residuals at hand, "worse" is
    judged on the per-station differences of the weighted squared CV errors (mean difference ≤ its SE; the
    stations are shared, so their common noise cancels). Without residuals the unpaired rule (RMSE ≤ best RMSE +
    best SE) is used. With 10-30 stations the rule is costly: the SE of the CV difference is then wide enough to
    keep an offset or a plane whose CV error is 15-30 % above that of a curved surface (docs/adjustment.md).
    Raises :class:`AdjustmentError` when nothing was scored.
    """
    scored = [s for s in scores.values() if s.skipped is None and np.isfinite(s.rmse)]
    if not scored:
        raise AdjustmentError("No candidate could be cross-validated.", field="adjust.candidates",
                              fix="add stations, or include poly0/poly1 among the candidates")
    best = min(scored, key=lambda s: (s.rmse, s.complexity))
    se = best.se if np.isfinite(best.se) else 0.0
    w = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    if not one_se_rule:
        if not _models.candidate_is_smooth(best.name):
            smooth = [s for s in scored if _models.candidate_is_smooth(s.name)]
            if smooth:
                alt = min(smooth, key=lambda s: (s.rmse, s.complexity))
                ok, t = _paired_or_unpaired_within(alt, best, w, paired)
                if ok:
                    how = (f"mean squared difference {t[0]:.2f} ± {t[1]:.2f} (mm/yr)²" if t is not None
                           else f"within {best.rmse:.2f} + {se:.2f} mm/yr")
                    return alt.name, (f"lowest CV RMSE among smooth surfaces ({alt.rmse:.2f} mm/yr); the "
                                      f"non-smooth {best.name} ({best.rmse:.2f} mm/yr) is not better by more than "
                                      f"one SE ({how})")
        return best.name, f"lowest CV RMSE {best.rmse:.2f} ± {se:.2f} mm/yr"
    within, tests = [], {}
    for s in scored:
        ok, t = _paired_or_unpaired_within(s, best, w, paired)
        if t is not None:
            tests[s.name] = t
        if ok:
            within.append(s)
    chosen = min(within, key=lambda s: (s.complexity, s.rmse))
    if chosen.name == best.name:
        return chosen.name, f"lowest CV RMSE {best.rmse:.2f} ± {se:.2f} mm/yr and no simpler candidate within one SE"
    if chosen.name in tests:
        d, sd = tests[chosen.name]
        return chosen.name, (f"simplest candidate not worse than the best ({best.name}: {best.rmse:.2f} mm/yr) by "
                             f"more than one paired SE: {chosen.name} scored {chosen.rmse:.2f} mm/yr, mean squared "
                             f"difference {d:.2f} ± {sd:.2f} (mm/yr)²")
    return chosen.name, (f"simplest candidate within one SE of the best ({best.name}: {best.rmse:.2f} ± {se:.2f} "
                         f"mm/yr); {chosen.name} scored {chosen.rmse:.2f} mm/yr")


def _hat_plane(P: np.ndarray, w: np.ndarray) -> np.ndarray:
    A = np.column_stack([np.ones(len(P)), P - P.mean(axis=0)])
    if len(P) < 3 or np.linalg.matrix_rank(A) < 3:
        A = A[:, :1]
    Aw = A * w[:, None]
    return A @ np.linalg.solve(A.T @ Aw, Aw.T)


def _gp_standardized_loo(X, y: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Leave-one-out residuals of a GP surface and their standardised values (closed form).

    For a GP with covariance K (signal + nugget + station variances), the LOO residual is
    e_i = [K⁻¹r]_i / [K⁻¹]_ii with variance 1/[K⁻¹]_ii, r the residual from the trend; an isolated station or
    one on a rough part of the field therefore gets a larger allowance than one among close neighbours.
    """
    m = _models.GaussianProcessSurface(n_restarts_optimizer=0).fit(X, y, w)
    r = y - m.trend_.predict(X)
    a = m.K_inv_ @ r
    d = np.diag(m.K_inv_)
    return a / d, a / np.sqrt(d)


def flag_outliers(X, y, sample_weight=None, *, threshold: float = 3.5, max_fraction: float = 0.2,
                  min_stations_gp: int = 10) -> tuple[np.ndarray, list[dict]]:
    """Stations that disagree with the surface of their neighbours (e.g. unstable monuments).

    Each round fits a Gaussian-process surface on a plane trend (≥ ``min_stations_gp`` stations; else a
    weighted plane) and forms each station's leave-one-out residual standardised by its own predictive σ
    (closed form, no refits). These are scaled robustly, z_i = (t_i − median t)/(1.4826·MAD t); the single worst
    station with |z| > ``threshold`` is removed and the round repeats (one at a time, because an outlier also
    distorts its neighbours' residuals and the fitted covariance), up to ``max_fraction`` of the stations.
    Fewer than 5 stations are not screened. A single station sampling a feature that none of its neighbours
    sees cannot be told from a bad monument; such stations may be flagged, and are named in the report.

    Returns ``keep`` (bool per station) and one dict per flagged station: ``index``, ``robust_z``,
    ``loo_residual`` (mm/yr), ``surface`` (the model used).
    """
    y = np.asarray(y, dtype=np.float64)
    n = len(y)
    w = np.ones(n) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    Xi = X.reset_index(drop=True) if hasattr(X, "reset_index") else np.asarray(X)
    P = _xy(X)
    keep = np.ones(n, dtype=bool)
    flagged: list[dict] = []
    max_out = int(math.floor(max_fraction * n))
    while len(flagged) < max_out:
        idx = np.flatnonzero(keep)
        if idx.size < 5:
            break
        wk, yk = w[idx], y[idx]
        e = t = None
        surface = "plane"
        if idx.size >= min_stations_gp:
            sub = Xi.iloc[idx] if hasattr(Xi, "iloc") else Xi[idx]
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    e, t = _gp_standardized_loo(sub, yk, wk if sample_weight is not None else None)
                surface = "gaussian process"
            except (AdjustmentError, np.linalg.LinAlgError, ValueError):
                e = None
        if e is None:
            try:
                H = _hat_plane(P[idx], wk / np.mean(wk))
            except np.linalg.LinAlgError:
                break
            lev = np.clip(np.diag(H), 0.0, 0.999)
            res = yk - H @ yk
            e = res / (1.0 - lev)
            t = res * np.sqrt(wk / np.mean(wk)) / np.sqrt(1.0 - lev)
        mad = 1.4826 * float(np.median(np.abs(t - np.median(t))))
        if not mad > 0:
            break
        z = (t - np.median(t)) / mad
        j = int(np.argmax(np.abs(z)))
        if abs(z[j]) <= threshold:
            break
        keep[idx[j]] = False
        flagged.append({"index": int(idx[j]), "robust_z": round(float(z[j]), 2),
                        "loo_residual": round(float(e[j]), 3), "surface": surface})
    return keep, flagged
