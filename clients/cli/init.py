"""`edgeforge init`: writes a commented example build spec for one task (clients/cli/templates/).

    edgeforge init [--task causal-lm|image-classification|text-embedding] [-o FILE] [--force] [--assets DIR]

The example names real files: the assets `make setup` prepares under .edgeforge-assets/ (or --assets),
written relative to the new file's directory, since a spec's paths resolve against its own directory.
Comments mark what to change. An existing file is left alone unless --force.
"""
from __future__ import annotations

import os
import string
from pathlib import Path

from clients.python.spec import TASKS

TEMPLATES = Path(__file__).resolve().parent / "templates"
DEFAULT_ASSETS = Path(__file__).resolve().parents[2] / ".edgeforge-assets"
# task -> its example's files, relative to the assets directory (as docs/examples/ names them).
ASSET_FILES = {
    "causal-lm": {"model": "models/smollm2-fp32", "calibration": "data/calib.txt", "evaluation": "data/eval.txt"},
    "image-classification": {"model": "small_cnn.tar", "calibration": "fashion-mnist-train.npz",
                             "training": "fashion-mnist-train.npz", "evaluation": "fashion-mnist-test.npz"},
    "text-embedding": {"model": "minilm.tar", "calibration": "sentences-calibration.json",
                       "evaluation": "sentences-evaluation.json"},
}


class InitError(Exception):
    """The spec cannot be written (it exists without --force, or its directory cannot be written)."""


def render(task: str, output: Path, assets: Path = DEFAULT_ASSETS) -> str:
    """The example spec for `task`, its paths relative to `output`'s directory."""
    base, assets = output.resolve().parent, assets.resolve()
    near = os.path.commonpath([base, assets]) != base.anchor      # e.g. both in one checkout: a relative path
    paths = {key: (Path(os.path.relpath(assets / relative, base)) if near else assets / relative).as_posix()
             for key, relative in ASSET_FILES[task].items()}
    return string.Template((TEMPLATES / f"{task}.yaml").read_text()).substitute(paths, spec_name=output.name)


def write(task: str, output: Path, *, force: bool = False, assets: Path = DEFAULT_ASSETS) -> Path:
    if output.exists() and not force:
        raise InitError(f"{output} exists; give --force to overwrite it, or -o to write elsewhere")
    if output.is_dir():
        raise InitError(f"{output} is a directory; give a file name with -o")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(render(task, output, assets))
    except OSError as error:
        raise InitError(f"cannot write {output}: {error.strerror}") from error
    return output


def add_parser(subparsers, parents=()):
    """Adds `init` to the `edgeforge` command's subparsers; `parents` carry --json and --quiet."""
    init = subparsers.add_parser("init", parents=list(parents), help="write a commented example build spec",
                                 description=__doc__.split("\n\n")[0])
    init.add_argument("--task", choices=tuple(TASKS), default="causal-lm", help="the model's task (default causal-lm)")
    init.add_argument("-o", "--output", type=Path, default=Path("edgeforge.yaml"),
                      help="where to write it (default ./edgeforge.yaml)")
    init.add_argument("--force", action="store_true", help="overwrite an existing file")
    init.add_argument("--assets", type=Path, default=DEFAULT_ASSETS,
                      help="the directory `make setup` prepared (default: this checkout's .edgeforge-assets)")
    return init
