"""Cluster entrypoint for the train stage: `python ray_jobs/train.py SPEC.yaml [--output DIR]`.

SPEC.yaml is a train stage file (kind: train, with `data:` set) or a pipeline whose train stage is
run (its `model` and `seed` are the defaults). Ray is joined through RAY_ADDRESS when set (Ray Jobs
sets it), else a local Ray is started. With MLFLOW_TRACKING_URI set, params, per-step loss and the
adapter are logged to a run. The result is printed as JSON; user errors exit with code 2.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

# A shipped working dir must win over any installed copy of the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from loraforge.errors import LoraforgeError, SpecError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", help="train stage YAML (or a pipeline YAML with a train stage)")
    parser.add_argument("--output", help="adapter folder (overrides the spec's output)")
    parser.add_argument("--experiment", default="loraforge", help="MLflow experiment (with MLFLOW_TRACKING_URI)")
    args = parser.parse_args(argv)
    run = None
    try:
        import ray

        from loraforge.context import StageContext
        from loraforge.paths import runs_dir
        from loraforge.resolve import resolve_model
        from loraforge.spec import LAB_MODEL, PipelineSpec, TrainSpec, check_paths, load_spec
        from loraforge.tracking import start_run
        from loraforge.train.trainer import check_train_spec, run_train

        spec = load_spec(args.spec)
        check_paths(spec, args.spec)
        model_ref, seed = LAB_MODEL, 0
        if isinstance(spec, PipelineSpec):
            model_ref, seed, spec = spec.model, spec.seed, spec.stage("train")
        if not isinstance(spec, TrainSpec):
            raise SpecError(args.spec, [("kind", "expected a train stage (or a pipeline with one)")])
        if spec.seed == 0 and seed:  # the pipeline's seed is the default, as in `loraforge run`
            spec = spec.model_copy(update={"seed": seed})
        if args.output:
            spec = spec.model_copy(update={"output": args.output})
        model_ref = spec.model or model_ref
        check_train_spec(spec)
        if not ray.is_initialized():
            ray.init()  # honours RAY_ADDRESS
        run_dir = runs_dir() / time.strftime("train-%Y%m%d-%H%M%S")
        if os.environ.get("MLFLOW_TRACKING_URI"):
            run = start_run(os.environ["MLFLOW_TRACKING_URI"], args.experiment, run_dir.name, "train", run_dir.name)
        ctx = StageContext(run_dir=run_dir, model=resolve_model(model_ref), run=run, seed=seed, model_ref=model_ref)
        result = run_train(spec, ctx)
    except LoraforgeError as err:
        if run is not None:
            run.finish("FAILED")
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except BaseException:
        if run is not None:
            run.finish("FAILED")
        raise
    if run is not None:
        run.finish()
    print(json.dumps({
        "adapter_dir": str(result.adapter_dir), "steps": result.steps, "final_loss": result.final_loss,
        "restarts": result.restarts, "losses": result.losses,
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
