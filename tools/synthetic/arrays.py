"""Vectorised helpers on "flat objects with an event index", and their assembly into awkward collections.

Every collection is generated as flat numpy arrays (one entry per object) plus the event index of each
object; :func:`collection` sorts them into per-event lists the way NanoAOD stores them.
"""

from __future__ import annotations

from typing import Any

import awkward as ak
import numpy as np

F4 = np.float32
I4 = np.int32


def repeat_events(counts: np.ndarray) -> np.ndarray:
    """Event index of each object, for per-event object counts.

    >>> repeat_events(np.array([2, 0, 1])).tolist()
    [0, 0, 2]
    """
    return np.repeat(np.arange(len(counts)), counts)


def pareto(rng: np.random.Generator, xmin: float, alpha: float, size: int) -> np.ndarray:
    """Power-law (falling) spectrum dN/dx ~ x^-(alpha+1) above xmin."""
    return xmin * (1.0 - rng.random(size)) ** (-1.0 / alpha)


def signs(rng: np.random.Generator, size: int) -> np.ndarray:
    """Random -1/+1 per object (quark vs antiquark, lepton charge)."""
    return rng.choice(np.array([-1, 1]), size=size)


def offsets(counts: np.ndarray) -> np.ndarray:
    """Start of each event's objects in the flat arrays, plus the total at the end.

    >>> offsets(np.array([2, 0, 1])).tolist()
    [0, 2, 2, 3]
    """
    return np.concatenate([[0], np.cumsum(counts)])


def sort_in_events(event: np.ndarray, key: np.ndarray, n_events: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Order objects by event, then by descending ``key`` (NanoAOD sorts collections by pT).

    Returns ``(order, counts, local_of_original)``: ``order`` permutes flat arrays into the written order,
    ``local_of_original[k]`` is the within-event index that original object ``k`` ends up at.
    """
    order = np.lexsort((-key, event))
    counts = np.bincount(event, minlength=n_events)
    position = np.empty(len(order), dtype=np.int64)
    position[order] = np.arange(len(order))
    local = position - offsets(counts)[event]
    return order, counts, local


def first_two_per_target(
    n_targets: int, target: np.ndarray, source_local: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each target object, the local indices of the first two sources pointing at it (or -1) and the
    number of such sources. ``target`` is the flat (global) target index per source, -1 for none."""
    idx1 = np.full(n_targets, -1, dtype=I4)
    idx2 = np.full(n_targets, -1, dtype=I4)
    n = np.zeros(n_targets, dtype=I4)
    has = target >= 0
    if has.any():
        t = target[has]
        s = source_local[has]
        order = np.lexsort((s, t))
        t, s = t[order], s[order]
        n[:] = np.bincount(t, minlength=n_targets)
        first = np.ones(len(t), dtype=bool)
        first[1:] = t[1:] != t[:-1]
        idx1[t[first]] = s[first]
        second = np.zeros(len(t), dtype=bool)
        second[1:] = (~first[1:]) & first[:-1]
        idx2[t[second]] = s[second]
    return idx1, idx2, n


def reduce_precision(values: Any, bits: int) -> np.ndarray:
    """float32 with the mantissa rounded to ``bits`` bits, as NanoAOD stores most of its floats (this is
    what makes NanoAOD compress well; full-precision random floats would not).

    >>> float(reduce_precision([1.0 + 2**-12], 10)[0])
    1.0
    """
    x = np.ascontiguousarray(values, dtype=F4)
    if bits >= 23:
        return x
    shift = 23 - bits
    u = x.view(np.uint32)
    mask = np.uint32((0xFFFFFFFF << shift) & 0xFFFFFFFF)
    return ((u + np.uint32(1 << (shift - 1))) & mask).view(F4)


def collection(fields: dict[str, Any], order: np.ndarray, counts: np.ndarray, precision: dict[str, int]) -> ak.Array:
    """An awkward record array of per-event lists: flat ``fields`` permuted by ``order`` and cut by
    ``counts``; float fields rounded to ``precision[name]`` mantissa bits (``precision["*"]`` otherwise)."""
    out = {}
    for name, values in fields.items():
        column = np.asarray(values)[order]
        if column.dtype.kind == "f":
            column = reduce_precision(column, precision.get(name, precision.get("*", 10)))
        out[name] = ak.unflatten(column, counts)
    return ak.zip(out)
