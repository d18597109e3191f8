"""The adapter registry every replica serves from: name -> source, with a version counter.

`AdapterTable` is the plain-Python state: adapters named in the spec, every subfolder of the spec's
`adapter_dir`, and those added through the admin API. `AdapterRegistry` is the Ray Serve deployment
(one replica) that holds it, so its lifetime is the application's. Each model-server replica runs a
`RegistrySync`: it polls the version about once a second, and also on a request for an unknown name,
and applies the difference to its own engine (add, replace, remove), so an adapter added through any
replica is served by all of them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from ray import serve

from loraforge.errors import LoraforgeError
from loraforge.serve.adapter_sources import scan_adapter_dir
from loraforge.serve.engine.errors import UnknownModelError
from loraforge.serve.serve_config import AdapterSourceArg

log = logging.getLogger(__name__)

Origin = Literal["spec", "dir", "admin"]
POLL_INTERVAL_S = 1.0


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    source: str
    pin: bool
    revision: int  # the table version at which this entry was last written
    origin: Origin


class AdapterTable:
    """Registered adapters and a version that grows with every change."""

    def __init__(self, adapters: Iterable[AdapterSourceArg] = (), adapter_dir: str | None = None,
                 pinned: Iterable[str] = (), scan: Callable[[Path], Mapping[str, Path]] = scan_adapter_dir):
        self.version = 0
        self._entries: dict[str, RegistryEntry] = {}
        self._adapter_dir = Path(adapter_dir).expanduser() if adapter_dir else None
        self._pinned = set(pinned)
        self._scan = scan
        for a in adapters:  # the spec's list first; it wins over a same-named subfolder
            self.put(a.name, a.source, a.pin or a.name in self._pinned, "spec")
        self.rescan()

    def put(self, name: str, source: str, pin: bool = False, origin: Origin = "admin") -> RegistryEntry:
        self.version += 1
        entry = RegistryEntry(name, source, pin, self.version, origin)
        self._entries[name] = entry
        return entry

    def remove(self, name: str) -> int:
        if name not in self._entries:
            raise UnknownModelError(name, sorted(self._entries))
        del self._entries[name]
        self.version += 1
        return self.version

    def rescan(self) -> int:
        """Register subfolders of adapter_dir that appeared since the last scan; the version after."""
        if self._adapter_dir is None:
            return self.version
        for name, folder in sorted(self._scan(self._adapter_dir).items()):
            if name not in self._entries:
                self.put(name, str(folder), name in self._pinned, "dir")
        return self.version

    def snapshot(self) -> tuple[int, list[RegistryEntry]]:
        return self.version, sorted(self._entries.values(), key=lambda e: e.revision)


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
class AdapterRegistry:
    """One replica holding the AdapterTable; model-server replicas call it through a DeploymentHandle."""

    def __init__(self, adapters: list[dict[str, Any]], adapter_dir: str | None, pinned: list[str]):
        self.table = AdapterTable([AdapterSourceArg.model_validate(a) for a in adapters], adapter_dir, pinned)

    def version(self) -> int:
        return self.table.version

    def snapshot(self) -> tuple[int, list[dict[str, Any]]]:
        version, entries = self.table.snapshot()
        return version, [asdict(e) for e in entries]

    def put(self, name: str, source: str, pin: bool) -> dict[str, Any]:
        return asdict(self.table.put(name, source, pin, "admin"))

    def remove(self, name: str) -> int | None:
        """The version after removing `name`; None if it was not registered."""
        try:
            return self.table.remove(name)
        except UnknownModelError:
            return None

    def rescan(self) -> int:
        return self.table.rescan()


class AdapterEngine(Protocol):
    base_name: str

    def models(self) -> list[str]: ...

    def add_adapter(self, name: str, folder: str | Path, *, pin: bool = False) -> Any: ...

    def remove_adapter(self, name: str) -> None: ...


Resolver = Callable[[str], Path]


class RegistrySync:
    """Keeps one replica's engine in step with the registry; also the admin backend of that replica."""

    def __init__(self, engine: AdapterEngine, registry: Any, resolve: Resolver, timeout_s: float = 30.0):
        self.engine = engine
        self.registry = registry  # DeploymentHandle to AdapterRegistry
        self.resolve = resolve
        self.timeout_s = timeout_s
        self.failed: dict[str, str] = {}  # adapters this replica could not load, with the reason
        self._applied: dict[str, int] = {}  # name -> registry revision loaded into the engine
        self._seen_version = -1
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _call(self, method: str, *args: Any) -> Any:
        return getattr(self.registry, method).remote(*args).result(timeout_s=self.timeout_s)

    def sync(self, rescan: bool = False) -> bool:
        """Apply the registry's current state; True when anything changed. Blocking (call off the event loop)."""
        with self._lock:
            version = self._call("rescan" if rescan else "version")
            if version == self._seen_version:
                return False
            version, entries = self._call("snapshot")
            self._apply([RegistryEntry(**e) for e in entries])
            self._seen_version = version
            return True

    def _apply(self, entries: list[RegistryEntry]) -> None:
        wanted = {e.name: e for e in entries}
        for name in [n for n in self._applied if n not in wanted]:
            self._applied.pop(name)
            self.failed.pop(name, None)
            try:
                self.engine.remove_adapter(name)
            except UnknownModelError:
                pass
        for e in entries:
            if self._applied.get(e.name) == e.revision:
                continue
            self._applied[e.name] = e.revision  # also on failure: retried only when the entry changes
            try:
                self.engine.add_adapter(e.name, self.resolve(e.source), pin=e.pin)
                self.failed.pop(e.name, None)
            except LoraforgeError as err:
                log.warning("adapter %s from %s could not be added on this replica: %s", e.name, e.source, err)
                self.failed[e.name] = str(err)

    def add(self, name: str, source: str, pin: bool) -> None:
        """Admin add: validated and loaded here first, so a bad source fails the request, then registered."""
        with self._lock:
            self.engine.add_adapter(name, self.resolve(source), pin=pin)
            entry = self._call("put", name, source, pin)
            self._applied[name] = entry["revision"]
            self.failed.pop(name, None)

    def remove(self, name: str) -> None:
        with self._lock:
            if self._call("remove", name) is None:
                raise UnknownModelError(name, self.engine.models())
            self._applied.pop(name, None)
            self.failed.pop(name, None)
            self.engine.remove_adapter(name)

    def start(self, interval_s: float = POLL_INTERVAL_S) -> None:
        def loop() -> None:
            while not self._stop.wait(interval_s):
                try:
                    self.sync()
                except Exception as err:  # noqa: BLE001 - a registry hiccup must not kill the poller
                    log.warning("adapter registry poll failed: %s", err)

        self._thread = threading.Thread(target=loop, name="adapter-registry-sync", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
