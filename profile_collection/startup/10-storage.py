# Tiled: the embedded catalog under $EDGE_PTYCHO_DATA_DIR (default ~/.local/share/edge_ptycho),
# or the server at $EDGE_PTYCHO_TILED_URI with $EDGE_PTYCHO_TILED_API_KEY.
from edge_ptycho_bluesky.storage import StorageConfig, connect, get_run, make_tiled_writer, replay

storage = StorageConfig.from_env()
catalog = connect(storage)
RE.subscribe(make_tiled_writer(catalog, storage))
print(f"Runs are stored in {storage.uri or storage.data_dir}")
