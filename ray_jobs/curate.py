"""Cluster entrypoint for the curate stage: `python ray_jobs/curate.py SPEC.yaml [--output DIR]`.

SPEC.yaml is a curate stage file (kind: curate) or a pipeline whose curate stage is run. Ray is
joined through RAY_ADDRESS when set (Ray Jobs sets it), else a local Ray is started. The manifest
is printed as JSON; user errors exit with code 2.
"""

import argparse
import json
import sys
import time
from pathlib import Path

# A shipped working dir must win over any installed copy of the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from loraforge.errors import LoraforgeError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", help="curate stage YAML (or a pipeline YAML with a curate stage)")
    parser.add_argument("--output", help="output folder (overrides the spec's output)")
    args = parser.parse_args(argv)
    try:
        import ray

        from loraforge.cli import setup_progress_logging
        from loraforge.context import StageContext
        from loraforge.data.pipeline import run_curate
        from loraforge.paths import runs_dir
        from loraforge.spec import CurateSpec, PipelineSpec, load_spec

        setup_progress_logging()
        spec = load_spec(args.spec)
        model = spec.model if isinstance(spec, PipelineSpec) else "lab"  # scores/MoDS default model
        if isinstance(spec, PipelineSpec):
            spec = spec.stage("curate")
        if not isinstance(spec, CurateSpec):
            raise LoraforgeError(f"{args.spec}: no curate stage in this job file")
        if args.output:
            spec = spec.model_copy(update={"output": args.output})
        if not ray.is_initialized():
            ray.init()  # honours RAY_ADDRESS
        run_dir = runs_dir() / time.strftime("curate-%Y%m%d-%H%M%S")
        result = run_curate(spec, StageContext(run_dir=run_dir, model=model, model_ref=model, run=None))
    except LoraforgeError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    print(json.dumps(result.manifest, indent=2))
    print(f"output: {result.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
