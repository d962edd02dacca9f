"""The command line: `trio-drain` and its subcommands."""

from ._main import main as main
