"""MLflow tracking and model registry for training jobs; only global rank 0 calls it.

Store: by default a SQLite file and an artifact folder beside the run folders
(``<run_dir>/../mlflow.db`` and ``<run_dir>/../mlartifacts``), so nothing needs a server.
``server_command`` builds an ``mlflow server`` command for the same store, bound to 127.0.0.1
unless another host is passed explicitly.

Guarantees of ``Tracker``:

- one MLflow run per training job, also across resumes. The run id is stored in each
  checkpoint, and a resumed job reopens that run and tags it ``resumed_from_step``. It skips
  metric points whose step the run already contains, so the run keeps one value per step;
- jobs that start together against a fresh SQLite store all succeed: store creation and
  experiment creation run under a file lock beside the database, and every MLflow call is
  retried with exponential backoff on transient errors such as ``database is locked``;
- a tracking failure never stops training: after the last retry it is logged as a warning
  (the first few, then every 100th) and the call returns None.

``ModelRegistry`` registers exported models (safetensors + config.json, never a pickled
module), moves aliases such as ``champion`` and ``challenger``, loads a version by alias into
``BumblebeeEncoder``, and rejects deleting a version that holds an alias unless ``force=True``.

MLflow 3.x sends anonymous usage telemetry to a remote host unless ``MLFLOW_DISABLE_TELEMETRY``
is set; this module sets it to true when the user has not set it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import random
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, TypeVar

from bumblebee_dist.config import TrackingConfig

LOG = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_DB_NAME = "mlflow.db"
DEFAULT_ARTIFACT_DIR = "mlartifacts"
MODEL_ARTIFACT_PATH = "model"
CHAMPION = "champion"
CHALLENGER = "challenger"
# MLflow error codes where a retry cannot help.
_PERMANENT_CODES = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST",
                    "RESOURCE_ALREADY_EXISTS", "PERMISSION_DENIED", "BAD_REQUEST"}
_WARNINGS_SHOWN = 5  # tracking failures logged in full before switching to every 100th


class TrackingError(RuntimeError):
    """A registry request that cannot succeed as asked; the message names the model and the fix."""


def _mlflow():
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # MLflow retries an HTTP request 7 times with growing waits by default, inside each of this
    # module's own attempts, so an unreachable server blocked a command for over 10 minutes.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    import mlflow

    return mlflow


def default_store(run_dir: str | Path) -> tuple[str, Path]:
    """Return the default tracking URI and artifact folder for a run folder."""
    store_dir = Path(run_dir).resolve().parent
    return f"sqlite:///{store_dir / DEFAULT_DB_NAME}", store_dir / DEFAULT_ARTIFACT_DIR


def resolve_store(config: TrackingConfig, run_dir: str | Path) -> tuple[str, Path | None]:
    """Return (tracking URI, artifact folder for new experiments) from the config.

    An empty ``tracking.uri`` gives the default store beside the run folder. A SQLite URI
    without ``tracking.artifact_dir`` keeps artifacts in ``mlartifacts`` beside the database; a
    server URI leaves artifact placement to the server (None).
    """
    if not config.uri:
        uri, artifacts = default_store(run_dir)
    else:
        uri, artifacts = config.uri, None
        if uri.startswith("sqlite:///"):
            artifacts = Path(uri[len("sqlite:///"):]).parent / DEFAULT_ARTIFACT_DIR
    if config.artifact_dir:
        artifacts = Path(config.artifact_dir).resolve()
    return uri, artifacts


def _is_transient(error: Exception) -> bool:
    text = str(error).lower()
    if "locked" in text or "busy" in text:
        return True
    return getattr(error, "error_code", None) not in _PERMANENT_CODES


def retry(action: Callable[[], T], description: str, attempts: int, base_delay: float = 0.2) -> T:
    """Call ``action`` up to ``attempts`` times, sleeping with jittered exponential backoff.

    Errors MLflow marks as permanent (an invalid value, a missing resource) are raised at once.
    """
    attempt = 1
    while True:
        try:
            return action()
        except Exception as error:  # MLflow, SQLAlchemy and OS errors all reach here
            if attempt >= attempts or not _is_transient(error):
                raise
            delay = base_delay * 2 ** (attempt - 1) * (1 + random.random())
            LOG.info("MLflow %s failed (%s: %s); retry %d of %d in %.2f s",
                     description, type(error).__name__, str(error).splitlines()[0][:200], attempt,
                     attempts - 1, delay)
            time.sleep(delay)
            attempt += 1


@contextlib.contextmanager
def store_lock(tracking_uri: str) -> Iterator[None]:
    """Hold an exclusive file lock beside a SQLite store; do nothing for other stores.

    MLflow creates the schema of a fresh SQLite file on first use, and two processes doing that
    at once can fail. The lock makes them take turns on one machine.
    """
    if not tracking_uri.startswith("sqlite:///"):
        yield
        return
    db_path = Path(tracking_uri[len("sqlite:///"):])
    db_path.parent.mkdir(parents=True, exist_ok=True)
    with open(db_path.with_name(db_path.name + ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def check_reachable(tracking_uri: str, timeout: float = 5.0) -> None:
    """Raise TrackingError when an HTTP tracking server does not accept a connection."""
    from urllib.parse import urlparse

    parsed = urlparse(tracking_uri)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout).close()
    except OSError as error:
        raise TrackingError(f"cannot reach the MLflow tracking server {tracking_uri}: {error}. "
                            "Start the server, or pass another tracking URI") from error


def make_client(tracking_uri: str, attempts: int = 6):
    """Return an ``MlflowClient`` whose store exists (created under ``store_lock`` if new)."""
    mlflow = _mlflow()

    def connect():
        check_reachable(tracking_uri)
        client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        client.search_experiments(max_results=1)  # forces schema creation
        return client

    with store_lock(tracking_uri):
        return retry(connect, f"connect to {tracking_uri}", attempts)


def get_or_create_experiment(client, tracking_uri: str, name: str, artifact_dir: Path | None,
                             attempts: int = 6) -> str:
    """Return the id of experiment ``name``, creating it if missing (safe when jobs race)."""

    def find_or_create() -> str:
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        location = artifact_dir.resolve().as_uri() if artifact_dir is not None else None
        try:
            return client.create_experiment(name, artifact_location=location)
        except Exception:
            experiment = client.get_experiment_by_name(name)  # another job created it first
            if experiment is None:
                raise
            return experiment.experiment_id

    with store_lock(tracking_uri):
        return retry(find_or_create, f"create experiment {name!r}", attempts)


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten a nested config dict into ``section.field`` -> string, for MLflow params."""
    flat: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            flat[name] = str(value)
    return flat


class Tracker:
    """The MLflow run of one training job; every method is a no-op when inactive.

    Create it with ``active=True`` on global rank 0 only. Methods never raise: a failure after
    the retries is logged as a warning and the method returns None.
    """

    def __init__(self, config: TrackingConfig, run_dir: str | Path, active: bool):
        self.config = config
        self.run_dir = Path(run_dir)
        self.active = active and config.enabled
        self.tracking_uri, self.artifact_dir = resolve_store(config, run_dir)
        self.run_id: str | None = None
        self.failures = 0
        self._client = None
        self._stored_steps: dict[str, int] = {}

    def _guard(self, description: str, action: Callable[[], T]) -> T | None:
        if not self.active:
            return None
        try:
            return retry(action, description, self.config.retries)
        except Exception as error:  # a tracking failure must not stop training
            self.failures += 1
            if self.failures <= _WARNINGS_SHOWN or self.failures % 100 == 0:
                LOG.warning("MLflow %s failed after %d attempts, training continues "
                            "(tracking failure %d of this job): %s: %s", description, self.config.retries,
                            self.failures, type(error).__name__, error)
            return None

    @property
    def client(self):
        """The MlflowClient, created on first use."""
        if self._client is None:
            self._client = make_client(self.tracking_uri, self.config.retries)
        return self._client

    def start(self, run_id: str | None = None, resumed_from_step: int | None = None,
              tags: Mapping[str, str] | None = None) -> str | None:
        """Open the job's run: reopen ``run_id`` when resuming, else create a new run.

        Returns the run id, or None when tracking is inactive or failed.
        """
        def open_run() -> str:
            if run_id is not None and self._reopen(run_id, resumed_from_step):
                return run_id
            return self._create(tags or {}, resumed_from_step)

        self.run_id = self._guard("start run", open_run)
        if self.run_id is not None:
            LOG.info("MLflow run %s in %s", self.run_id, self.tracking_uri)
        return self.run_id

    def _reopen(self, run_id: str, resumed_from_step: int | None) -> bool:
        try:
            run = self.client.get_run(run_id)
        except Exception as error:
            LOG.warning("MLflow run %s of the checkpoint cannot be reopened (%s); "
                        "starting a new run", run_id, error)
            return False
        self.client.update_run(run_id, status="RUNNING")
        if resumed_from_step is not None:
            self.client.set_tag(run_id, "resumed_from_step", str(resumed_from_step))
        for key in run.data.metrics:
            history = self.client.get_metric_history(run_id, key)
            self._stored_steps[key] = max((point.step for point in history), default=-1)
        return True

    def _create(self, tags: Mapping[str, str], resumed_from_step: int | None) -> str:
        experiment_id = get_or_create_experiment(
            self.client, self.tracking_uri, self.config.experiment, self.artifact_dir,
            self.config.retries)
        all_tags = dict(tags)
        if resumed_from_step is not None:
            all_tags["resumed_from_step"] = str(resumed_from_step)
        # MLflow draws its own run names from Python's random module, which training seeds.
        # Every run of one seed would get the same name, so a time stamp keeps them apart.
        run_name = self.config.run_name or time.strftime(f"{self.run_dir.name}-%Y%m%d-%H%M%S")
        run = self.client.create_run(experiment_id, run_name=run_name,
                                     tags=all_tags)
        return run.info.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log flattened params; keys the run already contains keep their value (MLflow params are final)."""
        from mlflow.entities import Param

        def log() -> None:
            existing = self.client.get_run(self.run_id).data.params
            flat = flatten(params)
            changed = sorted(k for k, v in flat.items() if k in existing and existing[k] != v)
            if changed:
                LOG.warning("MLflow run %s keeps its first value of params %s; this job uses "
                            "other values (see the resolved config in the run folder)",
                            self.run_id, changed)
            new = [Param(k, v) for k, v in flat.items() if k not in existing]
            for start in range(0, len(new), 100):  # MLflow accepts at most 100 params per batch
                self.client.log_batch(self.run_id, params=new[start:start + 100])

        if self.run_id is not None:
            self._guard("log params", log)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log one point per metric at ``step``; steps the run already contains are skipped."""
        from mlflow.entities import Metric

        fresh = {k: float(v) for k, v in metrics.items() if step > self._stored_steps.get(k, -1)}
        if self.run_id is None or not fresh:
            return
        stamp = int(time.time() * 1000)
        points = [Metric(key, value, stamp, step) for key, value in fresh.items()]
        self._guard("log metrics", lambda: self.client.log_batch(self.run_id, metrics=points))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (values converted to strings)."""
        from mlflow.entities import RunTag

        if self.run_id is not None:
            batch = [RunTag(k, str(v)) for k, v in tags.items()]
            self._guard("set tags", lambda: self.client.log_batch(self.run_id, tags=batch))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy a file (a plot, the resolved config) into the run's artifacts."""
        if self.run_id is not None:
            self._guard(f"log artifact {path}",
                        lambda: self.client.log_artifact(self.run_id, str(path), artifact_path))

    def log_model(self, export_dir: str | Path) -> str | None:
        """Copy an export folder into the run's artifacts; return its artifact URI."""
        def log() -> str:
            self.client.log_artifacts(self.run_id, str(export_dir), MODEL_ARTIFACT_PATH)
            run = self.client.get_run(self.run_id)
            return f"{run.info.artifact_uri}/{MODEL_ARTIFACT_PATH}"

        return self._guard("log model", log) if self.run_id is not None else None

    def finish(self, status: str = "FINISHED") -> None:
        """Mark the run FINISHED (or FAILED, KILLED)."""
        if self.run_id is not None:
            self._guard("finish run", lambda: self.client.set_terminated(self.run_id, status))


_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """Split ``models:/name@alias`` or ``models:/name/version`` into (name, alias, version)."""
    match = _MODEL_URI.match(uri)
    if match is None:
        raise TrackingError(f"model URI {uri!r} is invalid: expected models:/<name>@<alias> "
                            "or models:/<name>/<version>")
    return match["name"], match["alias"], match["version"]


class ModelRegistry:
    """Registered models of exported encoders, with aliases; no pickled modules involved."""

    def __init__(self, tracking_uri: str, attempts: int = 6):
        self.tracking_uri = tracking_uri
        self.attempts = attempts
        self.client = make_client(tracking_uri, attempts)

    def _call(self, description: str, action: Callable[[], T]) -> T:
        return retry(action, description, self.attempts)

    def register(self, name: str, source: str, run_id: str | None = None,
                 aliases: str | list[str] = "auto") -> str:
        """Register the export folder at artifact URI ``source`` as a new version of ``name``.

        ``aliases`` is a list of aliases or a comma-separated string; ``auto`` sets
        ``champion`` when the model has no champion yet and ``challenger`` otherwise.
        Returns the new version number as a string.
        """
        self._ensure_model(name)
        version = self._call(f"create version of {name!r}", lambda: self.client.create_model_version(
            name, source, run_id=run_id)).version
        for alias in self._resolve_aliases(name, aliases):
            self.set_alias(name, alias, version)
        LOG.info("registered %s version %s from %s", name, version, source)
        return str(version)

    def _ensure_model(self, name: str) -> None:
        def create() -> None:
            try:
                self.client.get_registered_model(name)
            except Exception as error:
                if getattr(error, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
                    raise
                try:
                    self.client.create_registered_model(name)
                except Exception as race:
                    if getattr(race, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
                        raise

        with store_lock(self.tracking_uri):
            self._call(f"create registered model {name!r}", create)

    def _resolve_aliases(self, name: str, aliases: str | list[str]) -> list[str]:
        if isinstance(aliases, str):
            if aliases.strip() == "auto":
                return [CHALLENGER if CHAMPION in self.aliases(name) else CHAMPION]
            aliases = [alias.strip() for alias in aliases.split(",")]
        return [alias for alias in aliases if alias]

    def aliases(self, name: str) -> dict[str, str]:
        """Return alias -> version of a registered model."""
        model = self._call(f"read model {name!r}", lambda: self.client.get_registered_model(name))
        return {alias: str(version) for alias, version in model.aliases.items()}

    def set_alias(self, name: str, alias: str, version: str | int) -> None:
        """Point ``alias`` at ``version``, moving it from any other version."""
        self._call(f"set alias {alias!r} of {name!r}",
                   lambda: self.client.set_registered_model_alias(name, alias, str(version)))

    def delete_alias(self, name: str, alias: str) -> None:
        """Remove ``alias`` from the model."""
        self._call(f"delete alias {alias!r} of {name!r}",
                   lambda: self.client.delete_registered_model_alias(name, alias))

    def delete_version(self, name: str, version: str | int, force: bool = False) -> None:
        """Delete a version; one that has an alias needs ``force=True``, which drops its aliases."""
        version_aliases = sorted(a for a, v in self.aliases(name).items() if v == str(version))
        if version_aliases and not force:
            raise TrackingError(
                f"version {version} of {name!r} has aliases {version_aliases}; move them to another "
                "version (set_alias) first, or pass force=True to delete it with its aliases")
        for alias in version_aliases:
            self.delete_alias(name, alias)
        self._call(f"delete version {version} of {name!r}",
                   lambda: self.client.delete_model_version(name, str(version)))

    def version_source(self, uri: str) -> tuple[str, str]:
        """Return (version, artifact source) of ``models:/name@alias`` or ``models:/name/version``."""
        name, alias, version = parse_model_uri(uri)
        if alias is not None:
            try:
                found = self._call(f"resolve {uri}",
                                   lambda: self.client.get_model_version_by_alias(name, alias))
            except Exception as error:
                # MLflow 3.17 reports a missing alias as INVALID_PARAMETER_VALUE.
                if "alias" not in str(error) or "not found" not in str(error):
                    raise
                known = ", ".join(f"@{a} -> {v}" for a, v in sorted(self.aliases(name).items()))
                raise TrackingError(f"{uri}: model {name!r} has no alias {alias!r} in "
                                    f"{self.tracking_uri}; its aliases: {known or 'none'}") from error
        else:
            found = self._call(f"resolve {uri}", lambda: self.client.get_model_version(name, version))
        return str(found.version), found.source

    def download(self, uri: str, dst_dir: str | Path) -> Path:
        """Copy the export folder of a registered version into ``dst_dir``; return that folder."""
        mlflow = _mlflow()
        _, source = self.version_source(uri)
        dst_dir = Path(dst_dir)
        dst_dir.mkdir(parents=True, exist_ok=True)
        local = self._call(f"download {uri}", lambda: mlflow.artifacts.download_artifacts(
            artifact_uri=source, dst_path=str(dst_dir), tracking_uri=self.tracking_uri))
        return Path(local)

    def load(self, uri: str, device: str = "cpu"):
        """Load a registered version (``models:/name@alias`` or ``/version``) as BumblebeeEncoder."""
        from bumblebee_dist.train.export import load_exported

        with tempfile.TemporaryDirectory(prefix="bumblebee-model-") as tmp:
            return load_exported(self.download(uri, tmp), device=device)


def fetch_pretrained(spec: str, tracking_uri: str, dst_dir: str | Path) -> Path:
    """Return a local export folder for ``finetune.pretrained``: a registry URI or a path.

    A ``models:/`` URI is downloaded into ``dst_dir`` (replacing an earlier download).
    """
    if not spec.startswith("models:/"):
        return Path(spec)
    dst_dir = Path(dst_dir)
    shutil.rmtree(dst_dir, ignore_errors=True)
    return ModelRegistry(tracking_uri).download(spec, dst_dir)


def server_command(tracking_uri: str, artifact_dir: str | Path, port: int = 5000,
                   host: str = "127.0.0.1") -> list[str]:
    """Build the ``mlflow server`` command for a store; it listens on 127.0.0.1 by default."""
    return ["mlflow", "server", "--backend-store-uri", tracking_uri,
            "--artifacts-destination", str(Path(artifact_dir).resolve()),
            "--host", host, "--port", str(port)]
