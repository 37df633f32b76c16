"""The `edgeforge` command's argument parser: argparse, with the suggestions Python 3.11's lacks.

    edgeforge biuld        ->  unknown command 'biuld' for 'edgeforge' — did you mean 'build'?
    edgeforge build --wiat ->  unknown option '--wiat' for 'edgeforge build' — did you mean '--wait'?

Errors raise UsageError (the CLI exits 2) instead of printing usage and exiting, so they can be written
as one JSON object under --json.
"""
from __future__ import annotations

import argparse
import difflib
import re
import sys


class UsageError(Exception):
    """Bad input found before anything was sent: exit 2, with the field it concerns when there is one."""

    def __init__(self, message: str, *, reason: str = "INVALID_ARGUMENT", field: str = "", hint: str = ""):
        super().__init__(message)
        self.message, self.reason, self.field, self.hint = message, reason, field, hint     # hint: text mode only


def did_you_mean(value: str, known: list[str]) -> str:
    """" — did you mean 'build'?" for the closest of `known` (difflib ratio >= 0.6), else ""."""
    close = difflib.get_close_matches(value, known, n=1, cutoff=0.6)
    return f" — did you mean '{close[0]}'?" if close else ""


_INVALID_CHOICE = re.compile(r"argument (\S+): invalid choice: '(.*)' \(choose from (.*)\)$")


class Parser(argparse.ArgumentParser):
    """argparse, with the suggestions Python 3.11's lacks ("unknown command 'biuld' — did you mean 'build'?")
    for commands, options and choices. Errors raise UsageError (exit 2; one JSON object with --json)."""

    def parse_args(self, args=None, namespace=None):
        self.argv = sys.argv[1:] if args is None else list(args)
        return super().parse_args(self.argv, namespace)

    def error(self, message: str):
        choice = _INVALID_CHOICE.match(message)
        if choice:
            name, value = choice.group(1), choice.group(2)
            known = [c.strip("'") for c in choice.group(3).split(", ")]
            hint = did_you_mean(value, known) or f" (one of {', '.join(known)})"
            if name.startswith("-"):
                raise UsageError(f"invalid value '{value}' for {name} of '{self.prog}'{hint}", reason="INVALID_CHOICE",
                                 field=name, hint=f"see `{self.prog} --help`")
            raise UsageError(f"unknown command '{value}' for '{self.prog}'{hint}", reason="UNKNOWN_COMMAND",
                             field=value, hint=f"see `{self.prog} --help`")
        if message.startswith("unrecognized arguments: "):
            deepest = self._deepest(getattr(self, "argv", []))
            known = [flag for action in deepest._actions for flag in action.option_strings]
            for word in message.removeprefix("unrecognized arguments: ").split():
                if word.startswith("-"):
                    option = word.split("=", 1)[0]
                    hint = did_you_mean(option, known)
                    raise UsageError(f"unknown option '{option}' for '{deepest.prog}'{hint}", reason="UNKNOWN_OPTION",
                                     field=option, hint=f"see `{deepest.prog} --help`")
            raise UsageError(f"unexpected argument '{message.split()[2]}' for '{deepest.prog}'",
                             reason="UNEXPECTED_ARGUMENT", hint=f"see `{deepest.prog} --help`")
        raise UsageError(f"{message} ('{self.prog}')", reason="BAD_ARGUMENT", hint=self.format_usage().strip())

    def _deepest(self, argv: list[str]) -> argparse.ArgumentParser:
        """The (sub)command parser the words of argv lead to, for suggesting its own options."""
        current = self
        for word in argv:
            subparsers = next((a for a in current._actions if isinstance(a, argparse._SubParsersAction)), None)
            if subparsers is not None and word in subparsers.choices:
                current = subparsers.choices[word]
        return current
