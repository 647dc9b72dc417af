"""`lmforge --help`: every command's summary is its docstring's whole first paragraph."""

import argparse
import inspect

from lmforge.cli import build_parser


def _commands(parser: argparse.ArgumentParser, prefix: str = ""):
    """(name, one-line help, parser) of every command, nested ones included."""
    for action in parser._subparsers._group_actions:
        for choice in action._choices_actions:
            sub = action.choices[choice.dest]
            yield f"{prefix}{choice.dest}", choice.help, sub
            if sub._subparsers:
                yield from _commands(sub, f"{prefix}{choice.dest} ")


def test_summary_line_keeps_the_whole_first_paragraph():
    from lmforge.cli import summary_line

    doc = """Run the default: the standard library as corpus, pre-train,
    fine-tune and report.

    More details here."""
    assert summary_line(doc) == (
        "Run the default: the standard library as corpus, pre-train, fine-tune and report."
    )


def test_no_command_summary_ends_mid_sentence():
    commands = list(_commands(build_parser()))
    assert len(commands) > 20
    for name, text, sub in commands:
        assert text and text.rstrip().endswith((".", "!", "?", ".)")), (name, text)
        fn = sub.get_default("func")
        if fn is not None:
            first_paragraph = (inspect.getdoc(fn) or "").split("\n\n")[0]
            assert text == " ".join(first_paragraph.split()), name
