"""`loraforge` command line: run, validate, submit, status, logs, stop, serve, adapters, dashboard, lab.

Every user error (bad job file, missing file, port in use, unreachable cluster) ends with one
message on stderr and exit code 2; validation runs before any cluster or run is started.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from loraforge.errors import ClusterError, LoraforgeError, SpecError

app = typer.Typer(
    pretty_exceptions_enable=False,
    add_completion=False, no_args_is_help=True, help="Curate, fine-tune, evaluate and serve LoRA adapters on Ray."
)
lab_app = typer.Typer(no_args_is_help=True, help="The embedded lab world and model.")
app.add_typer(lab_app, name="lab")
out = Console()
err = Console(stderr=True)

SPEC_ENV = "LORAFORGE_JOB_SPEC"
DEFAULT_JOBS_ADDRESS = "http://127.0.0.1:8265"

AddressOpt = Annotated[
    str | None, typer.Option("--address", help="Ray address (default: RAY_ADDRESS or a new local cluster)")
]
MlflowOpt = Annotated[
    str | None, typer.Option("--mlflow-uri", help="MLflow URI (default: MLFLOW_TRACKING_URI or a local server)")
]
MlflowPortOpt = Annotated[int, typer.Option("--mlflow-port", help="port of the local MLflow server if one is started")]


def _load_checked(path: str):
    from loraforge.spec import check_paths, load_spec

    spec = load_spec(path)
    check_paths(spec, path)
    return spec


def _load_from_env():
    """A job submitted with `loraforge submit` carries its spec in an environment variable."""
    import yaml

    from loraforge.spec import check_paths, parse_spec

    data = yaml.safe_load(base64.b64decode(os.environ[SPEC_ENV]).decode())
    spec = parse_spec(data, f"${SPEC_ENV}")
    check_paths(spec, f"${SPEC_ENV}")
    return spec


@app.command()
def validate(file: Annotated[str, typer.Argument(help="job file (YAML)")]) -> None:
    """Check a job file: every problem is printed with its field path; exit 2 if any."""
    spec = _load_checked(file)
    kinds = [s.kind for s in spec.stages] if hasattr(spec, "stages") else [spec.kind]
    out.print(f"{file}: ok ({', '.join(kinds)})")


@app.command()
def run(
    file: Annotated[str | None, typer.Argument(help="job file: a pipeline or a single stage")] = None,
    address: AddressOpt = None,
    mlflow_uri: MlflowOpt = None,
    mlflow_port: MlflowPortOpt = 5055,
    name: Annotated[str, typer.Option(help="pipeline name for a single-stage file")] = "job",
) -> None:
    """Run a job on an embedded local Ray cluster + MLflow (or the ones given)."""
    from loraforge.cluster import Services
    from loraforge.pipeline import as_pipeline, run_pipeline

    if file is None and SPEC_ENV not in os.environ:
        raise typer.BadParameter("give a job file")
    spec = as_pipeline(_load_checked(file) if file else _load_from_env(), name)
    with Services(ray_address=address, mlflow_uri=mlflow_uri, mlflow_port=mlflow_port) as services:
        result = run_pipeline(spec, services.mlflow_uri)
    summary = result.summary()
    out.rule("results")
    for key in ("mlflow_run_url", "mlflow_run_id", "run_dir", "adapter", "serve_url", "eval", "tune_best"):
        if key in summary:
            value = summary[key]
            shown = json.dumps(value) if isinstance(value, dict) else value
            out.print(f"{key:>16}: {shown}", soft_wrap=True, highlight=False)
    if services.owns_mlflow:
        out.print("(the local MLflow server has stopped; `loraforge dashboard` or `loraforge mlflow` "
                  "reopens these results)", soft_wrap=True)
    (result.run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))


def _serve_stage(file: str):
    """The serve stage of a serve file or pipeline file, and the base model reference it falls back to."""
    from loraforge.spec import PipelineSpec, ServeSpec

    spec = _load_checked(file)
    model_ref = "lab"
    if isinstance(spec, PipelineSpec):
        model_ref, spec = spec.model, spec.stage("serve")
        if spec is None:
            raise SpecError(file, [("stages", "no serve stage in this pipeline")])
    if not isinstance(spec, ServeSpec):
        raise SpecError(file, [("kind", f"expected a serve stage, got {spec.kind}")])
    return spec, spec.model or model_ref


@app.command()
def serve(
    file: Annotated[str, typer.Argument(help="serve stage file, or a pipeline file with a serve stage")],
    address: AddressOpt = None,
    mlflow_uri: MlflowOpt = None,
    emit_serve_config: Annotated[str | None, typer.Option(
        "--emit-serve-config", help="write a Serve config YAML for `serve deploy` and exit")] = None,
    emit_rayservice: Annotated[str | None, typer.Option(
        "--emit-rayservice", help="write a KubeRay RayService manifest and exit")] = None,
    image: Annotated[str, typer.Option(help="container image of the RayService pods")] = "loraforge:latest",
) -> None:
    """Serve the base model and adapters over an OpenAI-compatible API until stopped (Ctrl-C).

    With --emit-serve-config / --emit-rayservice, write the deployment files for the same spec instead."""
    spec, ref = _serve_stage(file)
    if emit_serve_config or emit_rayservice:
        from loraforge.serve.serve_config import rayservice, serve_config, write_yaml

        header = f"# Generated by `loraforge serve {file}` from the serve spec; regenerate rather than edit.\n"
        if emit_serve_config:
            path = write_yaml(serve_config(spec, ref), emit_serve_config, header)
            out.print(f"Serve config: {path} (deploy: serve deploy {path})", highlight=False)
        if emit_rayservice:
            path = write_yaml(rayservice(spec, ref, image=image), emit_rayservice, header)
            out.print(f"RayService: {path} (deploy: kubectl apply -f {path})", highlight=False)
        return

    from loraforge.cluster import Services
    from loraforge.context import StageContext
    from loraforge.pipeline import _new_run_dir
    from loraforge.resolve import resolve_model
    from loraforge.serve.deployment import serve_forever

    if not (spec.adapters or spec.adapter_dir):
        err.print("note: no adapters in the spec; serving the base model (add adapters with `loraforge adapters add`)")
    with Services(ray_address=address, mlflow_uri=mlflow_uri):
        ctx = StageContext(run_dir=_new_run_dir("serve"), model=resolve_model(ref), model_ref=ref)
        serve_forever(spec.model_copy(update={"keep_alive": True}), ctx)


# ---------------------------------------------------------------- adapters on a running service
adapters_app = typer.Typer(no_args_is_help=True, help="List, add and remove adapters of a running service.")
app.add_typer(adapters_app, name="adapters")
UrlOpt = Annotated[str, typer.Option("--url", help="the service's URL (with or without /v1)")]
ApiKeyOpt = Annotated[str | None, typer.Option(
    "--api-key", envvar="LORAFORGE_API_KEY", help="an admin API key (default: LORAFORGE_API_KEY)")]


def _admin_call(method: str, url: str, api_key: str | None, path: str = "", body: dict | None = None) -> Any:
    import httpx

    base = url.rstrip("/")
    base = base if base.endswith("/v1") else f"{base}/v1"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = httpx.request(method, f"{base}/admin/adapters{path}", json=body, headers=headers, timeout=600)
    except httpx.HTTPError as e:
        raise ClusterError(f"cannot reach the model service at {base}: {e}") from None
    if r.status_code >= 400:
        try:
            message = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = r.text[:500]
        raise ClusterError(f"{method} {base}/admin/adapters{path}: HTTP {r.status_code}: {message}")
    return r.json()


@adapters_app.command("list")
def adapters_list(url: UrlOpt = "http://127.0.0.1:8000", api_key: ApiKeyOpt = None) -> None:
    """The service's adapters with their state, content hash and rank."""
    from rich.table import Table

    table = Table("name", "state", "rank", "pinned", "content hash")
    for a in _admin_call("GET", url, api_key)["data"]:
        table.add_row(a["id"], a["state"], str(a.get("rank") or "-"), "yes" if a.get("pinned") else "",
                      (a.get("content_hash") or a.get("error") or "")[:16])
    out.print(table)


@adapters_app.command("add")
def adapters_add(
    name: Annotated[str, typer.Argument(help="the served name (the `model` field of requests)")],
    source: Annotated[str, typer.Argument(help="adapter folder, runs:/RUN/PATH, models:/NAME/VERSION or @ALIAS")],
    url: UrlOpt = "http://127.0.0.1:8000",
    api_key: ApiKeyOpt = None,
    pin: Annotated[bool, typer.Option("--pin", help="load now and never evict")] = False,
) -> None:
    """Register an adapter on every replica (replaces one of the same name)."""
    card = _admin_call("POST", url, api_key, body={"name": name, "source": source, "pin": pin})
    out.print(f"added {card['id']} ({card['state']}, {(card.get('content_hash') or '')[:16]})", highlight=False)


@adapters_app.command("remove")
def adapters_remove(
    name: Annotated[str, typer.Argument(help="the served name")],
    url: UrlOpt = "http://127.0.0.1:8000",
    api_key: ApiKeyOpt = None,
) -> None:
    """Unregister an adapter; running requests finish, new ones get 404."""
    _admin_call("DELETE", url, api_key, path=f"/{name}")
    out.print(f"removed {name}", highlight=False)


def _use_ray_token_if_present() -> None:
    """Ray >= 2.52 clusters may require a token; send ours when we have one and nothing says otherwise."""
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if "RAY_AUTH_MODE" not in os.environ and ("RAY_AUTH_TOKEN" in os.environ or token_file.is_file()):
        os.environ["RAY_AUTH_MODE"] = "token"


def _jobs_client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    _use_ray_token_if_present()
    address = address or os.environ.get("RAY_ADDRESS") or DEFAULT_JOBS_ADDRESS
    if not address.startswith("http"):
        raise ClusterError(f"--address must be the Ray dashboard URL (http://HOST:8265), got {address!r}")
    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ClusterError(f"cannot reach the Ray Jobs API at {address}: {e}") from None


@app.command()
def submit(
    file: Annotated[str, typer.Argument(help="job file")],
    address: Annotated[str | None, typer.Option("--address", help="Ray dashboard URL, e.g. http://HOST:8265")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="follow the logs until the job ends")] = False,
) -> None:
    """Submit a job file to a Ray cluster through the Ray Jobs API (the project is shipped with it)."""
    from loraforge.paths import PROJECT_ROOT

    spec_path = Path(file)
    _load_checked(file)  # the same validation as `run`, before anything is shipped
    env = {SPEC_ENV: base64.b64encode(spec_path.read_bytes()).decode()}
    for key in ("MLFLOW_TRACKING_URI", "LORAFORGE_SHARED_DATA", "HF_HUB_OFFLINE"):
        if key in os.environ:
            env[key] = os.environ[key]
    client = _jobs_client(address)
    job_id = client.submit_job(
        entrypoint=f"python ray_jobs/pipeline.py --name {spec_path.stem}",
        runtime_env={
            "working_dir": str(PROJECT_ROOT),
            "py_modules": [str(PROJECT_ROOT / "platform" / "loraforge")],
            "excludes": [".venv", ".loraforge", ".git", "**/__pycache__", "*.egg-info", "benchmarks"],
            "env_vars": env,
        },
        metadata={"loraforge_spec": spec_path.name},
    )
    out.print(job_id)
    if wait:
        _follow(client, job_id)


def _follow(client, job_id: str) -> None:
    import asyncio

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)

    asyncio.run(tail())
    status = client.get_job_status(job_id)
    out.print(f"job {job_id}: {status.value}")
    if status.value != "SUCCEEDED":
        raise typer.Exit(1)


@app.command()
def status(job_id: str, address: Annotated[str | None, typer.Option("--address")] = None) -> None:
    """Print a submitted job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED)."""
    client = _jobs_client(address)
    try:
        info = client.get_job_info(job_id)
    except RuntimeError as e:
        raise ClusterError(f"no job {job_id!r} at {client.get_address()}: {e}") from None
    out.print(info.status.value)
    if info.message:
        err.print(info.message)


@app.command()
def logs(
    job_id: str,
    address: Annotated[str | None, typer.Option("--address")] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f")] = False,
) -> None:
    """Print a submitted job's logs (-f to follow until it ends)."""
    client = _jobs_client(address)
    if follow:
        _follow(client, job_id)
        return
    try:
        sys.stdout.write(client.get_job_logs(job_id))
    except RuntimeError as e:
        raise ClusterError(f"no job {job_id!r} at {client.get_address()}: {e}") from None


@app.command()
def stop(job_id: str, address: Annotated[str | None, typer.Option("--address")] = None) -> None:
    """Stop a submitted job."""
    client = _jobs_client(address)
    try:
        stopped = client.stop_job(job_id)
    except RuntimeError as e:
        raise ClusterError(f"no job {job_id!r} at {client.get_address()}: {e}") from None
    out.print("stopping" if stopped else "already finished")


@app.command()
def dashboard(
    port: Annotated[int, typer.Option(help="port for the Streamlit app")] = 8501,
    mlflow_uri: MlflowOpt = None,
    mlflow_port: MlflowPortOpt = 5055,
) -> None:
    """Open the Streamlit dashboard over MLflow (starts the local MLflow server if none is given)."""
    from loraforge import paths
    from loraforge.cluster import port_in_use, start_mlflow_server
    from loraforge.dashboard_launch import launch

    if port_in_use(port):
        raise ClusterError(f"port {port} is already in use: pass --port")
    uri = mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")
    server = None if uri else start_mlflow_server(paths.home() / "mlflow", mlflow_port)
    try:
        launch(port, uri or server.uri)
    finally:
        if server:
            server.stop()


@app.command()
def mlflow(port: MlflowPortOpt = 5055) -> None:
    """Start the local MLflow server over this folder's runs and keep it up until Ctrl-C."""
    from loraforge import paths
    from loraforge.cluster import start_mlflow_server

    server = start_mlflow_server(paths.home() / "mlflow", port)
    out.print(f"MLflow at {server.uri} (Ctrl-C to stop)")
    try:
        while server.process is None or server.process.poll() is None:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


@lab_app.command("build")
def lab_build(force: Annotated[bool, typer.Option("--force", help="rebuild even if cached")] = False) -> None:
    """Build (or reuse) the lab world, tokenizer and pretrained lab model."""
    from loraforge.lab.build import ensure_lab

    lab = ensure_lab(force=force)
    out.print(f"model: {lab.model_dir}\ndata:  {lab.data_dir}\ntasks: {', '.join(lab.tasks)}")
    report: dict[str, Any] = lab.report
    out.print(json.dumps(report, indent=2, default=str))


def setup_progress_logging() -> None:
    """Stage progress (`loraforge.*` INFO lines: curate steps, rows left, timings) on stderr."""
    logger = logging.getLogger("loraforge")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(os.environ.get("LORAFORGE_LOG_LEVEL", "INFO"))
        logger.propagate = False


def main(argv: list[str] | None = None) -> None:
    setup_progress_logging()
    try:
        app(args=argv, prog_name="loraforge")  # click handles usage errors itself (exit 2)
    except LoraforgeError as e:
        err.print(f"error: {e}", highlight=False, markup=False, soft_wrap=True)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
