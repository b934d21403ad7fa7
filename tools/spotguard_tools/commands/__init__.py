"""Subcommands of ``spotguard``: one module each, with ``register(subparsers)``.

``register`` adds a subparser and sets ``run=<callable(args) -> int>`` as its default.
"""
