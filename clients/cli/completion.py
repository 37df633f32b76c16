"""`edgeforge completion bash|zsh|fish`: a shell completion script generated from the argparse tree.

The tree is read once into `Command`s (subcommands, options, which options take a value, their choices,
and which values are paths); each shell's script is then a few lookup functions over that table plus a
small driver, so a new subcommand or option completes without touching this file.

Install (docs/CLI.md):
    bash   echo 'eval "$(edgeforge completion bash)"' >> ~/.bashrc
    zsh    edgeforge completion zsh > "${fpath[1]}/_edgeforge"        (then a new shell)
    fish   edgeforge completion fish > ~/.config/fish/completions/edgeforge.fish
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

SHELLS = ("bash", "zsh", "fish")
FILE, DIRECTORY = "@file", "@dir"            # value kinds the drivers complete from the file system


@dataclasses.dataclass
class Option:
    flags: tuple[str, ...]
    help: str
    takes_value: bool
    values: str                  # space-separated choices, FILE, DIRECTORY, or "" (free text)


@dataclasses.dataclass
class Command:
    path: tuple[str, ...]        # () for `edgeforge` itself, ("builds", "get") for `edgeforge builds get`
    help: str
    options: list[Option]
    subcommands: dict[str, str]  # name -> help
    positional: str              # what the first positional completes to: choices, FILE, DIRECTORY or ""


def _values(action: argparse.Action) -> str:
    if action.choices is not None and not isinstance(action, argparse._SubParsersAction):
        return " ".join(map(str, action.choices))
    if action.type is Path or isinstance(action.type, argparse.FileType):
        return DIRECTORY if "dir" in action.dest else FILE
    return ""


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = (), help: str = "") -> list[Command]:
    """Every command of the tree under `parser`, depth first, `parser` itself first."""
    options, subcommands, positional, children = [], {}, "", []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            for name, child in action.choices.items():
                subcommands[name] = helps.get(name, "")
                children += commands(child, (*path, name), helps.get(name, ""))
        elif action.option_strings:
            if action.help != argparse.SUPPRESS:
                options.append(Option(tuple(action.option_strings), action.help or "", action.nargs != 0,
                                      _values(action)))
        elif not positional:
            positional = _values(action)
    return [Command(path, help, options, subcommands, positional), *children]


def _quote(text: str) -> str:
    """Single-quoted for sh and fish."""
    return "'" + text.replace("\\", "\\\\").replace("'", "'\\''") + "'"


def _fish_quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _tables(tree: list[Command], prefix: str) -> str:
    """The lookup functions both bash and zsh drivers call: subcommands, options, option values, positionals,
    each a `case` on the command path ("builds get")."""
    def case(name: str, rows: list[tuple[str, str]], otherwise: str = "") -> str:
        body = "".join(f"        {_quote(key)}) {value} ;;\n" for key, value in rows)
        return f"{prefix}_{name}() {{\n    case \"$1\" in\n{body}        *) {otherwise or ':'} ;;\n    esac\n}}\n"
    subs = [(" ".join(c.path), f"echo {_quote(' '.join(c.subcommands))}") for c in tree if c.subcommands]
    opts = [(" ".join(c.path), f"echo {_quote(' '.join(f for o in c.options for f in o.flags))}") for c in tree]
    takes = [(f"{' '.join(c.path)}|{flag}", "return 0") for c in tree for o in c.options if o.takes_value
             for flag in o.flags]
    values = [(f"{' '.join(c.path)}|{flag}", f"echo {_quote(o.values)}") for c in tree for o in c.options
              if o.values for flag in o.flags]
    positional = [(" ".join(c.path), f"echo {_quote(c.positional)}") for c in tree if c.positional]
    return (case("subcommands", subs) + case("options", opts)
            + case("takes_value", takes, "return 1").replace('case "$1" in', 'case "$1|$2" in')
            + case("option_values", values).replace('case "$1" in', 'case "$1|$2" in')
            + case("positional", positional))


# The driver: walks the words before the cursor to find the command path (skipping option values), then
# completes an option's value, an option, a subcommand, or the positional argument. `cmdpath`, not `path`:
# zsh ties $path to $PATH.
_WALK = """\
    local cmdpath="" word known i={first}
    while (( i < {current} )); do
        word=${{words[i]}}
        if [[ $word == -* ]]; then
            if [[ $word != *=* ]] && {prefix}_takes_value "$cmdpath" "$word"; then (( i++ )); fi
        else
            known=" $({prefix}_subcommands "$cmdpath") "
            if [[ $known == *" $word "* ]]; then cmdpath="${{cmdpath:+$cmdpath }}$word"; fi
        fi
        (( i++ ))
    done
    local prev=${{words[{current}-1]}}
"""

_BASH_DRIVER = """\
{prefix}_reply() {{
    case "$1" in
        @file) compopt -o filenames 2>/dev/null; COMPREPLY=($(compgen -f -- "$cur")) ;;
        @dir) compopt -o filenames 2>/dev/null; COMPREPLY=($(compgen -d -- "$cur")) ;;
        *) COMPREPLY=($(compgen -W "$1" -- "$cur")) ;;
    esac
}}

{prefix}() {{
    local cur=${{COMP_WORDS[COMP_CWORD]}}
    local -a words=("${{COMP_WORDS[@]}}")
{walk}\
    COMPREPLY=()
    if (( COMP_CWORD > 1 )) && [[ $prev == -* ]] && {prefix}_takes_value "$cmdpath" "$prev"; then
        {prefix}_reply "$({prefix}_option_values "$cmdpath" "$prev")"
    elif [[ $cur == -* ]]; then
        {prefix}_reply "$({prefix}_options "$cmdpath")"
    elif [[ -n $({prefix}_subcommands "$cmdpath") ]]; then
        {prefix}_reply "$({prefix}_subcommands "$cmdpath")"
    else
        {prefix}_reply "$({prefix}_positional "$cmdpath")"
    fi
}}

complete -F {prefix} {prog}
"""

_ZSH_DRIVER = """\
{prefix}_reply() {{
    case "$1" in
        @file) _files ;;
        @dir) _files -/ ;;
        "") return 1 ;;
        *) compadd -- ${{=1}} ;;
    esac
}}

{prefix}() {{
    local cur=${{words[CURRENT]}}
{walk}\
    if (( CURRENT > 2 )) && [[ $prev == -* ]] && {prefix}_takes_value "$cmdpath" "$prev"; then
        {prefix}_reply "$({prefix}_option_values "$cmdpath" "$prev")"
    elif [[ $cur == -* ]]; then
        {prefix}_reply "$({prefix}_options "$cmdpath")"
    elif [[ -n $({prefix}_subcommands "$cmdpath") ]]; then
        {prefix}_reply "$({prefix}_subcommands "$cmdpath")"
    else
        {prefix}_reply "$({prefix}_positional "$cmdpath")"
    fi
}}

if [[ "${{funcstack[1]}}" == "{prefix}" ]]; then
    {prefix} "$@"
else
    compdef {prefix} {prog}
fi
"""


def bash(parser: argparse.ArgumentParser) -> str:
    prog, prefix = parser.prog, f"_{parser.prog.replace('-', '_')}"
    walk = _WALK.format(first=1, current="COMP_CWORD", prefix=prefix)
    return (f"# bash completion for {prog} (generated by `{prog} completion bash`)\n"
            + _tables(commands(parser), prefix) + "\n" + _BASH_DRIVER.format(prefix=prefix, prog=prog, walk=walk))


def zsh(parser: argparse.ArgumentParser) -> str:
    prog, prefix = parser.prog, f"_{parser.prog.replace('-', '_')}"
    walk = _WALK.format(first=2, current="CURRENT", prefix=prefix)     # zsh arrays start at 1, the command
    return (f"#compdef {prog}\n# zsh completion for {prog} (generated by `{prog} completion zsh`)\n"
            + _tables(commands(parser), prefix) + "\n" + _ZSH_DRIVER.format(prefix=prefix, prog=prog, walk=walk))


def fish(parser: argparse.ArgumentParser) -> str:
    """`complete` lines: each subcommand offered where its parent's words were seen and none of its siblings
    yet; each option where its command's words were seen."""
    prog, lines = parser.prog, [f"# fish completion for {parser.prog} (generated by `{parser.prog} completion fish`)"]
    tree = commands(parser)
    siblings = {c.path: " ".join(c.subcommands) for c in tree}

    def seen(path: tuple[str, ...]) -> str:
        if not path:
            return "__fish_use_subcommand"
        return "; and ".join(f"__fish_seen_subcommand_from {word}" for word in path)

    for command in tree:
        where = seen(command.path)
        if command.subcommands:
            fresh = f"{where}; and not __fish_seen_subcommand_from {siblings[command.path]}" if command.path else where
            for name, help in command.subcommands.items():
                lines.append(f"complete -c {prog} -f -n {_fish_quote(fresh)} -a {name} -d {_fish_quote(help)}")
        for option in command.options:
            flags = " ".join(f"-l {f[2:]}" if f.startswith("--") else f"-s {f[1:]}" for f in option.flags)
            if not option.takes_value:
                value = ""
            elif option.values in (FILE, DIRECTORY):
                value = " -r -F"
            elif option.values:
                value = f" -r -f -a {_fish_quote(option.values)}"
            else:
                value = " -r -f"
            lines.append(f"complete -c {prog} -n {_fish_quote(where)} {flags}{value} -d {_fish_quote(option.help)}")
        if command.path and not command.subcommands and command.positional not in ("", FILE, DIRECTORY):
            lines.append(f"complete -c {prog} -f -n {_fish_quote(where)} -a {_fish_quote(command.positional)}")
    return "\n".join(lines) + "\n"


SCRIPTS = {"bash": bash, "zsh": zsh, "fish": fish}
