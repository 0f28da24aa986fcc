"""Placeholder subcommand: filled in by the issue that owns it."""


def add_arguments(parser) -> None:
    pass


def run(args) -> int:
    raise SystemExit("peftserve: this subcommand is not implemented yet")
