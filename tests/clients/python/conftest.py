"""The real coordinator and agent of tests/integration (imported, so they are the same fixtures), and
`build_yaml`: the smallest real build (sdk_builds.tiny_build) written as a spec file."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from sdk_builds import tiny_build

from tests.integration.conftest import agent, coordinator  # noqa: F401  (fixtures used by name)


@pytest.fixture
def build_yaml(tiny_model_dir, assets, tmp_path) -> Path:
    """build.yaml of the tiny one-candidate build, as a user would write it."""
    path = tmp_path / "build.yaml"
    path.write_text(yaml.safe_dump(tiny_build(tiny_model_dir, assets), sort_keys=False))
    return path
