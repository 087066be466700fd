"""The `simmerge` command line.

Sub-commands come from the `simmerge.commands` entry-point group, so each package contributes its
own commands and the core never imports the service. A command's module is imported only when that
command runs, which keeps `simmerge --help` fast and free of torch start-up.
"""

from __future__ import annotations

import signal
import sys
import threading
from dataclasses import dataclass
from importlib.metadata import entry_points
from importlib.util import find_spec
from pathlib import Path

import click

from simmerge.errors import SimMergeError
from simmerge.home import resolve_home

ENTRY_POINT_GROUP = "simmerge.commands"


@dataclass
class Context:
    """What every command gets from the group: where SimMerge's state lives."""

    home_option: Path | None

    @property
    def home(self) -> Path:
        return resolve_home(self.home_option)


pass_context = click.make_pass_decorator(Context)


def _set_home(ctx: click.Context, _param: click.Parameter, value: Path | None) -> None:
    if value is not None:
        ctx.ensure_object(Context).home_option = value


def home_option(command: click.decorators.FC) -> click.decorators.FC:
    """Let a sub-command take `--home DIR` after its name too (`simmerge catalog list --home X`)."""
    return click.option(
        "--home",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        expose_value=False,
        is_eager=True,
        callback=_set_home,
        help="SimMerge home [default: as given to `simmerge --home`, else $SIMMERGE_HOME, else ~/.simmerge].",
    )(command)


class LazyGroup(click.Group):
    """A group whose commands are entry points, loaded on first use."""

    def _entry_points(self) -> dict[str, object]:
        """Commands whose module is installed (finding a module's spec does not import it)."""
        found = {}
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            try:
                if find_spec(ep.module) is not None:
                    found[ep.name] = ep
            except ModuleNotFoundError:
                continue
        return found

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self._entry_points()))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            return command
        ep = self._entry_points().get(cmd_name)
        return ep.load() if ep is not None else None  # type: ignore[attr-defined]


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the catalog database, signature cache and learned artifacts live "
    "[default: $SIMMERGE_HOME, else ~/.simmerge].",
)
@click.version_option(package_name="simmerge")
@click.pass_context
def cli(ctx: click.Context, home: Path | None) -> None:
    """SimMerge: predict which merge of your fine-tuned checkpoints will score best, and run it."""
    ctx.obj = Context(home)


def _terminate(signum: int, _frame: object) -> None:
    """SIGTERM unwinds like Ctrl-C, so staged outputs (`.partial` directories) are removed; a second
    SIGTERM during that cleanup is ignored rather than cutting it short."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: bad input (and a failed write) becomes one line on stderr and exit code 2."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    try:
        cli.main(args=argv, prog_name="simmerge", standalone_mode=False)
    except SimMergeError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except OSError as exc:  # an unreadable or unwritable path the command did not name itself
        where = f"{exc.filename}: " if exc.filename else ""
        click.echo(f"error: {where}{exc.strerror or exc}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
