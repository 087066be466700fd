"""SimMerge core: checkpoint I/O, merge operators, plans, engine, evaluation, demo zoo and CLI."""

__version__ = "0.1.0"
