"""Ray Data glue for the curation ops: map a pure op over batches, collect small tables to the driver,
run a model op in an actor pool. The ops themselves (loraforge.data.*) never import Ray.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data import ActorPoolStrategy, DataContext, Dataset
from ray.data.context import ShuffleStrategy

from loraforge.data.schema import KEPT

log = logging.getLogger("loraforge.curate")


@contextmanager
def data_context() -> Iterator[None]:
    """Ray Data settings for this stage, restored afterwards (the caller may share the driver).

    preserve_order: rows in the output files follow input order on every run (only the split into
    files may differ, as sort boundaries are sampled).
    Pull-based sort shuffle for sorts: the default actor-based hash shuffle costs ~30 s of actor
    start-up per shuffle on a 2-CPU machine, against ~2 s for these task-based shuffles.
    """
    ctx = DataContext.get_current()
    before = (ctx.execution_options.preserve_order, ctx.shuffle_strategy, ctx.enable_progress_bars)
    ctx.execution_options.preserve_order = True
    ctx.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    try:
        yield
    finally:
        ctx.execution_options.preserve_order, ctx.shuffle_strategy, ctx.enable_progress_bars = before


def arrow_map(ds: Dataset, fn: Callable[..., pa.Table], **kwargs: Any) -> Dataset:
    """Apply a pure Arrow op to every batch (stateless Ray tasks)."""
    return ds.map_batches(fn, batch_format="pyarrow", fn_kwargs=kwargs or None)


def actor_map(ds: Dataset, cls: type, *, actors: int, cpus: float, batch_size: int, **init: Any) -> Dataset:
    """Run a model op (a callable class holding a model) in a fixed pool of actors.

    Fractional CPUs per actor so a 2-CPU cluster still has room for the tasks that feed the pool
    (an actor pool taking every CPU can hang a pipeline there).
    """
    return ds.map_batches(
        cls,
        batch_format="pyarrow",
        batch_size=batch_size,
        compute=ActorPoolStrategy(size=actors),
        num_cpus=cpus,
        fn_constructor_kwargs=init or None,
    )


def collect(ds: Dataset, fn: Callable[..., pa.Table] | None = None, **kwargs: Any) -> pa.Table:
    """Concatenate (optionally `fn`-mapped) batches on the driver: the `collect` half of a global op."""
    mapped = arrow_map(ds, fn, **kwargs) if fn is not None else ds
    tables = [t for t in ray.get(mapped.to_arrow_refs()) if t.num_rows]
    if not tables:
        return pa.table({})
    return pa.concat_tables(tables, promote_options="permissive")


def _selectable_mask(table: pa.Table) -> pa.ChunkedArray:
    return pc.and_(pc.equal(table.column("status"), KEPT), pc.invert(pc.fill_null(table.column("rehearsal"), False)))


def selectable(table: pa.Table, keep: bool = True) -> pa.Table:
    """Kept rows that selection may drop (keep=True: not rehearsal replay), or all the others (keep=False)."""
    mask = _selectable_mask(table)
    return table.filter(mask if keep else pc.invert(mask))


class StepLog:
    """Progress on long work: a log line when each op starts and one with the time it took."""

    def __init__(self, total_steps: int):
        self.total = total_steps
        self.done = 0
        self.timings: dict[str, float] = {}

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        self.done += 1
        t0 = time.time()
        log.info("curate [%d/%d] %s ...", self.done, self.total, name)
        yield
        self.timings[name] = round(time.time() - t0, 3)
        log.info("curate [%d/%d] %s done in %.1f s", self.done, self.total, name, self.timings[name])
