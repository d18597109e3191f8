"""The curate stage: Ray Data schedules the pure ops of loraforge.data over the input files.

    files -> read_lines -> parse_lines                         (materialised: rows in)
          -> filters -> PII redaction                          (per batch)
          -> exact dedup (sort on content hash, per block)
          -> fuzzy MinHash-LSH dedup, line dedup              (collect -> resolve on driver -> apply)
          -> contamination against eval sets                   (index built on driver, applied per batch)
          -> model scores: perplexity, IFD, token cleaning     (actor pool; IFD/token cut-offs dataset-wide)
          -> MoDS: quality, coverage (K-center), necessity     (actor pools + driver)
          -> mixture, rehearsal, curriculum order              (plan on driver, applied per batch)
          -> kept rows in output order -> <output>/data/part-*.parquet
          -> every row -> <output>/ledger.parquet, manifest.json, funnel.png

Rows are marked, never removed, so the ledger accounts for every input row (checked before writing).
The output folder is built beside its final place and renamed into it once complete.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.data import Dataset, SaveMode
from ray.data.datasource import FilenameProvider

from loraforge.context import StageContext
from loraforge.data.filters import apply_filters
from loraforge.data.ledger import COUNT_KEYS, build_manifest, check_exact_dedup, ledger_table
from loraforge.data.manifest_stats import kept_stats
from loraforge.data.ops import add_content_hash, check_input_file, mark_duplicates, parse_lines, read_lines, with_status
from loraforge.data.output import check_output_free, staged_output
from loraforge.data.pii import redact_pii
from loraforge.data.plots import save_funnel_plot
from loraforge.data.ray_steps import StepLog, actor_map, arrow_map, collect, data_context, selectable
from loraforge.data.schema import (
    KEPT,
    OP_CONTAMINATION,
    OP_EXACT_DEDUP,
    OP_FILTER,
    OP_FUZZY_DEDUP,
    OP_LINE_DEDUP,
    OP_MIXTURE,
    OP_MODS,
    OP_PARSE,
    OP_PII,
    OP_SCORES,
    ORDER_KEYS,
    OUTPUT_SCHEMA,
    ROW_SCHEMA,
)
from loraforge.errors import DataError
from loraforge.resolve import resolve_data, resolve_model
from loraforge.spec import CurateSpec
from loraforge.tracking import RunRef

log = logging.getLogger("loraforge.curate")


@dataclass
class CurateResult:
    output_dir: Path
    data_dir: Path  # kept rows: part-*.parquet (OUTPUT_SCHEMA), in output order
    ledger_path: Path  # one entry per input row: id, source, status, op, reason, detail, merged_into
    manifest: dict[str, Any]
    manifest_path: Path
    funnel_path: Path


def steps_run(spec: CurateSpec) -> list[str]:
    """The ops this spec runs, in pipeline order (the funnel's steps)."""
    steps = [OP_PARSE, OP_FILTER]
    if spec.pii.enabled and spec.pii.types:
        steps.append(OP_PII)
    if spec.dedup.exact:
        steps.append(OP_EXACT_DEDUP)
    if spec.dedup.fuzzy:
        steps.append(OP_FUZZY_DEDUP)
    if spec.dedup.lines:
        steps.append(OP_LINE_DEDUP)
    if spec.contamination.eval_sets:
        steps.append(OP_CONTAMINATION)
    if spec.scores is not None:
        steps.append(OP_SCORES)
    if spec.mods is not None:
        steps.append(OP_MODS)
    steps.append(OP_MIXTURE)
    return steps


def resolve_inputs(spec: CurateSpec) -> list[dict[str, Any]]:
    """Spec inputs -> readable local files with unique source names (whole-file problems raise here)."""
    files: list[dict[str, Any]] = []
    names: dict[str, int] = {}
    for i, inp in enumerate(spec.inputs):
        field = f"inputs.{i}.path"
        try:
            path = resolve_data(inp.path)
        except DataError as err:
            raise DataError(f"{field}: {err}") from None
        if not path.is_file():
            raise DataError(f"{field}: {inp.path} is not a file (expected JSONL, Parquet or .txt)")
        try:
            with path.open("rb") as fh:
                fh.read(1)
        except OSError as err:
            raise DataError(f"{field}: cannot read {path}: {err.strerror or err}") from None
        try:
            check_input_file(path, inp.format)  # unreadable Parquet, .txt with a row format, ...
        except DataError as err:
            raise DataError(f"{field}: {err}") from None
        name = inp.name or path.stem
        if name in names:
            raise DataError(
                f"inputs.{names[name]} and inputs.{i} share the source name {name!r}: "
                "set a distinct `name` on one of them (row ids are <name>:<line>)"
            )
        names[name] = i
        files.append({
            "input_index": i, "source": name, "path": str(path), "format": inp.format,
            "group": inp.group or name, "rehearsal": inp.rehearsal,
        })
    return files


class _PartFiles(FilenameProvider):
    """part-00000.parquet, ... in write-task order (which follows the sorted block order)."""

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"part-{task_index:05d}.parquet"


def _to_output(table: pa.Table) -> pa.Table:
    return table.select(OUTPUT_SCHEMA.names).cast(OUTPUT_SCHEMA)


def _to_table(ds: Dataset, columns: list[str]) -> pa.Table:
    tables = [t for t in ray.get(ds.select_columns(columns).to_arrow_refs()) if t.num_rows]
    if not tables:
        return ROW_SCHEMA.empty_table().select(columns)
    return pa.concat_tables([t.select(columns) for t in tables], promote_options="permissive")


# Columns the driver never needs for the ledger and manifest (they stay in the Ray object store).
_BULKY = ("messages", "rejected", "token_scores", "loss_weights")


def _split_kept(rows: Dataset) -> tuple[Dataset, Dataset]:
    return arrow_map(rows, with_status, status=KEPT), arrow_map(rows, with_status, status=KEPT, keep=False)


def _split_selectable(rows: Dataset) -> tuple[Dataset, Dataset]:
    """(kept non-rehearsal rows, everything else): model ops only spend time on rows they may select.

    Replay rows are sized by the mixture step, never scored or selected, so a large general corpus
    does not pass through the scoring models.
    """
    return arrow_map(rows, selectable), arrow_map(rows, selectable, keep=False)


# ---------------------------------------------------------------- the steps
def _exact_dedup(rows: Dataset) -> Dataset:
    rows = arrow_map(rows, add_content_hash).materialize()
    kept, others = _split_kept(rows)
    if kept.count() == 0:
        return rows
    # A global sort on the hash range-partitions the rows, so all rows of one hash land in one block;
    # whole blocks (batch_size=None) then go to mark_duplicates: Ray's own groupby().map_groups() under a
    # sort shuffle co-locates groups the same way, minus its per-group UDF call (~8 ms per group here).
    deduped = kept.sort("content_hash").map_batches(mark_duplicates, batch_size=None, batch_format="pyarrow")
    return deduped.union(others).materialize()


def _line_dedup(rows: Dataset, spec: CurateSpec) -> Dataset:
    from loraforge.data.dedup import first_line_owners, line_hashes, remove_seen_lines

    hashes = collect(rows, line_hashes, min_line_chars=spec.dedup.min_line_chars)
    owners = first_line_owners(hashes)
    return arrow_map(rows, remove_seen_lines, decision=owners, min_line_chars=spec.dedup.min_line_chars).materialize()


def _fuzzy_dedup(rows: Dataset, spec: CurateSpec, stats: dict[str, Any]) -> Dataset:
    from loraforge.data.dedup import band_keys, fuzzy_clusters, mark_fuzzy_duplicates

    keys = collect(rows, band_keys, spec=spec.dedup)
    decision = fuzzy_clusters(keys, spec.dedup)
    stats["fuzzy_dedup"] = decision.summary()
    return arrow_map(rows, mark_fuzzy_duplicates, decision=decision).materialize()


def _contamination(rows: Dataset, spec: CurateSpec, stats: dict[str, Any]) -> Dataset:
    from loraforge.data.contamination import build_contamination_index, load_eval_items, mark_contaminated

    paths = []
    for i, ref in enumerate(spec.contamination.eval_sets):
        try:
            paths.append(resolve_data(ref))
        except DataError as err:
            raise DataError(f"contamination.eval_sets.{i}: {err}") from None
    items = load_eval_items(paths)
    stats["contamination"] = {"eval_items": len(items), "eval_sets": [str(p) for p in paths]}
    index = build_contamination_index(items, spec.contamination)
    return arrow_map(rows, mark_contaminated, index=index, spec=spec.contamination).materialize()


def _scores(rows: Dataset, spec: CurateSpec, model_ref: str, stats: dict[str, Any]) -> Dataset:
    from loraforge.data import scores as S

    sc = spec.scores
    assert sc is not None
    kept, others = _split_selectable(rows)
    # Ray's batch_size is rows per actor call; sc.batch_size is rows per forward pass inside it.
    scored = actor_map(
        kept, S.ScoreRows, actors=sc.actors, cpus=sc.actor_cpus, batch_size=max(64, 4 * sc.batch_size),
        model_ref=sc.model or model_ref, spec=sc.model_dump(),
    ).materialize()
    summary: dict[str, Any] = {"model": sc.model or model_ref}
    if sc.ifd and (sc.drop_ifd_above_one or sc.ifd_top_fraction):
        ifd = collect(scored, S.collect_ifd, drop_above_one=sc.drop_ifd_above_one)
        values = ifd.column("ifd") if ifd.num_rows else []
        cutoff = S.ifd_cutoff(values, sc.ifd_top_fraction) if sc.ifd_top_fraction else None
        summary["ifd_cutoff"] = cutoff
        scored = arrow_map(scored, S.mark_ifd, drop_above_one=sc.drop_ifd_above_one, cutoff=cutoff).materialize()
    if sc.token_cleaning is not None:
        # After the IFD marking, so the tokens of dropped rows are not ranked.
        tokens = collect(scored, S.collect_token_scores)
        values = tokens.column("token_score") if tokens.num_rows else []
        threshold = S.token_threshold(values, sc.token_cleaning.keep_fraction)
        summary.update(token_threshold=threshold, tokens_ranked=len(values),
                       token_keep_fraction=sc.token_cleaning.keep_fraction)
        scored = arrow_map(scored, S.apply_token_weights, threshold=threshold)
    stats["scores"] = summary
    return scored.union(others).materialize()


def _mods(rows: Dataset, spec: CurateSpec, model_ref: str, seed: int, stats: dict[str, Any]) -> Dataset:
    from loraforge.data import mods as M

    ms = spec.mods
    assert ms is not None
    cpus = spec.scores.actor_cpus if spec.scores else 0.5
    kept, others = _split_selectable(rows)
    scorer = resolve_model(ms.scorer)  # on the driver: the lab's scorer is built once, before any actor starts
    # 1. quality (actor pool) -> drop low quality; 2. embed the instructions (actor pool)
    scored = actor_map(kept, M.QualityScorer, actors=1, cpus=cpus, batch_size=64, scorer_ref=scorer, threads=1)
    scored = arrow_map(scored, M.mark_low_quality, threshold=ms.quality_threshold)
    embedded = actor_map(scored, M.Embedder, actors=1, cpus=cpus, batch_size=64,
                         kind=ms.embedder, model_ref=model_ref, threads=1).materialize()
    # 3. coverage (K-center) and necessity on the driver; 4. apply the selection per batch
    decision = M.mods_resolve(collect(embedded, M.mods_collect), ms.model_copy(update={"scorer": scorer}),
                              base_model_ref=model_ref, seed=seed)
    stats["mods"] = decision.summary
    selected = arrow_map(arrow_map(embedded, M.mark_mods, decision=decision), M.drop_transient_columns)
    return selected.union(others).materialize()


def _mixture(rows: Dataset, spec: CurateSpec, seed: int, stats: dict[str, Any]) -> Dataset:
    from loraforge.data.mixture import apply_mixture, mixture_collect, mixture_plan

    keys = collect(rows, mixture_collect, spec=spec.mixture)
    if keys.num_rows == 0:
        return rows
    plan = mixture_plan(keys, spec.mixture, seed)
    stats["mixture"] = plan.summary
    return arrow_map(rows, apply_mixture, plan=plan).materialize()


def _curate_rows(files: list[dict[str, Any]], spec: CurateSpec, ctx: StageContext, stats: dict[str, Any]
                 ) -> tuple[Dataset, int]:
    """Run the ops on Ray Data; return (materialised ROW_SCHEMA dataset, rows in after parse)."""
    steps = steps_run(spec)
    progress = StepLog(len(steps))
    model_ref = ctx.model_ref or ctx.model
    with progress.step("parse"):
        lines = ray.data.from_items(files).map_batches(read_lines, batch_size=1, batch_format="pyarrow")
        rows = arrow_map(lines, parse_lines).materialize()
        rows_in = rows.count()
    with progress.step("filter" + (" + pii" if OP_PII in steps else "")):
        rows = arrow_map(rows, apply_filters, spec=spec.filters)
        if OP_PII in steps:
            rows = arrow_map(rows, redact_pii, spec=spec.pii)
        rows = rows.materialize()
    if OP_EXACT_DEDUP in steps:
        with progress.step("exact dedup"):
            rows = _exact_dedup(rows)
    if OP_FUZZY_DEDUP in steps:
        with progress.step("fuzzy dedup"):
            rows = _fuzzy_dedup(rows, spec, stats)
    if OP_LINE_DEDUP in steps:
        with progress.step("line dedup"):
            rows = _line_dedup(rows, spec)
    if OP_CONTAMINATION in steps:
        with progress.step("contamination"):
            rows = _contamination(rows, spec, stats)
    if OP_SCORES in steps:
        with progress.step("model scores"):
            rows = _scores(rows, spec, model_ref, stats)
    if OP_MODS in steps:
        with progress.step("MoDS selection"):
            rows = _mods(rows, spec, model_ref, ctx.seed, stats)
    with progress.step("mixture"):
        rows = _mixture(rows, spec, ctx.seed, stats)
    stats["timings_s"] = progress.timings
    return rows, rows_in


def _write_kept(rows: Dataset, data_dir: Path, n_kept: int) -> None:
    if n_kept == 0:
        data_dir.mkdir(parents=True)
        return
    kept = arrow_map(rows, with_status, status=KEPT)
    ordered = kept.sort(["position", *ORDER_KEYS]).map_batches(_to_output, batch_format="pyarrow")
    # CREATE: the folder must not exist yet; it also allows names without the write uuid.
    ordered.write_parquet(str(data_dir), filename_provider=_PartFiles(), mode=SaveMode.CREATE)
    written = sum(pq.ParquetFile(f).metadata.num_rows for f in data_dir.glob("part-*.parquet"))
    if written != n_kept:
        raise RuntimeError(f"wrote {written} kept rows to {data_dir}, the ledger says {n_kept}")


def spec_params(spec: CurateSpec) -> dict[str, Any]:
    """Flat `section.field` params for MLflow (inputs numbered)."""
    params: dict[str, Any] = {}

    def flatten(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                flatten(f"{prefix}.{k}" if prefix else k, v)
        else:
            params[prefix] = value

    flatten("", spec.model_dump(exclude={"inputs"}))
    for i, inp in enumerate(spec.inputs):
        params.update({f"inputs.{i}.{k}": v for k, v in inp.model_dump().items()})
    return params


def log_to_mlflow(run: RunRef, spec: CurateSpec, result: CurateResult) -> None:
    run.log_params(spec_params(spec))
    run.log_metrics({f"rows.{k}": result.manifest[k] for k in COUNT_KEYS})
    run.log_metrics({f"rows.after.{s['step']}": s["rows"] for s in result.manifest["funnel"]})
    run.log_dict(result.manifest, "curate/manifest.json")
    run.log_artifact(result.ledger_path, "curate")
    run.log_artifact(result.funnel_path, "curate")


def run_curate(spec: CurateSpec, ctx: StageContext) -> CurateResult:
    """Curate spec.inputs into spec.output (default: the run's curate folder); see the module doc.

    Assumes the caller owns the Ray cluster (starts a local one if none is initialised).
    Raises DataError for missing/unreadable inputs, a non-empty output folder, or no rows kept.
    """
    started = time.time()
    output = Path(spec.output).expanduser().resolve() if spec.output else ctx.stage_dir("curate")
    check_output_free(output)
    files = resolve_inputs(spec)
    if not ray.is_initialized():
        ray.init()
    stats: dict[str, Any] = {}
    with staged_output(output) as staging, data_context():
        rows, rows_in = _curate_rows(files, spec, ctx, stats)
        everything = _to_table(rows, [c for c in ROW_SCHEMA.names if c not in _BULKY])
        if spec.dedup.exact:
            check_exact_dedup(everything)
        ledger = ledger_table(everything)
        sources = [f["source"] for f in files]
        manifest = build_manifest(ledger, rows_in, sources, steps_run(spec))  # raises if a row is lost
        kept = everything.filter(pc.equal(everything.column("status"), KEPT))
        manifest.update(kept_stats(kept))
        manifest.update(stats)
        _write_kept(rows, staging / "data", manifest[KEPT])
        pq.write_table(ledger, staging / "ledger.parquet")
        save_funnel_plot(manifest["funnel"], staging / "funnel.png")
        manifest["inputs"] = [{k: f[k] for k in ("source", "path", "format", "group", "rehearsal")} for f in files]
        manifest["elapsed_s"] = round(time.time() - started, 3)
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
    result = CurateResult(
        output_dir=output,
        data_dir=output / "data",
        ledger_path=output / "ledger.parquet",
        manifest=manifest,
        manifest_path=output / "manifest.json",
        funnel_path=output / "funnel.png",
    )
    if ctx.run is not None:
        log_to_mlflow(ctx.run, spec, result)
    log.info("curate: %d rows in, %d kept, %d dropped, %d merged -> %s", *(manifest[k] for k in COUNT_KEYS), output)
    if manifest[KEPT] == 0:
        top = ", ".join(f"{r}: {n}" for r, n in manifest["by_reason"].items()) or "no input rows"
        raise DataError(f"curate kept no rows out of {manifest['in']} ({top}); see {result.ledger_path}")
    return result
