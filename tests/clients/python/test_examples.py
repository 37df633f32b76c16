"""Every example spec in docs/examples parses on the client and plans on the server: the specs the
README and SPEC.md point at stay runnable (their files are what `make setup` prepares)."""
from __future__ import annotations

from pathlib import Path

import pytest

from clients.python import spec as spec_file
from services.coordinator.spec import plan

EXAMPLES = sorted((Path(__file__).resolve().parents[3] / "docs" / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_spec_parses_and_plans(path, assets):
    parsed = spec_file.load(path)
    planned = plan(parsed.spec)
    assert planned and len({c.id for c in planned}) == len(planned)
    assert parsed.model_path.exists() and parsed.evaluation_path.exists()


def test_the_family_examples_are_there():
    assert {"fashion-cnn", "minilm", "mobilenet", "smollm2-pruning"} <= {p.stem for p in EXAMPLES}
