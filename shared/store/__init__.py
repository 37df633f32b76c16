"""Artifact storage: content-addressed blobs on disk plus metadata and lineage in SQLite (WAL)."""
