"""gen/ must be exactly what proto/generate.py produces from proto/ (generated code is never hand-edited)."""
from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_fresh(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "proto" / "generate.py"), str(tmp_path)], check=True)
    fresh = tmp_path / "edgeforge" / "v1"
    committed = ROOT / "gen" / "edgeforge" / "v1"
    fresh_names = sorted(p.name for p in fresh.iterdir())
    assert fresh_names == sorted(p.name for p in committed.iterdir() if p.name != "__pycache__")
    _, mismatch, errors = filecmp.cmpfiles(fresh, committed, fresh_names, shallow=False)
    assert not mismatch and not errors, f"gen/ is stale; run `make gen`: {mismatch + errors}"


def test_every_rpc_and_field_is_commented():
    """Google API style: every RPC and every message field has a comment (units live there)."""
    import re
    field = re.compile(r"^(optional |repeated )?[\w.<>, ]+ \w+ = \d+;")
    missing = []
    for path in sorted((ROOT / "proto" / "edgeforge" / "v1").glob("*.proto")):
        lines = path.read_text().splitlines()
        for number, line in enumerate(lines):
            stripped = line.strip()
            is_field = field.match(stripped) and not stripped.split()[0].isupper()
            if stripped.startswith("rpc ") or is_field:
                documented = "//" in stripped or lines[number - 1].strip().startswith("//")
                if not documented:
                    missing.append(f"{path.name}:{number + 1}: {stripped}")
    assert not missing, "undocumented:\n" + "\n".join(missing)
