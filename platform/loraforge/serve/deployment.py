"""The Ray Serve shell: one deployment whose replicas each hold an Engine and serve the OpenAI API.

Ray Serve routes, scales and hosts; the engine and the FastAPI app know nothing of Ray.
`start_service` checks the port, starts Serve and the app and waits until `/v1/models` answers;
`run_smoke` sends the spec's smoke prompts through the official `openai` client;
`serve_forever` backs `loraforge serve SPEC`, `ray_jobs/serve.py` and a pipeline's keep_alive serve stage.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from ray import serve

from loraforge.cluster import port_in_use
from loraforge.context import StageContext
from loraforge.errors import ClusterError, SpecError
from loraforge.resolve import load_tokenizer, resolve_model
from loraforge.serve.engine import Engine, check_adapter_dir
from loraforge.serve.openai_api import build_app
from loraforge.spec import LAB_MODEL, ServeSpec

APP_NAME = "loraforge"
REPLICA_CPUS = 0.5  # fractional, so replicas fit beside Train/Tune workers on a small cluster
SMOKE_MAX_TOKENS = 32
READY_TIMEOUT_S = 180.0
_WILDCARD_HOSTS = ("0.0.0.0", "::", "")


# Late-bound ingress (`serve.ingress()` + `__serve_build_asgi_app__`): the FastAPI app is built in the
# replica after the engine is loaded, so routes close over this replica's engine and the same
# `build_app` serves unit tests without Ray.
@serve.deployment(ray_actor_options={"num_cpus": REPLICA_CPUS}, max_constructor_retry_count=2)
@serve.ingress()
class LoraforgeServer:
    def __init__(self, model_ref: str, adapters: dict[str, str], base_name: str, max_new_tokens_limit: int):
        self.engine = Engine(model_ref, adapters, base_name=base_name, max_new_tokens_limit=max_new_tokens_limit)

    def __serve_build_asgi_app__(self) -> Any:
        return build_app(self.engine)


@dataclass
class ServiceHandle:
    url: str  # OpenAI base URL, e.g. http://127.0.0.1:8000/v1
    model_ref: str  # what the replicas loaded: 'lab', a folder or a hub id
    models: list[str]  # served names: the base model first, then the adapters
    owns_serve: bool = True  # False: Serve was already running on the cluster, leave it running
    _closed: bool = field(default=False, repr=False)

    @property
    def base_model(self) -> str:
        return self.models[0]

    @property
    def adapters(self) -> list[str]:
        return self.models[1:]

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            serve.delete(APP_NAME)
        finally:
            if self.owns_serve:
                serve.shutdown()


def served_base_name(model_ref: str) -> str:
    """The base model's name in /v1/models: 'lab', a hub id, or a local folder's name."""
    if model_ref == LAB_MODEL:
        return model_ref
    path = Path(model_ref).expanduser()
    return path.resolve().name if path.exists() else model_ref


def client_host(host: str) -> str:
    return "127.0.0.1" if host in _WILDCARD_HOSTS else host


def _running_serve_port() -> int | None:
    """HTTP port of a Serve instance already running on this Ray cluster, or None."""
    # No public API exposes the running instance's HTTP options; the controller client does.
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    return None if client is None else int(client.http_config.port)


def _claim_port(spec: ServeSpec) -> bool:
    """Check the port before Serve starts; True when this call must start (and later stop) Serve."""
    running = _running_serve_port()
    if running is not None:
        if running != spec.port:
            raise ClusterError(
                f"Ray Serve already runs on this Ray cluster with HTTP port {running}, not {spec.port}: "
                f"set `port: {running}` in the serve spec or stop it first (`serve shutdown`)"
            )
        return False
    if port_in_use(spec.port, client_host(spec.host)):
        raise ClusterError(
            f"port {spec.port} on {spec.host} is already in use by another program: "
            "choose a free port (`port:` in the serve spec) or stop that program"
        )
    return True


def _adapter_folders(spec: ServeSpec) -> dict[str, str]:
    names = [a.name for a in spec.adapters]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SpecError("serve", [("adapters", f"adapter names must be unique, repeated: {dupes}")])
    return {a.name: str(check_adapter_dir(a.path)) for a in spec.adapters}


def wait_until_ready(url: str, expected: list[str], timeout: float = READY_TIMEOUT_S) -> None:
    """Poll GET {url}/models until it lists every expected model (the proxy learns routes a bit later)."""
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/models", timeout=5)
            if r.status_code == 200:
                served = [m["id"] for m in r.json()["data"]]
                if served == expected:
                    return
                last = f"serves {served}, expected {expected}"
            else:
                last = f"HTTP {r.status_code}: {r.text[:200]}"
        except httpx.HTTPError as err:
            last = f"{type(err).__name__}: {err}"
        time.sleep(0.5)
    raise ClusterError(f"the model service at {url} was not ready within {timeout:.0f}s ({last})")


def start_service(spec: ServeSpec, ctx: StageContext) -> ServiceHandle:
    """Deploy base model + adapters on Ray Serve and return once the OpenAI API answers."""
    model_ref = spec.model or ctx.model
    resolve_model(model_ref)  # a bad model reference fails here, not in every replica
    adapters = _adapter_folders(spec)
    # Name the base model as the job file did ('lab', a hub id), not by the folder it resolved to.
    base_name = served_base_name(spec.model or ctx.model_ref or ctx.model)
    owns_serve = _claim_port(spec)
    url = f"http://{client_host(spec.host)}:{spec.port}/v1"
    models = [base_name, *adapters]

    app = LoraforgeServer.options(
        num_replicas=spec.num_replicas,
        # The simple engine serves one request at a time; capping ongoing requests per replica at the
        # batch size makes the router spread load instead of queueing it all behind one lock.
        max_ongoing_requests=spec.max_batch_size,
    ).bind(model_ref, adapters, base_name, spec.max_new_tokens_limit)
    if owns_serve:
        serve.start(http_options={"host": spec.host, "port": spec.port})
    handle = ServiceHandle(url=url, model_ref=model_ref, models=models, owns_serve=owns_serve)
    try:
        serve.run(app, name=APP_NAME, route_prefix="/")
        wait_until_ready(url, models)
    except BaseException as err:
        try:
            handle.shutdown()
        except Exception:  # the start-up error is the one worth reporting
            pass
        if isinstance(err, ClusterError | KeyboardInterrupt):
            raise
        raise ClusterError(f"the model service did not start on {url}: {err}") from err
    return handle


def render_chat_prompt(tokenizer, user_text: str) -> str:
    """The shared chat convention; a tokenizer without a chat template gets the raw text."""
    if not getattr(tokenizer, "chat_template", None):
        return user_text
    messages = [{"role": "user", "content": user_text}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def run_smoke(handle: ServiceHandle, spec: ServeSpec) -> list[tuple[str, str, str]]:
    """(prompt, served model, answer) for each smoke prompt on every adapter and the base, greedily."""
    from openai import OpenAI

    tokenizer = load_tokenizer(handle.model_ref)
    client = OpenAI(base_url=handle.url, api_key="loraforge", timeout=120, max_retries=1)
    max_tokens = min(SMOKE_MAX_TOKENS, spec.max_new_tokens_limit)
    answers = []
    for prompt in spec.smoke_prompts:
        rendered = render_chat_prompt(tokenizer, prompt)
        for model in [*handle.adapters, handle.base_model]:
            r = client.completions.create(model=model, prompt=rendered, max_tokens=max_tokens, temperature=0)
            answers.append((prompt, model, r.choices[0].text))
    return answers


def _print_service(handle: ServiceHandle) -> None:
    print(f"loraforge serving {', '.join(handle.models)} at {handle.url}", flush=True)
    print(
        f"  try: curl {handle.url}/completions -H 'Content-Type: application/json' "
        f"-d '{{\"model\": \"{handle.models[-1]}\", \"prompt\": \"Hello\", \"max_tokens\": 16}}'",
        flush=True,
    )


def _print_smoke(answers: list[tuple[str, str, str]]) -> None:
    for prompt, model, answer in answers:
        print(f"[{model}] {prompt!r} -> {answer!r}", flush=True)


def wait_for_shutdown_signal() -> None:
    """Block until Ctrl-C or SIGTERM (the signal a RayJob / Kubernetes sends to stop)."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        stop.wait()  # signals only reach the main thread; a caller elsewhere stops us by other means
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def serve_forever(spec: ServeSpec, ctx: StageContext) -> None:
    """`loraforge serve SPEC`: start, print the URL, models and smoke answers, serve until stopped."""
    handle = start_service(spec, ctx)
    try:
        _print_service(handle)
        if spec.smoke_prompts:
            _print_smoke(run_smoke(handle, spec))
        print("serving; Ctrl-C or SIGTERM stops", flush=True)
        wait_for_shutdown_signal()
    finally:
        print("shutting down the model service", flush=True)
        handle.shutdown()
