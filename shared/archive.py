"""Directory artifacts (a Core ML .mlpackage, an ONNX model with external data) as deterministic tars.

The store holds one blob per artifact, so an export that is a directory is packed: members sorted,
mtimes/owners zeroed, uncompressed — the same tree always has the same digest. Unpacking refuses
anything but regular files and directories with relative names that stay inside the destination
(no absolute paths, no `..`, no links or devices), and extracts atomically (staging dir + rename).
"""
from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from shared import untrusted
from shared.errors import InvalidArgument

MAX_MEMBERS = untrusted.MAX_ARCHIVE_MEMBERS
MEDIA_TYPE_SUFFIX = "+tar"


def pack_tree(directory: Path, out: Path) -> None:
    """Writes `directory` (recursively, its name as the top-level member) to a deterministic tar."""
    if not directory.is_dir():
        raise InvalidArgument(f"{directory} is not a directory", field="path")
    paths = sorted(p for p in directory.rglob("*") if not p.is_symlink())
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in [directory, *paths]:
            name = str(PurePosixPath(directory.name, *path.relative_to(directory).parts))
            info = tarfile.TarInfo(name)
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            if path.is_dir():
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
                continue
            info.size, info.mode = path.stat().st_size, 0o644
            with open(path, "rb") as f:
                tar.addfile(info, f)


def unpack_tree(archive: Path, destination: Path) -> Path:
    """Extracts a pack_tree archive under `destination` (created atomically); returns the top-level
    directory inside it (e.g. destination/model.mlpackage)."""
    if destination.is_dir():
        tops = [p for p in destination.iterdir()]
        if len(tops) == 1:
            return tops[0]
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=destination.parent, prefix=".unpack-"))
    try:
        tops: set[str] = set()
        with tarfile.open(archive, "r:") as tar:
            for member, path in untrusted.checked_members(tar, archive.stat().st_size, "artifact", directories=True,
                                                          reason="MALFORMED_ARTIFACT", field="artifact"):
                tops.add(path.parts[0])
                target = staging.joinpath(*path.parts)
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as source, open(target, "wb") as out:
                    shutil.copyfileobj(source, out, 1 << 20)
        if len(tops) != 1:
            raise InvalidArgument(f"archive must hold one top-level directory, found {len(tops)}",
                                  reason="MALFORMED_ARTIFACT", field="artifact")
        os.replace(staging, destination)
    except tarfile.TarError as error:
        raise InvalidArgument(f"artifact is not a readable tar: {error}", reason="MALFORMED_ARTIFACT",
                              field="artifact")
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return destination / tops.pop()
