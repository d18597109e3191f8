"""Where served adapters come from: a folder of adapter folders, or MLflow (runs:/, models:/, any artifact URI).

MLflow sources are downloaded once into `download_root/<sanitised source>`: into a temporary folder first,
renamed into place only when complete, so a crashed download is never mistaken for an adapter.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import urllib.request
from pathlib import Path

from loraforge.errors import ModelError
from loraforge.serve.engine.folders import ADAPTER_CONFIG, check_adapter_dir

ADAPTER_NAME_RULE = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
_NAME = re.compile(ADAPTER_NAME_RULE)
_URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def check_adapter_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ModelError(f"adapter name {name!r} is not allowed: names must match {ADAPTER_NAME_RULE} "
                         f"(a letter or digit, then up to 63 letters, digits, '.', '_' or '-')")
    return name


def scan_adapter_dir(root: Path) -> dict[str, Path]:
    """Every direct subfolder of `root` holding adapter_config.json, by folder name (sorted)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ModelError(f"adapter directory not found: {root}")
    found = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and (p / ADAPTER_CONFIG).is_file()):
        found[check_adapter_name(folder.name)] = folder.resolve()
    return found


def _sanitised(source: str) -> str:
    """A folder name for a source URI: readable, filesystem-safe, distinct per source."""
    import hashlib

    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", source).strip("._")[:80] or "source"
    return f"{readable}-{hashlib.sha256(source.encode()).hexdigest()[:10]}"


def _explain(source: str, error: Exception, tracking_uri: str) -> ModelError:
    """An MLflow failure as a message naming the source and the likely cause."""
    text = str(error)
    server = tracking_uri
    if "ConnectionError" in type(error).__name__ or re.search(r"Max retries|Connection refused|Failed to establish",
                                                                text):
        why = f"no MLflow server reachable at {server}"
    elif m := re.search(r"Failed to download artifacts from path '([^']*)'", text):
        why = f"no artifact {m[1]!r} there on {server}"
    elif "RESOURCE_DOES_NOT_EXIST" in text or "not found" in text.lower() or "does not exist" in text.lower():
        why = f"not found on {server}: {text.splitlines()[0] if text else type(error).__name__}"
    else:
        why = f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"
    return ModelError(f"cannot fetch adapter {source!r}: {why}")


def _tracking_uri(source: str, tracking_uri: str | None) -> str:
    """The MLflow server to ask; an http one must answer its health check now (MLflow's own retries take long).
    Never MLflow's default: that would create an empty local store in the current folder."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise ModelError(f"cannot fetch adapter {source!r}: no MLflow tracking server given "
                         f"(pass the tracking URI or set MLFLOW_TRACKING_URI)")
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=10) as response:
                response.read()
        except (OSError, ValueError) as e:
            raise ModelError(f"cannot fetch adapter {source!r}: no MLflow server reachable at {uri} ({e})") from e
    return uri


def _download(source: str, into: Path, tracking_uri: str) -> Path:
    import mlflow.artifacts

    try:
        path = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(into),
                                                         tracking_uri=tracking_uri, registry_uri=tracking_uri))
    except Exception as e:  # MlflowException, OSError, requests' errors: each becomes a message naming the source
        raise _explain(source, e, tracking_uri) from e
    if path.is_file():
        raise ModelError(f"adapter source {source!r} is a single file ({path.name}); it must name the adapter folder")
    return path


def default_download_root() -> Path:
    from loraforge import paths

    return paths.home() / "adapters"


def resolve_adapter_source(source: str, download_root: Path | None = None, tracking_uri: str | None = None) -> Path:
    """A local adapter folder for `source`: a folder path as is; `runs:/<run_id>/<path>`, `models:/<name>/<version>`,
    `models:/<name>@<alias>` or any other URI MLflow downloads, fetched into `download_root` (default
    $LORAFORGE_HOME/adapters; reused once complete). The result must be a safetensors PEFT adapter folder."""
    if source.startswith("file:"):
        from urllib.parse import unquote, urlparse

        return check_adapter_dir(Path(unquote(urlparse(source).path)))
    if not _URI_SCHEME.match(source):
        return check_adapter_dir(Path(source).expanduser())
    if source.startswith("models:/") and not re.fullmatch(r"models:/[^/@]+(/[^/]+|@[^/]+)/?", source):
        raise ModelError(f"adapter source {source!r}: expected models:/<name>/<version> or models:/<name>@<alias>")
    if source.startswith("runs:/") and not re.fullmatch(r"runs:/[^/]+/.+", source):
        raise ModelError(f"adapter source {source!r}: expected runs:/<run_id>/<artifact path to the adapter folder>")
    download_root = Path(download_root).expanduser() if download_root is not None else default_download_root()
    target = download_root / _sanitised(source)
    if target.is_dir():
        return check_adapter_dir(target)
    tracking_uri = _tracking_uri(source, tracking_uri)
    download_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=download_root))
    try:
        fetched = _download(source, staging, tracking_uri)
        try:
            check_adapter_dir(fetched)
        except ModelError as e:
            raise ModelError(f"adapter source {source!r} is not a usable adapter: {e}") from e
        try:
            fetched.rename(target)
        except OSError:
            if not target.is_dir():  # a concurrent resolver may have put the same download in place first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return check_adapter_dir(target)
