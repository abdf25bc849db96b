"""The `bootd` command line: the daemon, its admin verbs and the operator's tools."""

from bootd.cli.main import main

__all__ = ["main"]
