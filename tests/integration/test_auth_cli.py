"""`edgeforge tokens create|list|revoke` as a real CLI process against a real coordinator, over RPC with
the admin token file the coordinator wrote; the offline bootstrap path; a clear UNAUTHENTICATED message."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def edgeforge(address: str, *args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFORGE_TOKEN")}
    return subprocess.run([sys.executable, "-m", "clients.cli.main", "--address", address, *args], cwd=cwd,
                          env={**clean, "PYTHONPATH": os.pathsep.join(sys.path), **(env or {})},
                          capture_output=True, text=True, timeout=120)


def test_tokens_cli_over_rpc(coordinator, tmp_path):
    admin_file = str(tmp_path / "data" / "admin.token")
    created = edgeforge(coordinator.address, "--token-file", admin_file, "tokens", "create", "--role", "builder",
                        "--name", "ci pipeline", "--json", cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    row = json.loads(created.stdout)
    assert row["role"] == "builder" and row["token"].startswith("ef_")
    assert coordinator.ctx.tokens.verify(row["token"]).name == "ci pipeline"

    listed = edgeforge(coordinator.address, "tokens", "list", "--json", cwd=tmp_path,
                       env={"EDGEFORGE_TOKEN_FILE": admin_file})
    assert listed.returncode == 0, listed.stderr
    assert {"id": row["id"], "role": "builder", "name": "ci pipeline", "revoked": False} in json.loads(listed.stdout)
    assert row["token"] not in listed.stdout                                  # never the secrets

    refused = edgeforge(coordinator.address, "--token", row["token"], "tokens", "list", cwd=tmp_path)
    assert refused.returncode == 1 and "PERMISSION_DENIED" in refused.stderr and "admin" in refused.stderr

    revoked = edgeforge(coordinator.address, "tokens", "revoke", row["id"], cwd=tmp_path,
                        env={"EDGEFORGE_TOKEN": Path(admin_file).read_text().strip()})
    assert revoked.returncode == 0 and "revoked builder token" in revoked.stderr
    after = edgeforge(coordinator.address, "--token", row["token"], "builds", "list", cwd=tmp_path)
    assert after.returncode == 1 and "UNAUTHENTICATED" in after.stderr and "revoked" in after.stderr

    anonymous = edgeforge(coordinator.address, "builds", "list", cwd=tmp_path)          # no token anywhere
    assert anonymous.returncode == 1 and "UNAUTHENTICATED" in anonymous.stderr
    assert "no token was sent" in anonymous.stderr and "--token-file" in anonymous.stderr

    (tmp_path / ".edgeforge").mkdir()                                         # ./.edgeforge/admin.token is the default
    (tmp_path / ".edgeforge" / "admin.token").write_text(Path(admin_file).read_text())
    assert edgeforge(coordinator.address, "builds", "list", cwd=tmp_path).returncode == 0


def test_tokens_cli_offline_bootstrap(coordinator, tmp_path):
    created = edgeforge("127.0.0.1:1", "tokens", "create", "--offline", "--data-dir", str(tmp_path / "data"),
                        "--role", "admin", "--name", "bootstrap", cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    assert coordinator.ctx.tokens.verify(created.stdout.strip()).role == "admin"
    listed = edgeforge("127.0.0.1:1", "tokens", "list", "--offline", "--data-dir", str(tmp_path / "data"), cwd=tmp_path)
    assert "bootstrap" in listed.stdout


def test_tokens_cli_offline_on_postgresql(tmp_path, postgres_url):
    """Several coordinators share one PostgreSQL database (docs/DEPLOY.md): the offline bootstrap writes the first
    admin token there through --database, and every coordinator on it accepts the token."""
    from shared.auth import TokenStore
    from shared.store.database import open_database
    created = edgeforge("127.0.0.1:1", "tokens", "create", "--offline", "--database", postgres_url,
                        "--role", "admin", "--name", "bootstrap", cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    assert not (tmp_path / ".edgeforge").exists()               # nothing written beside it
    assert TokenStore(open_database(postgres_url)).verify(created.stdout.strip()).role == "admin"
    listed = edgeforge("127.0.0.1:1", "tokens", "list", "--offline", "--json", cwd=tmp_path,
                       env={"EDGEFORGE_DATABASE": postgres_url})
    assert listed.returncode == 0, listed.stderr
    assert [t["name"] for t in json.loads(listed.stdout)] == ["bootstrap"]
