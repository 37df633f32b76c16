"""`edgeforge completion bash|zsh|fish`: each script, generated from the argparse tree, run in its real shell.
bash: the completion function called as bash's completion would call it (COMP_WORDS/COMP_CWORD), COMPREPLY
checked. zsh: parsed (zsh -n), registered with compinit, and its driver run with compadd/_files replaced by
functions that print what they were given. fish: `complete -C`, fish's own completion of a command line."""
from __future__ import annotations

import shutil
import subprocess

import pytest
from cli_process import run_cli

from clients.cli import completion
from clients.cli.main import parser


@pytest.fixture(scope="module")
def scripts(tmp_path_factory) -> dict:
    directory = tmp_path_factory.mktemp("completion")
    paths = {}
    for shell in completion.SHELLS:
        process = run_cli("completion", shell)
        assert process.returncode == 0 and process.stderr == "", process.stderr
        paths[shell] = directory / f"edgeforge.{shell}"
        paths[shell].write_text(process.stdout)
    return paths


def shell(name: str, script: str, cwd=None) -> list[str]:
    if shutil.which(name) is None:
        pytest.skip(f"{name} is not installed here (apt-get install {name}); its script is not checked")
    process = subprocess.run([name, "-c", script], capture_output=True, text=True, timeout=60, cwd=cwd)
    assert process.returncode == 0, process.stderr
    return process.stdout.splitlines()


def bash_complete(script_path, *words: str, cwd=None) -> set[str]:
    """COMPREPLY for the command line `words` (the last one is being completed)."""
    quoted = " ".join(f"'{word}'" for word in words)
    return set(shell("bash", f"source '{script_path}'; COMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}; "
                             f"_edgeforge; printf '%s\\n' \"${{COMPREPLY[@]}}\"", cwd=cwd)) - {""}


@pytest.mark.parametrize("words, expected", [
    (("edgeforge", "bu"), {"build", "builds"}),
    (("edgeforge", "tokens", "create", "--role", ""), {"admin", "agent", "builder"}),
    (("edgeforge", "--address", "host:1", "--token-file", "t", "bu"), {"build", "builds"}),   # option values skipped
    (("edgeforge", "builds", ""), {"get", "watch", "cancel", "list"}),
    (("edgeforge", "build", "--w"), {"--wait", "--watch"}),
    (("edgeforge", "init", "--task", ""), {"causal-lm", "image-classification", "text-embedding"}),
    (("edgeforge", "completion", ""), {"bash", "zsh", "fish"}),
    (("edgeforge", "builds", "get", "--j"), {"--json"}),
])
def test_bash_completes_commands_options_and_choices(scripts, words, expected):
    assert bash_complete(scripts["bash"], *words) == expected


def test_bash_completes_files_for_path_arguments(scripts, tmp_path):
    (tmp_path / "spec.yaml").write_text("name: x\n")
    (tmp_path / "notes.txt").write_text("")
    assert bash_complete(scripts["bash"], "edgeforge", "build", "sp", cwd=tmp_path) == {"spec.yaml"}
    assert bash_complete(scripts["bash"], "edgeforge", "artifacts", "get", "x", "-o", "no", cwd=tmp_path) == {"notes.txt"}


def test_zsh_script_parses_registers_and_completes(scripts):
    if shutil.which("zsh") is None:
        pytest.skip("zsh is not installed here (apt-get install zsh); its script is not checked")
    assert subprocess.run(["zsh", "-n", str(scripts["zsh"])], capture_output=True).returncode == 0
    out = shell("zsh", f"autoload -U compinit; compinit -u -D; source '{scripts['zsh']}'; print -r -- $_comps[edgeforge]; "
                       "compadd() { shift; print -r -- \"$@\"; }; _files() { print -r -- \"<files $*>\"; }; "
                       "t() { words=(\"$@\"); CURRENT=${#words}; _edgeforge; }; "
                       "t edgeforge bu; t edgeforge tokens create --role ''; t edgeforge build ''; "
                       "t edgeforge --address h:1 builds ''")
    assert out[0] == "_edgeforge"
    assert {"build", "builds", "init", "completion"} <= set(out[1].split())
    assert out[2:] == ["agent builder admin", "<files >", "get watch cancel list"]


def test_fish_script_completes(scripts):
    if shutil.which("fish") is None:
        pytest.skip("fish is not installed here (apt-get install fish); its script is not checked")
    assert subprocess.run(["fish", "--no-execute", str(scripts["fish"])], capture_output=True).returncode == 0

    def complete(line: str) -> set[str]:
        return {row.split("\t")[0] for row in shell("fish", f"source '{scripts['fish']}'; complete -C '{line}'")}
    assert complete("edgeforge bu") == {"build", "builds"}
    assert complete("edgeforge tokens create --role ") == {"admin", "agent", "builder"}
    assert complete("edgeforge builds ") == {"get", "watch", "cancel", "list"}
    assert complete("edgeforge build --w") == {"--wait", "--watch"}


def test_every_command_is_in_the_tree():
    """The scripts are generated, not written: every subcommand argparse knows is there."""
    tree = {command.path for command in completion.commands(parser())}
    assert {("build",), ("builds", "watch"), ("tokens", "create"), ("init",), ("completion",)} <= tree
    assert all(option.flags for command in completion.commands(parser()) for option in command.options)
