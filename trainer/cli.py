"""`hsae`: the command line (Contract 1 of DESIGN.md). Commands stay thin: they parse, then call the library."""

from __future__ import annotations

import sys

import click
import typer

from trainer.errors import HSAEError

app = typer.Typer(
    help="Train, evaluate, index and explore hierarchical sparse autoencoders.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit status 2, never a traceback."""
    try:
        app(standalone_mode=False)
    except HSAEError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except click.exceptions.Exit as err:
        sys.exit(err.exit_code)
    except (KeyboardInterrupt, click.exceptions.Abort):
        print("interrupted: nothing half-written was kept", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
