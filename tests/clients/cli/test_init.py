"""`edgeforge init`: for every task the spec accepts, the example it writes parses with the real spec loader
and the coordinator plans its candidates; it never overwrites a file without --force."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_process import json_error, run_cli

from clients.cli import init
from clients.python import spec as spec_file
from services.coordinator.spec import plan


def test_every_task_has_an_example():
    assert set(init.ASSET_FILES) == set(spec_file.TASKS)
    assert {path.stem for path in init.TEMPLATES.glob("*.yaml")} == set(spec_file.TASKS)


@pytest.mark.parametrize("task", sorted(spec_file.TASKS))
def test_example_parses_and_plans(task, tmp_path, assets):
    path = init.write(task, tmp_path / "specs" / f"{task}.yaml", assets=assets)
    text = path.read_text()
    assert "CHANGE ME" in text and f"task: {task}" in text and f"edgeforge build {path.name} --watch" in text
    parsed = spec_file.load(path)                                 # its files exist: the real assets
    assert parsed.spec.model.task == spec_file.TASKS[task]
    assert parsed.model_path == (assets / init.ASSET_FILES[task]["model"]).resolve()
    planned = plan(parsed.spec)
    assert len(planned) == len(parsed.spec.candidates) >= 3
    assert all(candidate.task == task.replace("-", "_") for candidate in planned)


def test_paths_are_relative_inside_one_tree_and_absolute_across(tmp_path):
    assets = tmp_path / "checkout" / ".edgeforge-assets"
    near = init.render("causal-lm", tmp_path / "checkout" / "specs" / "llm.yaml", assets)
    assert "path: ../.edgeforge-assets/models/smollm2-fp32" in near
    assert "path: .edgeforge-assets/models/smollm2-fp32" in init.render("causal-lm", assets.parent / "llm.yaml", assets)
    elsewhere = init.render("causal-lm", tmp_path / "llm.yaml", Path("/opt/edgeforge-assets"))   # only / in common
    assert "path: /opt/edgeforge-assets/models/smollm2-fp32" in elsewhere


def test_cli_refuses_to_overwrite_without_force(tmp_path):
    output = tmp_path / "edgeforge.yaml"
    written = run_cli("init", "--task", "text-embedding", "-o", str(output), "--json")
    assert written.returncode == 0 and written.stderr == ""
    assert json.loads(written.stdout) == {"path": str(output), "task": "text-embedding"}
    output.write_text("# my edits\n")
    refused = run_cli("init", "-o", str(output))
    assert refused.returncode == 2 and "exists; give --force" in refused.stderr
    assert output.read_text() == "# my edits\n"
    error = json_error(run_cli("init", "-o", str(output), "--json"))
    assert error["error"]["reason"] == "FILE_EXISTS" and error["error"]["field"] == "--output"
    forced = run_cli("init", "--task", "image-classification", "-o", str(output), "--force")
    assert forced.returncode == 0 and forced.stdout.strip() == str(output)
    assert "task: image-classification" in output.read_text()


def test_unknown_task_suggests():
    process = run_cli("init", "--task", "causal_lm")
    assert process.returncode == 2 and "did you mean 'causal-lm'" in process.stderr
