"""`python -m simmerge` is the `simmerge` command."""

from simmerge.cli import main

main()
