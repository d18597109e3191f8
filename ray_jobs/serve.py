"""Cluster entrypoint for the model service: `python ray_jobs/serve.py SPEC.yaml`.

SPEC is a serve stage file, or a pipeline file with a serve stage (its `model` is the default base).
Connects to the cluster in RAY_ADDRESS (a new local one without it), serves the base model and the
adapters over the OpenAI API and blocks until Ctrl-C / SIGTERM, then shuts the service down.
"""

import sys
from pathlib import Path

# A shipped working dir must win over any installed copy of the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from loraforge.errors import LoraforgeError, SpecError  # noqa: E402
from loraforge.spec import LAB_MODEL, PipelineSpec, ServeSpec, check_paths, load_spec  # noqa: E402


def load_serve_spec(path: str) -> tuple[ServeSpec, str]:
    """The serve stage and the base model reference it falls back to."""
    spec = load_spec(path)
    check_paths(spec, path)
    model_ref = LAB_MODEL
    if isinstance(spec, PipelineSpec):
        model_ref, spec = spec.model, spec.stage("serve")
        if spec is None:
            raise SpecError(path, [("stages", "no serve stage in this pipeline")])
    if not isinstance(spec, ServeSpec):
        raise SpecError(path, [("kind", f"expected a serve stage, got {spec.kind}")])
    return spec, spec.model or model_ref


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python ray_jobs/serve.py SPEC.yaml", file=sys.stderr)
        return 2
    import ray

    from loraforge import paths
    from loraforge.context import StageContext
    from loraforge.resolve import resolve_model
    from loraforge.serve.deployment import serve_forever

    try:
        spec, model_ref = load_serve_spec(argv[0])
        ray.init()  # honours RAY_ADDRESS; without it starts a local cluster
        ctx = StageContext(run_dir=paths.runs_dir() / "serve", model=resolve_model(model_ref), model_ref=model_ref)
        serve_forever(spec, ctx)
    except LoraforgeError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
