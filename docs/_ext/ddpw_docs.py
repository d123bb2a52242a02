"""Sphinx extension for ddpw's documentation: ``.. ddpw-launch-help::`` shows the help of
``ddpw-launch`` as the command itself prints it, so that the page never lags behind its options."""

from __future__ import annotations

from typing import Any

from docutils import nodes
from sphinx.util.docutils import SphinxDirective


class LaunchHelp(SphinxDirective):
    """The output of ``ddpw-launch --help``, as a literal block."""

    def run(self) -> list[nodes.Node]:
        import click

        from ddpw.cli import main

        context = click.Context(main, info_name="ddpw-launch", terminal_width=100,
                                max_content_width=100, **main.context_settings)
        text = main.get_help(context)
        block = nodes.literal_block(text, text)
        block["language"] = "text"
        return [block]


def setup(app: Any) -> dict[str, Any]:
    app.add_directive("ddpw-launch-help", LaunchHelp)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
