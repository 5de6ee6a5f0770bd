"""Task-by-task overlap of kept-channel sets, per layer.

The question the report answers is the paper's: do tasks keep the *same* channels in early
layers and *their own* channels later? Overlap is the Jaccard index |A∩B| / |A∪B| of two
kept sets, so 1 = the same channels, 0 = disjoint; two empty sets count as identical (1).

Masks are compared with one matrix product per layer (``A @ B.T`` counts the shared
channels of every pair), so a build with hundreds of tasks stays cheap; only the first
:data:`MAX_SHOWN` tasks are kept as matrices for the heatmaps, the per-layer means use all.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_SHOWN = 40


def jaccard(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[n, w]`` x ``[m, w]`` boolean kept sets -> ``[n, m]`` Jaccard indices."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
    out = np.ones_like(inter)
    np.divide(inter, union, out=out, where=union > 0)
    return out


def _off_diagonal_mean(m: np.ndarray) -> float:
    n = m.shape[0]
    if n < 2:
        return float("nan")
    return float((m.sum() - np.trace(m)) / (n * (n - 1)))


def _nan_mean(values) -> float:
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    return float(v.mean()) if v.size else float("nan")


def shown_labels(labels: list[str]) -> list[str]:
    """What fits in a heatmap: every label, or the first ``MAX_SHOWN`` sorted ones."""
    return list(labels) if len(labels) <= MAX_SHOWN else sorted(labels)[:MAX_SHOWN]


@dataclass
class Overlap:
    """One family of masks compared task by task (a build's tasks, or one eval row kind).

    ``matrices[l]`` is the overlap matrix of layer ``l`` over ``shown``; ``cross[l]`` the mean
    over every pair of *different* tasks (all tasks, not only the shown ones); ``within[l]``
    the mean over the diagonal when the diagonal means something (distinct examples of one
    task, in an eval directory), else None.
    """

    name: str
    labels: list[str]
    shown: list[str]
    matrices: np.ndarray  # [layers, len(shown), len(shown)]
    cross: np.ndarray  # [layers]
    within: np.ndarray | None = None  # [layers]

    @property
    def truncated(self) -> bool:
        return len(self.shown) < len(self.labels)


def task_overlap(name: str, labels: list[str], masks: list[list[np.ndarray]]) -> Overlap:
    """One mask per task (``masks[task][layer]``, boolean ``[width]``): a tasks x tasks matrix."""
    shown = shown_labels(labels)
    ix = [labels.index(s) for s in shown]
    mats, cross = [], []
    for layer in range(len(masks[0])):
        x = np.stack([m[layer] for m in masks])
        j = jaccard(x, x)
        np.fill_diagonal(j, 1.0)  # a task against itself, also when its set is empty
        cross.append(_off_diagonal_mean(j))
        mats.append(j[np.ix_(ix, ix)])
    return Overlap(name, list(labels), shown, np.stack(mats), np.array(cross))


def domain_matrix(per_domain: list[np.ndarray]) -> np.ndarray:
    """Many examples per domain (``[n_d, width]`` each): a domains x domains matrix of one layer.

    Entry (i, j) is the mean Jaccard over every (example of i, example of j) pair; the
    diagonal uses pairs of *distinct* examples, so it is NaN for a domain with one example.
    """
    n = len(per_domain)
    out = np.empty((n, n))
    for i in range(n):
        for j in range(i, n):
            m = jaccard(per_domain[i], per_domain[j])
            out[i, j] = out[j, i] = _off_diagonal_mean(m) if i == j else float(m.mean())
    return out


def domain_overlap(name: str, domains: list[str], masks: dict[str, list[np.ndarray]]) -> Overlap:
    """``masks[domain][layer]``: boolean ``[n_examples, width]``; see :func:`domain_matrix`."""
    shown = shown_labels(domains)
    ix = [domains.index(s) for s in shown]
    mats, cross, within = [], [], []
    for layer in range(len(masks[domains[0]])):
        m = domain_matrix([masks[d][layer] for d in domains])
        cross.append(_off_diagonal_mean(m))
        within.append(_nan_mean(np.diag(m)))
        mats.append(m[np.ix_(ix, ix)])
    return Overlap(name, list(domains), shown, np.stack(mats), np.array(cross), np.array(within))


def thirds(values: np.ndarray) -> tuple[float, float] | None:
    """Mean of the first and of the last third of the layers (None under three layers)."""
    n = len(values)
    if n < 3:
        return None
    k = -(-n // 3)
    return _nan_mean(values[:k]), _nan_mean(values[-k:])


def describe(o: Overlap) -> str:
    """One sentence on how overlap changes with depth, computed from the per-layer means."""
    cross = thirds(o.cross)
    if cross is None or np.isnan(cross[0]) or np.isnan(cross[1]):
        return ""
    prefix = f"{o.name}: " if o.within is not None else ""  # an eval row kind; a build has one family
    text = f"{prefix}mean cross-task overlap: first third of layers {cross[0]:.2f}, last third {cross[1]:.2f}"
    within = thirds(o.within) if o.within is not None else None
    if within is not None and not np.isnan(within[0]) and not np.isnan(within[1]):
        text += f"; within-task: first third {within[0]:.2f}, last third {within[1]:.2f}"
    delta = cross[0] - cross[1]
    if delta > 0.05:
        text += " -- tasks share more channels early and become task-specific later."
    elif delta < -0.05:
        text += " -- tasks share more channels in later layers than in early ones."
    else:
        text += " -- no clear trend with depth."
    return text
