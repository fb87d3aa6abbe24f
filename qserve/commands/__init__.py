"""Subcommands of the `qserve` CLI, one module each (see qserve.cli)."""
