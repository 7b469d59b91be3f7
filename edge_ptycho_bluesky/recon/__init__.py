"""edge_ptycho_bluesky."""
