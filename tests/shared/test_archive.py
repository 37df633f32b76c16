"""Directory artifacts as tars: deterministic bytes, faithful round trip, and hostile archives refused."""
from __future__ import annotations

import hashlib
import io
import tarfile

import pytest

from shared.archive import pack_tree, unpack_tree
from shared.errors import InvalidArgument


def _tree(root):
    package = root / "model.mlpackage"
    (package / "Data" / "weights").mkdir(parents=True)
    (package / "Manifest.json").write_text('{"a": 1}')
    (package / "Data" / "weights" / "weight.bin").write_bytes(bytes(range(256)) * 100)
    return package


def test_same_tree_same_digest_and_round_trip(tmp_path):
    package = _tree(tmp_path / "one")
    pack_tree(package, tmp_path / "a.tar")
    other = _tree(tmp_path / "two")                       # same content, different times and place
    pack_tree(other, tmp_path / "b.tar")
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()
    assert digest(tmp_path / "a.tar") == digest(tmp_path / "b.tar")
    top = unpack_tree(tmp_path / "a.tar", tmp_path / "out")
    assert top == tmp_path / "out" / "model.mlpackage"
    assert (top / "Data" / "weights" / "weight.bin").read_bytes() == bytes(range(256)) * 100
    assert unpack_tree(tmp_path / "a.tar", tmp_path / "out") == top           # already there: reused


def _hostile(path, name, kind=tarfile.REGTYPE):
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo(name)
        info.type = kind
        if kind == tarfile.SYMTYPE:
            info.linkname = "/etc/passwd"
        data = b"x" if kind == tarfile.REGTYPE else b""
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("name, kind", [("../escape.txt", tarfile.REGTYPE), ("/etc/evil", tarfile.REGTYPE),
                                        ("pkg/../../x", tarfile.REGTYPE), ("pkg/link", tarfile.SYMTYPE),
                                        ("pkg/dev", tarfile.CHRTYPE)])
def test_hostile_members_are_refused_and_nothing_is_left(tmp_path, name, kind):
    _hostile(tmp_path / "bad.tar", name, kind)
    with pytest.raises(InvalidArgument) as error:
        unpack_tree(tmp_path / "bad.tar", tmp_path / "out")
    assert error.value.reason == "MALFORMED_ARTIFACT" and "refused" in error.value.message
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".unpack-*"))


def test_not_a_tar_and_two_top_levels_are_refused(tmp_path):
    (tmp_path / "junk.tar").write_bytes(b"GGUF" + bytes(1000))
    with pytest.raises(InvalidArgument, match="not a readable tar"):
        unpack_tree(tmp_path / "junk.tar", tmp_path / "out")
    with tarfile.open(tmp_path / "two.tar", "w") as tar:
        for name in ("a/x", "b/y"):
            info = tarfile.TarInfo(name)
            tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(InvalidArgument, match="one top-level directory"):
        unpack_tree(tmp_path / "two.tar", tmp_path / "out")
