"""Every command, subcommand, flag and positional argument of the command line says what it is for."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

from therouter.cli import build_parser
from therouter.fakeupstream.cli import build_parser as fake_upstream_parser


def walk(parser: argparse.ArgumentParser, path: str) -> Iterator[tuple[str, argparse.Action | None, str | None]]:
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield f"{path} {name}", None, helps.get(name)
                yield from walk(sub, f"{path} {name}")
            continue
        yield f"{path} {'/'.join(action.option_strings) or action.dest}", action, action.help


def test_every_flag_and_command_has_help() -> None:
    seen = list(walk(build_parser(), "therouter")) + list(walk(fake_upstream_parser(), "therouter fake-upstream"))
    missing = [where for where, _, text in seen if not text or text == argparse.SUPPRESS]
    assert missing == []
    names = {where for where, _, _ in seen}
    # the walk reaches what this issue added, so the check covers it
    assert {"therouter keys update --clear", "therouter keys update --expires-at", "therouter usage --json",
            "therouter usage --csv", "therouter demo --port", "therouter keys show id"} <= names
