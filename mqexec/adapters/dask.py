"""Dask on mqexec: a scheduler ``get`` with graph fusion, ``compute``, and the default-scheduler switch."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..client import Client


@contextlib.contextmanager
def default_scheduler(client: Client) -> Iterator[None]:
    """Make ``client.get`` dask's default scheduler inside the block; the previous one comes back after."""
    import dask

    with dask.config.set(scheduler=client.get):
        yield
