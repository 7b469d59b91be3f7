"""Tiled storage: an embedded SQLite-backed Tiled by default, any Tiled server on request.

The embedded catalog lives under one data directory::

    DATA_DIR/catalog.db      Tiled's SQLite catalog (metadata, run structure)
    DATA_DIR/tabular.db      SQLite storage for tabular event data
    DATA_DIR/arrays/         Tiled-written array files
    DATA_DIR/frames/         detectors' HDF5 frame files (registered, not copied)
    DATA_DIR/backup/         JSON-lines copies of runs Tiled could not take (see :func:`make_tiled_writer`)

It is served in-process (no socket) through ``Context.from_app``; :func:`serve_tiled` runs the same
catalog as an HTTP server on 127.0.0.1 with an API key, for other processes.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: Environment variables read by :func:`StorageConfig.from_env`.
ENV_DATA_DIR = "EDGE_PTYCHO_DATA_DIR"
ENV_TILED_URI = "EDGE_PTYCHO_TILED_URI"
ENV_TILED_API_KEY = "EDGE_PTYCHO_TILED_API_KEY"
ENV_TILED_PROFILE = "EDGE_PTYCHO_TILED_PROFILE"
DEFAULT_DATA_DIR = Path("~/.local/share/edge_ptycho").expanduser()
#: Tiled keeps one server-settings object per process, so every catalog served by this process
#: shares one API key (random per process unless given).
_PROCESS_API_KEY = secrets.token_hex(16)


class StorageError(RuntimeError):
    """Tiled could not be reached or used; the message says what to check."""


@dataclass(frozen=True)
class StorageConfig:
    """Where runs are stored.

    Parameters
    ----------
    data_dir
        Directory of the embedded catalog and of the detectors' frame files.
    uri
        URI of a Tiled server to use instead of the embedded catalog.
    api_key
        API key for ``uri`` or ``profile`` (never logged).
    profile
        Name of a Tiled client profile (``tiled profile list``: a facility's YAML file naming the
        server, its authentication and options) to use instead of the embedded catalog; not
        together with ``uri``.
    """

    data_dir: Path = DEFAULT_DATA_DIR
    uri: str | None = None
    api_key: str | None = None
    profile: str | None = None

    def __post_init__(self) -> None:
        if self.uri and self.profile:
            raise ValueError(f"give a Tiled server by URI ({ENV_TILED_URI}) or by profile ({ENV_TILED_PROFILE}), "
                             f"not both (got {self.uri!r} and {self.profile!r})")

    @classmethod
    def from_env(cls) -> StorageConfig:
        """Read ``EDGE_PTYCHO_DATA_DIR``, ``EDGE_PTYCHO_TILED_URI`` or ``EDGE_PTYCHO_TILED_PROFILE``,
        and ``EDGE_PTYCHO_TILED_API_KEY``."""
        return cls(data_dir=Path(os.environ.get(ENV_DATA_DIR, DEFAULT_DATA_DIR)).expanduser(),
                   uri=os.environ.get(ENV_TILED_URI) or None,
                   api_key=os.environ.get(ENV_TILED_API_KEY) or None,
                   profile=os.environ.get(ENV_TILED_PROFILE) or None)

    @property
    def frames_dir(self) -> Path:
        return Path(self.data_dir) / "frames"

    @property
    def backup_dir(self) -> Path:
        return Path(self.data_dir) / "backup"

    def __repr__(self) -> str:  # keep the key out of logs and tracebacks
        return (f"StorageConfig(data_dir={str(self.data_dir)!r}, uri={self.uri!r}, "
                f"api_key={'***' if self.api_key else None}, profile={self.profile!r})")


def embedded_catalog(data_dir: str | Path, readable: Iterable[str | Path] = ()):
    """The SQLite-backed Tiled catalog adapter under ``data_dir`` (created if missing)."""
    from tiled.catalog import from_uri as catalog_from_uri

    data_dir = Path(data_dir).expanduser().resolve()
    for sub in ("arrays", "frames"):
        (data_dir / sub).mkdir(parents=True, exist_ok=True)
    return catalog_from_uri(
        f"sqlite:///{data_dir / 'catalog.db'}",
        specs=[{"name": "CatalogOfBlueskyRuns", "version": "3.0"}],
        init_if_not_exists=True,
        writable_storage=[str(data_dir / "arrays"), f"sqlite:///{data_dir / 'tabular.db'}"],
        readable_storage=[str(data_dir / "frames"), *map(str, readable)],
    )


def build_tiled_app(catalog, api_key: str | None = None):
    """A Tiled FastAPI app for ``catalog`` that can export runs as JSON-seq documents (replay)."""
    from bluesky_tiled_plugins.exporters import json_seq_exporter
    from tiled.config import Authentication
    from tiled.media_type_registration import default_serialization_registry
    from tiled.server.app import build_app
    import copy

    registry = copy.deepcopy(default_serialization_registry)
    registry.register("BlueskyRun", "application/json-seq", json_seq_exporter)
    return build_app(catalog, authentication=Authentication(single_user_api_key=api_key or _PROCESS_API_KEY),
                     serialization_registry=registry)


def connect(config: StorageConfig | None = None):
    """A Tiled client for the configured storage: the embedded catalog, the server at ``uri``, or
    the one a Tiled ``profile`` names.

    Raises
    ------
    StorageError
        When the server cannot be reached or refuses the key; the message says how to fix it.
        An unreachable server is retried first, for up to Tiled's retry limits (about 25-45 s by
        default; see :func:`tiled_retries`).
    """
    from tiled.client import from_context, from_uri
    from tiled.client.context import Context

    config = config or StorageConfig.from_env()
    if config.profile:
        from tiled.client import from_profile

        try:
            kwargs = {"api_key": config.api_key} if config.api_key else {}
            return from_profile(config.profile, **kwargs)
        except Exception as err:  # ProfileNotFound, connection errors, 401, ...
            raise StorageError(
                f"cannot use the Tiled profile {config.profile!r}: {type(err).__name__}: {err}. `tiled profile "
                f"list` shows the profiles found (and `tiled profile paths` where they are looked for); or "
                f"unset {ENV_TILED_PROFILE} to use the embedded catalog.") from err
    if config.uri:
        try:
            return from_uri(config.uri, api_key=config.api_key)
        except Exception as err:  # httpx.ConnectError, 401, ...
            raise StorageError(
                f"cannot use the Tiled server at {config.uri}: {type(err).__name__}: {err}. Check that "
                f"the server is running and the URI and API key ({ENV_TILED_API_KEY}) are right, or unset "
                f"{ENV_TILED_URI} to use the embedded catalog.") from err
    try:
        app = build_tiled_app(embedded_catalog(config.data_dir))
        return from_context(Context.from_app(app))
    except Exception as err:
        raise StorageError(f"cannot open the embedded Tiled catalog in {config.data_dir}: {err}") from err


_RETRY_LOCK = threading.Lock()


@contextmanager
def tiled_retries(attempts: int | None = None, timeout_s: float | None = None) -> Iterator[None]:
    """Bound, for the duration of the ``with`` block, how long Tiled clients retry a failing request.

    The Tiled client retries a request that fails with a connection error or a 5xx response, with
    exponential back-off, up to ``TILED_RETRY_ATTEMPTS`` attempts (default 10) within
    ``TILED_RETRY_TIMEOUT`` seconds (default 45): against a server that is down, :func:`connect`,
    a run's writes (before :func:`make_tiled_writer` backs the run up) and reads block for about
    25-45 s before failing.  Use this where something else already retries (the retraining
    service) or to fail fast; outside the block the previous limits apply again.

    The limits belong to the Tiled client library and are process-wide: they apply to every Tiled
    client of this process while the block runs (other threads included), not to other
    processes (set the ``TILED_RETRY_ATTEMPTS`` / ``TILED_RETRY_TIMEOUT`` environment variables
    before they start for those).

    Parameters
    ----------
    attempts
        Attempts per request, the first included (1: no retry); None keeps the current value.
    timeout_s
        Stop retrying once this many seconds have passed since the first attempt; None keeps
        the current value.
    """
    from tiled.client import utils as tiled_utils

    if attempts is not None and not attempts >= 1:
        raise ValueError(f"attempts must be >= 1, got {attempts!r}")
    if timeout_s is not None and not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s!r}")
    with _RETRY_LOCK:
        saved = tiled_utils.TILED_RETRY_ATTEMPTS, tiled_utils.TILED_RETRY_TIMEOUT
        if attempts is not None:
            tiled_utils.TILED_RETRY_ATTEMPTS = int(attempts)
        if timeout_s is not None:
            tiled_utils.TILED_RETRY_TIMEOUT = float(timeout_s)
    try:
        yield
    finally:
        with _RETRY_LOCK:
            tiled_utils.TILED_RETRY_ATTEMPTS, tiled_utils.TILED_RETRY_TIMEOUT = saved


def make_tiled_writer(client, config: StorageConfig | None = None, batch_size: int | None = None):
    """A TiledWriter for ``client`` that copies any run Tiled fails to take to ``data_dir/backup``.

    A run whose writing fails (server down, refused key) is kept whole as JSON lines in the backup
    directory; :func:`upload_backups` sends them once the server is back.
    """
    from bluesky_tiled_plugins import TiledWriter

    config = config or StorageConfig.from_env()
    config.backup_dir.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {"backup_directory": str(config.backup_dir)}
    if batch_size is not None:
        kwargs["batch_size"] = batch_size
    return TiledWriter(client, **kwargs)


def get_run(client, uid: str):
    """The stored run ``uid`` as a v3 ``BlueskyRun`` (streams hold arrays by data key).

    databroker's v1 ``Broker`` switches the Tiled client's runs to the v2 layout process-wide;
    asking for ``.v3`` keeps this package's access the same either way.

    Raises
    ------
    KeyError
        When no run has that uid (or uid prefix), saying where it looked.
    """
    try:
        run = client[uid]
    except KeyError:
        raise KeyError(f"no run {uid!r} in the Tiled catalog at {getattr(client, 'uri', client)}") from None
    return run.v3 if hasattr(run, "v3") else run


def iter_documents(run) -> Iterable[tuple[str, dict[str, Any]]]:
    """The documents of a stored run (a Tiled ``BlueskyRun`` client or a databroker v1 header)."""
    if hasattr(run, "documents"):
        yield from run.documents()
    elif hasattr(run, "documents_v1"):  # pragma: no cover - older databroker headers
        yield from run.documents_v1()
    else:
        raise TypeError(f"cannot replay {run!r}: expected a Tiled BlueskyRun or a databroker header")


def replay(run, *callbacks: Callable[[str, dict[str, Any]], Any]) -> int:
    """Push a stored run's documents through ``callbacks`` in order; return the document count.

    Frames referenced by StreamResource/StreamDatum stay readable through the run's Tiled node
    (``run["primary"][key]``), so a replayed callback can fetch them.
    """
    if not callbacks:
        raise ValueError("replay needs at least one callback")
    count = 0
    for name, doc in iter_documents(run):
        for callback in callbacks:
            callback(name, doc)
        count += 1
    logger.info("replayed %d documents of run %s", count, getattr(run, "metadata", {}).get("start", {}).get("uid"))
    return count


def upload_backups(client, config: StorageConfig | None = None) -> list[str]:
    """Write runs saved in the backup directory into Tiled; return the uids uploaded.

    Each backup file is removed only after its run was written completely.
    """
    import json

    from bluesky_tiled_plugins import TiledWriter

    config = config or StorageConfig.from_env()
    uploaded = []
    for path in sorted(config.backup_dir.glob("*.jsonl")):
        writer = TiledWriter(client)
        uid = None
        with open(path) as stream:
            for line in stream:
                item = json.loads(line)
                writer(item["name"], item["doc"])
                if item["name"] == "start":
                    uid = item["doc"]["uid"]
        path.unlink()
        uploaded.append(uid)
        logger.info("uploaded backed-up run %s from %s", uid, path)
    return uploaded


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class TiledServer:
    """The embedded catalog served over HTTP (a thread of this process), on 127.0.0.1 by default.

    Writes and reads need the API key (``api_key``, generated when not given; never logged).
    Use it when other processes (the edge worker, retraining jobs) must reach the same catalog.

    Parameters
    ----------
    data_dir
        Directory of the embedded catalog (see :func:`embedded_catalog`).
    port
        TCP port (0: any free port).
    api_key
        Key clients must present (default on loopback: this process's random 128-bit key; see
        ``_PROCESS_API_KEY``).  Required, at least 16 characters, when ``host`` is not a
        loopback address.
    host
        Interface to listen on (default ``127.0.0.1``).  Any other address exposes the catalog
        to the network: do it only with a key you chose, and behind the facility's firewall.

    Raises
    ------
    ValueError
        A non-loopback ``host`` without an explicit ``api_key`` of at least 16 characters.
    """

    def __init__(self, data_dir: str | Path, port: int = 0, api_key: str | None = None,
                 host: str = "127.0.0.1") -> None:
        import uvicorn
        from tiled.server.simple import ThreadedServer

        if not _is_loopback(host) and (api_key is None or len(api_key) < 16):
            raise ValueError(
                f"TiledServer(host={host!r}) would expose the catalog beyond this machine: give an "
                "api_key of at least 16 characters (e.g. `python -c 'import secrets; "
                "print(secrets.token_hex(16))'`) that clients pass as EDGE_PTYCHO_TILED_API_KEY, "
                "or keep the default host 127.0.0.1")
        self.api_key = api_key or _PROCESS_API_KEY
        app = build_tiled_app(embedded_catalog(data_dir), api_key=self.api_key)
        self._server = ThreadedServer(uvicorn.Config(app, host=host, port=port, loop="asyncio",
                                                     log_level="warning"))
        self._cm = self._server.run_in_thread()
        self.uri = self._cm.__enter__()
        logger.info("Tiled serving %s at %s", data_dir, self.uri)

    def config(self, data_dir: str | Path) -> StorageConfig:
        """A :class:`StorageConfig` pointing clients at this server."""
        return StorageConfig(data_dir=Path(data_dir), uri=self.uri, api_key=self.api_key)

    def stop(self) -> None:
        """Stop serving (idempotent)."""
        if self._cm is not None:
            self._cm.__exit__(None, None, None)
            self._cm = None

    def __enter__(self) -> TiledServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
