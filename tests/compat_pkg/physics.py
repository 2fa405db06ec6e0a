"""A function and a coffea-like processor that the workers must import from this (uninstalled) module."""

from __future__ import annotations

JET_PT_MIN = 25.0  #: read on the worker: the module's globals must travel with its functions


def selected_sum(pts: list[float]) -> float:
    """The sum of the jet pTs above ``JET_PT_MIN``.

    >>> selected_sum([10.0, 30.0, 50.0])
    80.0
    """
    return sum(pt for pt in pts if pt > JET_PT_MIN)


class Processor:
    """Configured on the client; :meth:`process` runs on a worker.

    >>> Processor(scale=2.0).process([30.0])
    {'n': 1, 'sum': 60.0}
    """

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def process(self, pts: list[float]) -> dict[str, float]:
        return {"n": len(pts), "sum": self.scale * selected_sum(pts)}
