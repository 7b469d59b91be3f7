# Tiled: the embedded catalog under $EDGE_PTYCHO_DATA_DIR (default ~/.local/share/edge_ptycho),
# or the server at $EDGE_PTYCHO_TILED_URI with $EDGE_PTYCHO_TILED_API_KEY.
# RE.md (scan_id and any metadata set on it) is kept in DATA_DIR/runengine-metadata across sessions.
from bluesky.utils import PersistentDict

from edge_ptycho_bluesky.callbacks import ScanProgress
from edge_ptycho_bluesky.storage import StorageConfig, connect, get_run, make_tiled_writer, replay

storage = StorageConfig.from_env()
catalog = connect(storage)
RE.md = PersistentDict(str(storage.data_dir / "runengine-metadata"))
RE.subscribe(make_tiled_writer(catalog, storage))
RE.subscribe(ScanProgress())
print(f"Runs are stored in {storage.uri or storage.data_dir}")
