"""Curation throughput and dedup quality: loraforge's curate stage against datatrove, same rows, same cores.

    python benchmarks/curate_throughput.py [--rows 100000] [--cpus 2] [--seed 0]

Rows: alpaca rows built from the real shared data (self_instruct instructions, Shakespeare lines) with
planted exact copies, re-cased copies and word-edited near-duplicates (benchmarks/planted_corpus.py),
plus some PII and junk rows, written as `--shards` JSONL files that both pipelines read.

  ours       loraforge.data.pipeline.run_curate on a fresh local Ray cluster with num_cpus=--cpus:
             parse -> heuristic filters -> PII redaction -> exact dedup -> MinHash-LSH dedup
             (-> mixture, Parquet output, ledger, manifest), line dedup and contamination off.
  datatrove  LocalPipelineExecutor, tasks = workers = --cpus: JsonlReader -> GopherRepetitionFilter
             -> GopherQualityFilter -> PIIFormatter -> exact dedup (signature / find / filter) ->
             MinHash dedup (signature / buckets / cluster / filter) with 5-gram shingles and its own
             default 14 buckets x 8 hashes (112 permutations, ours 128); a whitespace word tokenizer
             (spaCy is not installed; ours splits on whitespace too).

Quality, from each pipeline's own output: truth = pairs of one planted family with exact word 5-gram
Jaccard >= the threshold; over the truth pairs whose two rows both reached dedup (passed that
pipeline's filters), recall = share not both left in the output; precision = share of rows removed by
dedup that have a true partner. Timing covers the pipeline call only (cluster start-up is reported
apart). The last line printed is one JSON object; RESULTS.md gets a section with the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
from planted_corpus import BenchRow, family_truth, throughput_corpus  # noqa: E402
from results_md import write_section  # noqa: E402

from loraforge.data.dedup import fuzzy_lsh_params  # noqa: E402
from loraforge.spec import DedupSpec  # noqa: E402

SECTION = "## Curation throughput (curate_throughput.py)"


def say(msg: str) -> None:
    print(f"[curate_throughput {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- data
def write_shards(rows: list[BenchRow], folder: Path, shards: int) -> tuple[list[Path], list[str]]:
    """Rows round-robin into shards; each row's id is "<shard>:<line>", the id run_curate gives it."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"shard{k}.jsonl" for k in range(shards)]
    ids = []
    handles = [p.open("w", encoding="utf-8") for p in paths]
    lines = [0] * shards
    for i, row in enumerate(rows):
        k = i % shards
        lines[k] += 1
        row_id = f"shard{k}:{lines[k]}"
        ids.append(row_id)
        handles[k].write(json.dumps({"id": row_id, "instruction": row.instruction, "input": "", "output": row.output})
                         + "\n")
    for h in handles:
        h.close()
    return paths, ids


def scores(truth: Iterable[tuple[str, str]], reached: set[str], survived: set[str]) -> tuple[float, float, int]:
    """(recall, precision, eligible pairs); see the module doc."""
    eligible = [(a, b) for a, b in truth if a in reached and b in reached]
    resolved = sum(1 for a, b in eligible if not (a in survived and b in survived))
    partners: dict[str, set[str]] = {}
    for a, b in eligible:
        partners.setdefault(a, set()).add(b)
        partners.setdefault(b, set()).add(a)
    removed = reached - survived
    correct = sum(1 for r in removed if partners.get(r))
    recall = resolved / len(eligible) if eligible else 1.0
    precision = correct / len(removed) if removed else 1.0
    return recall, precision, len(eligible)


# ---------------------------------------------------------------- ours
def run_ours(jsonl_paths: list[Path], out_dir: Path) -> tuple[set[str], set[str], dict]:
    """run_curate over the shards; returns (ids that reached dedup, ids kept, manifest)."""
    import pyarrow.parquet as pq

    from loraforge.context import StageContext
    from loraforge.data.pipeline import run_curate
    from loraforge.spec import CurateSpec

    spec = CurateSpec(
        inputs=[{"path": str(p), "format": "alpaca", "name": p.stem} for p in jsonl_paths],
        output=str(out_dir / "curated"),
    )
    result = run_curate(spec, StageContext(run_dir=out_dir, model="none"))
    ledger = pq.read_table(result.ledger_path, columns=["id", "status", "op"]).to_pylist()
    dedup_ops = {"exact_dedup", "fuzzy_dedup"}
    reached = {r["id"] for r in ledger if r["status"] == "kept" or r["op"] in dedup_ops}
    kept = {r["id"] for r in ledger if r["status"] == "kept"}
    return reached, kept, result.manifest


# ---------------------------------------------------------------- datatrove
def _datatrove_parts():
    """datatrove classes (imported late: only this benchmark needs them)."""
    from datatrove.utils.word_tokenizers import WordTokenizer

    class WhitespaceTokenizer(WordTokenizer):
        def __init__(self) -> None:
            super().__init__("en")

        def word_tokenize(self, text: str) -> list[str]:
            return text.split()

        def sent_tokenize(self, text: str) -> list[str]:
            return [s for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            return [m.span() for m in re.finditer(r"[^.!?]+[.!?]*", text)]

    return WhitespaceTokenizer


def alpaca_adapter(self, data: dict, path: str, id_in_file: int | str) -> dict:
    """The same document ours deduplicates: instruction, newline, answer."""
    return {"text": f"{data['instruction']}\n{data['output']}", "id": data["id"], "metadata": {}}


def exact_content(doc) -> bytes:  # noqa: ANN001
    """Whitespace-normalised text, as ours hashes it (bytes: see xxh64_text)."""
    return " ".join(doc.text.split()).encode("utf-8")


# datatrove picks the hash function from the return annotation, which must be the type, not a string
exact_content.__annotations__["return"] = bytes


def xxh64_text(text: str) -> int:
    """datatrove 0.10.1 hashes shingles as str with xxhash, which xxhash >= 4.1 refuses; same hash, encoded."""
    import xxhash

    return xxhash.xxh64_intdigest(text.encode("utf-8"))


def datatrove_step_seconds(logs: Path) -> dict[str, float]:
    """Seconds per datatrove step, summed over its tasks, from the executors' stats.json files."""
    out: dict[str, float] = {}
    for stats in sorted(logs.glob("*/stats.json")):
        for step in json.loads(stats.read_text()):
            total = (step.get("time_stats") or {}).get("total")
            if total is not None:
                name = re.sub(r"\s+", " ", re.sub(r"[^\w :-]", "", step["name"])).strip(" -")
                out[name] = round(out.get(name, 0.0) + float(total), 1)
    return out


def _ids(folder: Path) -> set[str]:
    out = set()
    for f in sorted(folder.glob("*.jsonl*")):
        with f.open(encoding="utf-8") as fh:
            out.update(json.loads(line)["id"] for line in fh if line.strip())
    return out


DATATROVE_BUCKETS, DATATROVE_HASHES = 14, 8  # MinhashConfig's defaults


def run_datatrove(shard_dir: Path, work: Path, cpus: int, bands: int = DATATROVE_BUCKETS,
                  rows: int = DATATROVE_HASHES) -> tuple[set[str], set[str]]:
    """The datatrove pipeline (see the module doc); returns (ids that reached dedup, ids kept)."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import (
        ExactDedupConfig,
        ExactDedupFilter,
        ExactDedupSignature,
        ExactFindDedups,
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter
    from datatrove.pipeline.formatters import PIIFormatter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    tok = _datatrove_parts()()
    exact_cfg = ExactDedupConfig(content_getter=exact_content)
    mh_cfg = MinhashConfig(n_grams=5, num_buckets=bands, hashes_per_bucket=rows)
    d = {name: work / name for name in ("filtered", "exact_sigs", "exact_dups", "exact_out", "mh_sigs", "mh_buckets",
                                         "mh_remove", "final", "logs")}

    def executor(pipeline: list, tasks: int, name: str, depends=None) -> LocalPipelineExecutor:  # noqa: ANN001
        return LocalPipelineExecutor(pipeline, tasks=tasks, workers=min(tasks, cpus),
                                     logging_dir=str(d["logs"] / name), depends=depends)

    signature = MinhashDedupSignature(str(d["mh_sigs"]), config=mh_cfg, language=tok)
    signature._hash_func = xxh64_text
    s1 = executor([
        JsonlReader(str(shard_dir), adapter=alpaca_adapter, glob_pattern="*.jsonl"),
        GopherRepetitionFilter(language=tok),
        GopherQualityFilter(language=tok),
        PIIFormatter(),
        JsonlWriter(str(d["filtered"]), compression=None),
        ExactDedupSignature(str(d["exact_sigs"]), exact_cfg),
    ], cpus, "1_filter_exact_sig")
    s2 = executor([ExactFindDedups(str(d["exact_sigs"]), str(d["exact_dups"]), exact_cfg)], 1, "2_exact_find", s1)
    s3 = executor([
        JsonlReader(str(d["filtered"])),
        ExactDedupFilter(str(d["exact_dups"]), exact_cfg),
        JsonlWriter(str(d["exact_out"]), compression=None),
        signature,
    ], cpus, "3_exact_filter_mh_sig", s2)
    s4 = executor([MinhashDedupBuckets(str(d["mh_sigs"]), str(d["mh_buckets"]), config=mh_cfg)], bands,
                  "4_mh_buckets", s3)
    s5 = executor([MinhashDedupCluster(str(d["mh_buckets"]), str(d["mh_remove"]), config=mh_cfg)], 1,
                  "5_mh_cluster", s4)
    s6 = executor([
        JsonlReader(str(d["exact_out"])),
        MinhashDedupFilter(str(d["mh_remove"])),
        JsonlWriter(str(d["final"]), compression=None),
    ], cpus, "6_mh_filter", s5)
    s6.run()
    return _ids(d["filtered"]), _ids(d["final"])


# ---------------------------------------------------------------- report
def update_results(command: str, result: dict, notes: list[str]) -> None:
    body = [
        SECTION, "",
        f"Command: `{command}`", "",
        "| pipeline | rows/s | recall | precision |",
        "| --- | --- | --- | --- |",
        f"| loraforge (Ray, {result['cpus']} CPUs) | {result['rows_per_s']} | {result['recall']} | "
        f"{result['precision']} |",
        f"| datatrove ({result['cpus']} workers) | {result['datatrove_rows_per_s']} | {result['datatrove_recall']} | "
        f"{result['datatrove_precision']} |",
        "", f"Rows: {result['rows']}; ratio (ours / datatrove): {result['ratio']}.", "",
        *[f"- {n}" for n in notes], "",
        "```json", json.dumps(result), "```", "",
    ]
    write_section(SECTION, body)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=None, help="kept afterwards if given")
    ap.add_argument("--skip-datatrove", action="store_true")
    ap.add_argument("--no-results", action="store_true", help="do not update RESULTS.md")
    args = ap.parse_args(argv)

    spec = DedupSpec()
    bands, band_rows = fuzzy_lsh_params(spec)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="curate_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    say(f"building {args.rows} rows from the shared data (seed {args.seed}) in {work}")
    t = time.time()
    rows = throughput_corpus(args.rows, args.seed)
    paths, ids = write_shards(rows, work / "input", args.shards)
    truth_idx = family_truth(rows, spec.threshold, spec.ngram)
    truth = [(ids[a], ids[b]) for a, b in truth_idx]
    say(f"corpus ready in {time.time() - t:.1f} s: {len(truth)} true duplicate pairs (Jaccard >= {spec.threshold})")

    import logging

    import ray

    for name in ("ray", "ray.data"):  # Ray Data's per-dataset progress reports drown the benchmark's own
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # loraforge.curate step progress
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    t = time.time()
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
             object_store_memory=2 * 1024**3)
    ray_start = time.time() - t
    say(f"ray up with {args.cpus} CPUs in {ray_start:.1f} s; running ours")
    t = time.time()
    reached, kept, manifest = run_ours(paths, work / "ours")
    ours_s = time.time() - t
    ray.shutdown()
    recall, precision, eligible = scores(truth, reached, kept)
    say(f"ours: {ours_s:.1f} s ({args.rows / ours_s:.0f} rows/s), recall {recall:.4f}, precision {precision:.4f} "
        f"over {eligible} pairs; step timings {manifest.get('timings_s')}")

    dt_s, dt_recall, dt_precision = float("nan"), float("nan"), float("nan")
    dt_steps: dict[str, float] = {}
    if not args.skip_datatrove:
        say(f"running datatrove with {args.cpus} workers ({DATATROVE_BUCKETS} buckets x {DATATROVE_HASHES} hashes)")
        t = time.time()
        dt_reached, dt_kept = run_datatrove(work / "input", work / "datatrove", args.cpus)
        dt_s = time.time() - t
        dt_recall, dt_precision, dt_eligible = scores(truth, dt_reached, dt_kept)
        dt_steps = datatrove_step_seconds(work / "datatrove" / "logs")
        say(f"datatrove: {dt_s:.1f} s ({args.rows / dt_s:.0f} rows/s), recall {dt_recall:.4f}, "
            f"precision {dt_precision:.4f} over {dt_eligible} pairs; task-seconds per step {dt_steps}")

    ran_dt = not args.skip_datatrove

    def peer(value: float, digits: int) -> float | None:
        return round(value, digits) if ran_dt else None

    result = {
        "rows": args.rows,
        "rows_per_s": round(args.rows / ours_s, 1),
        "datatrove_rows_per_s": peer(args.rows / dt_s, 1),
        "ratio": peer(dt_s / ours_s, 3),
        "recall": round(recall, 4),
        "precision": round(precision, 4),
        "datatrove_recall": peer(dt_recall, 4),
        "datatrove_precision": peer(dt_precision, 4),
        "seconds": round(ours_s, 1),
        "datatrove_seconds": peer(dt_s, 1),
        "ray_start_s": round(ray_start, 1),
        "cpus": args.cpus,
        "step_timings_s": manifest.get("timings_s"),
        "datatrove_task_s": dt_steps or None,
    }
    if not args.no_results and ran_dt:
        command = "python benchmarks/curate_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:])
        update_results(command.strip(), result, [
            f"Same {args.shards} JSONL shards for both; word 5-gram shingles. Ours: threshold {spec.threshold}, "
            f"{spec.num_perm} permutations, {bands} bands x {band_rows} rows, every LSH candidate verified with the "
            f"exact Jaccard of the two shingle sets. datatrove: its default {DATATROVE_BUCKETS} buckets x "
            f"{DATATROVE_HASHES} hashes, every bucket match clustered (no verification).",
            "Recall: true pairs (exact Jaccard >= threshold within a planted family) not both left in the output, "
            "among pairs whose rows both passed that pipeline's filters; precision: rows removed by dedup that have "
            "a true partner.",
            "datatrove's PII formatter covers e-mails and IPs only; ours also phones, cards, IBANs, addresses. "
            "datatrove gets a whitespace word tokenizer (spaCy is not installed) and its xxhash shingle hash is "
            "fed UTF-8 bytes (datatrove 0.10.1 passes str, which xxhash >= 4.1 refuses).",
            f"Timing: wall time of each pipeline call on this {args.cpus}-core machine, which other jobs share "
            f"(numbers move by 2-3x with its load; both pipelines run back to back in one process). Ray "
            f"start-up ({ray_start:.1f} s) is excluded; datatrove's worker start-ups are included.",
            f"Where the time goes. Ours, wall seconds per step: {manifest.get('timings_s')}, plus ledger, "
            f"manifest and Parquet output. datatrove, seconds summed over its tasks (a step that yields documents "
            f"can include the time of the steps after it): {dt_steps}.",
        ])
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
