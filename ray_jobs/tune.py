"""Cluster entrypoint for the tune stage: `python ray_jobs/tune.py TUNE.yaml TRAIN.yaml` (or PIPELINE.yaml).

TUNE.yaml is a tune stage file and TRAIN.yaml the train stage it searches around; a single pipeline
file with both stages works too. Ray is joined through RAY_ADDRESS when set (Ray Jobs sets it), else
a local Ray is started. Trials are tracked in MLflow when MLFLOW_TRACKING_URI is set. The best config
is printed as JSON; user errors exit with code 2.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

# A shipped working dir must win over any installed copy of the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from loraforge.errors import LoraforgeError  # noqa: E402


def _specs(paths: list[str]):
    from loraforge.spec import LAB_MODEL, PipelineSpec, TrainSpec, TuneSpec, load_spec

    loaded = [load_spec(p) for p in paths]
    if len(loaded) == 1 and isinstance(loaded[0], PipelineSpec):
        pipe = loaded[0]
        tune, train = pipe.stage("tune"), pipe.stage("train")
        model, seed, name = pipe.model, pipe.seed, pipe.name
    else:
        tune = next((s for s in loaded if isinstance(s, TuneSpec)), None)
        train = next((s for s in loaded if isinstance(s, TrainSpec)), None)
        model, seed, name = LAB_MODEL, 0, "tune"
    if tune is None or train is None:
        raise LoraforgeError(f"{' '.join(paths)}: need a tune stage and a train stage (two files or one pipeline)")
    return tune, train, train.model or model, seed, name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("specs", nargs="+", help="TUNE.yaml TRAIN.yaml, or one pipeline YAML with both stages")
    parser.add_argument("--seed", type=int, help="search seed (default: the pipeline's seed, else 0)")
    args = parser.parse_args(argv)
    run = None
    status = "FAILED"
    try:
        tune_spec, train_spec, model, seed, name = _specs(args.specs)  # fail on a bad file before Ray starts

        import ray

        from loraforge.cluster import LOCAL_RAY_CPUS
        from loraforge.context import StageContext
        from loraforge.paths import runs_dir
        from loraforge.resolve import resolve_model
        from loraforge.tracking import start_run
        from loraforge.tune.runner import run_tune

        if not ray.is_initialized():
            if os.environ.get("RAY_ADDRESS"):
                ray.init()
            else:  # trial drivers need CPUs beside their workers
                ray.init(num_cpus=LOCAL_RAY_CPUS, include_dashboard=False)
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if uri:
            run = start_run(uri, "loraforge", f"{name}-tune", "tune", name)
        ctx = StageContext(
            run_dir=runs_dir() / time.strftime(f"{name}-tune-%Y%m%d-%H%M%S"),
            model=resolve_model(model),
            run=run,
            seed=seed if args.seed is None else args.seed,
            model_ref=model,
        )
        result = run_tune(tune_spec, train_spec, ctx)
        status = "FINISHED"
    except LoraforgeError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    finally:
        if run is not None:
            run.finish(status)
    for t in result.trials:
        end = "error" if t["error"] else "stopped early" if t["stopped_early"] else "completed"
        print(f"trial {t['trial']}: {t['config']} last loss {t['last_loss']} after {t['steps_run']} steps ({end})")
    print(json.dumps({"best_config": result.best_config, "best_loss": result.best_loss}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
