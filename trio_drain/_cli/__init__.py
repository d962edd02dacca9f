"""The command line: `trio-drain` and its subcommands.

The rooms: `_main` (the parser and the dispatch), `_boundary` (exit
statuses, `UsageError`, the one place an error becomes one line on
stderr), one module per command, each with its own options (`_demo`,
`_broker`, `_run`, `_send`, `_outbox`, `_top`, `_keygen`; `_outbox` keeps
its actions in `_outbox_views` and `_outbox_actions`, and the naming of
rows in `_outbox_rows`), and what they share:
`_args` (argument types and checks), `_output` (JSON or inert text on
stdout), `_logging` (log lines on stderr), `_config_file` (the TOML
config of `run`).
"""

from ._main import main as main
