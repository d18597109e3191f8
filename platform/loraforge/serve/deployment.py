"""The Ray Serve shell: a model-server deployment whose replicas each hold an Engine and serve the
OpenAI API, beside one AdapterRegistry replica they all follow.

Ray Serve routes, scales and hosts; the engine and the FastAPI app know nothing of Ray.
`build_application(args)` is the application builder that `loraforge serve`, a generated Serve config
(`serve deploy`) and a KubeRay RayService all use. `start_service` checks the port, starts Serve and
the app and waits until `/v1/models` answers; `run_smoke` sends the spec's smoke prompts through the
official `openai` client; `serve_forever` backs `loraforge serve SPEC`, `ray_jobs/serve.py` and a
pipeline's keep_alive serve stage.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from ray import serve
from ray.serve import Application

from loraforge.cluster import port_in_use
from loraforge.context import StageContext
from loraforge.errors import ClusterError
from loraforge.resolve import resolve_model
from loraforge.serve.adapter_sources import resolve_adapter_source, scan_adapter_dir
from loraforge.serve.serve_config import APP_NAME, ServeAppArgs, app_args, served_base_name
from loraforge.spec import ServeSpec

log = logging.getLogger(__name__)

SMOKE_MAX_TOKENS = 32
READY_TIMEOUT_S = 180.0
_WILDCARD_HOSTS = ("0.0.0.0", "::", "")

__all__ = [
    "SMOKE_MAX_TOKENS", "ServiceHandle", "build_application", "render_chat_prompt", "run_smoke",
    "serve_forever", "served_base_name", "start_service", "wait_until_ready",
]


def resolve_adapter(source: str) -> Path:
    """A local PEFT folder for a folder path or an MLflow URI (downloaded once per replica)."""
    return resolve_adapter_source(source)


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_tag
    except Exception:  # noqa: BLE001 - outside a replica Serve raises its own exception type
        return "local"


# Late-bound ingress (`serve.ingress()` + `__serve_build_asgi_app__`): the FastAPI app is built in the
# replica after the engine is loaded, so routes close over this replica's engine and the same
# `build_app` serves unit tests without Ray.
@serve.deployment(max_constructor_retry_count=2)
@serve.ingress()
class LoraforgeServer:
    # Async: Serve runs a constructor on the replica's event loop, where blocking handle calls are refused;
    # the blocking work (loading the model, the first registry sync) runs in a worker thread instead.
    async def __init__(self, args: dict[str, Any], registry: Any):
        await asyncio.to_thread(self._start, ServeAppArgs.model_validate(args), registry)

    def _start(self, a: ServeAppArgs, registry: Any) -> None:
        from loraforge.serve.auth import KeyRing
        from loraforge.serve.engine import Engine
        from loraforge.serve.metrics import ServeEngineMetrics
        from loraforge.serve.registry import RegistrySync

        self.keys = KeyRing.from_args(a.api_keys)  # a missing key variable fails the replica, loudly
        self.engine = Engine(
            resolve_model(a.model), {}, base_name=a.base_name, max_new_tokens_limit=a.max_new_tokens_limit,
            max_batch_size=a.max_batch_size, cache_bytes=a.cache_bytes, metrics=ServeEngineMetrics(), max_len=a.max_len,
        )
        self.sync = RegistrySync(self.engine, registry, resolve_adapter)
        self.sync.sync()  # serve the registered adapters from the first request on
        self.sync.start()

    def __serve_build_asgi_app__(self) -> Any:
        from loraforge.serve.openai_api import build_app

        return build_app(self.engine, keys=self.keys, admin=self.sync, replica_id=_replica_id())

    def __del__(self) -> None:
        sync = getattr(self, "sync", None)
        if sync is not None:
            sync.stop()
        engine = getattr(self, "engine", None)
        if engine is not None and hasattr(engine, "close"):
            engine.close()


def build_application(args: dict[str, Any]) -> Application:
    """The Serve application for `ServeAppArgs` (the `import_path` target of generated Serve configs)."""
    from loraforge.serve.registry import AdapterRegistry

    a = args if isinstance(args, ServeAppArgs) else ServeAppArgs.model_validate(args)
    registry = AdapterRegistry.bind([x.model_dump() for x in a.adapters], a.adapter_dir, a.pinned)
    return LoraforgeServer.options(**a.deployment_options()).bind(a.model_dump(mode="json"), registry)


# ---------------------------------------------------------------- local start (loraforge serve, pipeline)
@dataclass
class ServiceHandle:
    url: str  # OpenAI base URL, e.g. http://127.0.0.1:8000/v1
    model_ref: str  # what the replicas loaded: 'lab', a folder or a hub id
    models: list[str]  # served names at start: the base model first, then the adapters
    owns_serve: bool = True  # False: Serve was already running on the cluster, leave it running
    keys: list[tuple[str, frozenset[str] | None]] = field(default_factory=list, repr=False)  # (key, allow-list)
    _closed: bool = field(default=False, repr=False)

    @property
    def base_model(self) -> str:
        return self.models[0]

    @property
    def adapters(self) -> list[str]:
        return self.models[1:]

    def key_for(self, model: str | None = None) -> str | None:
        """A configured API key that may use `model` (any model when None); None when the service is open."""
        if not self.keys:
            return None
        for key, allowed in self.keys:
            if allowed is None or model == self.base_model or (model is not None and model in allowed):
                return key
        return self.keys[0][0]

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            serve.delete(APP_NAME)
        finally:
            if self.owns_serve:
                serve.shutdown()


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


def _expected_adapters(spec: ServeSpec) -> list[str]:
    """Adapter names the service will list: the spec's, then the adapter folder's; each source checked here
    first, so a bad folder or MLflow URI fails before any replica starts."""
    names = []
    for a in spec.adapters:
        resolve_adapter(a.path)
        names.append(a.name)
    if spec.adapter_dir is not None:
        names += [n for n in sorted(scan_adapter_dir(Path(spec.adapter_dir).expanduser())) if n not in names]
    return names


def _auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def wait_until_ready(url: str, expected: list[str], timeout: float = READY_TIMEOUT_S,
                     api_key: str | None = None) -> None:
    """Poll GET {url}/models until it lists every expected model (the proxy learns routes a bit later)."""
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/models", timeout=5, headers=_auth_headers(api_key))
            if r.status_code == 200:
                served = [m["id"] for m in r.json()["data"]]
                if set(expected) <= set(served):
                    return
                last = f"serves {served}, expected {expected}"
            else:
                last = f"HTTP {r.status_code}: {r.text[:200]}"
        except httpx.HTTPError as err:
            last = f"{type(err).__name__}: {err}"
        time.sleep(0.5)
    raise ClusterError(f"the model service at {url} was not ready within {timeout:.0f}s ({last})")


def _plain_keys(spec: ServeSpec) -> list[tuple[str, frozenset[str] | None]]:
    import os

    keys = []
    for k in spec.api_keys:
        secret = k.key if k.key is not None else os.environ.get(str(k.key_env), "")
        keys.append((secret, None if k.adapters is None else frozenset(k.adapters)))
    return keys


def start_service(spec: ServeSpec, ctx: StageContext) -> ServiceHandle:
    """Deploy base model + adapters on Ray Serve and return once the OpenAI API answers."""
    model_ref = spec.model or ctx.model
    resolve_model(model_ref)  # a bad model reference fails here, not in every replica
    # Name the base model as the job file did ('lab', a hub id), not by the folder it resolved to.
    base_name = served_base_name(spec.model or ctx.model_ref or ctx.model)
    args = app_args(spec, model_ref, secrets="digest", base_name=base_name)  # replicas get digests only
    adapters = _expected_adapters(spec)
    owns_serve = _claim_port(spec)
    url = f"http://{client_host(spec.host)}:{spec.port}/v1"
    handle = ServiceHandle(url=url, model_ref=model_ref, models=[base_name, *adapters], owns_serve=owns_serve,
                           keys=_plain_keys(spec))
    if owns_serve:
        serve.start(http_options={"host": spec.host, "port": spec.port})
    try:
        serve.run(build_application(args), name=APP_NAME, route_prefix="/")
        wait_until_ready(url, handle.models, api_key=handle.key_for())
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
    """(prompt, served model, answer) for each smoke prompt on every adapter and the base, greedily,
    through /v1/chat/completions (the tokenizer's chat template)."""
    from openai import OpenAI

    max_tokens = min(SMOKE_MAX_TOKENS, spec.max_new_tokens_limit)
    answers = []
    for prompt in spec.smoke_prompts:
        for model in [*handle.adapters, handle.base_model]:
            client = OpenAI(base_url=handle.url, api_key=handle.key_for(model) or "none", timeout=120,
                            max_retries=1)
            r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                               max_tokens=max_tokens, temperature=0)
            answers.append((prompt, model, r.choices[0].message.content or ""))
    return answers


def _print_service(handle: ServiceHandle) -> None:
    print(f"loraforge serving {', '.join(handle.models)} at {handle.url}", flush=True)
    auth = " -H 'Authorization: Bearer $KEY'" if handle.keys else ""
    print(
        f"  try: curl {handle.url}/completions -H 'Content-Type: application/json'{auth} "
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
