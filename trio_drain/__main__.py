"""`python -m trio_drain`: the `trio-drain` command line."""

from ._cli import main

main()
