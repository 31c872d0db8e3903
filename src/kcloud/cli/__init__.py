"""The `kcloud` command: one thin sub-command per user question.

Each sub-command lives in its own module and registers itself on `app`. Errors that come from
user input (`KCloudError`) print one line on stderr and exit with code 2, never a traceback.
"""

from __future__ import annotations

import sys

import typer

from kcloud.errors import KCloudError

app = typer.Typer(
    name="kcloud",
    help="K-Cloud: plan, run and model AI models on heterogeneous accelerators.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    # Imported for their side effect of adding commands to `app`.
    from kcloud.cli import calibrate, devices, graph, predict  # noqa: F401

    for optional in ("plan", "clusters", "run", "demo", "serve", "k8s", "cloud", "tenant",
                     "key", "deploy", "usage"):
        try:
            __import__(f"kcloud.cli.{optional}")
        except ModuleNotFoundError as exc:  # a command whose module is not there yet
            if exc.name != f"kcloud.cli.{optional}":
                raise


def main(argv: list[str] | None = None) -> None:
    _register()
    try:
        app(args=argv, standalone_mode=False)
    except KCloudError as exc:
        print(f"kcloud: error: {exc.message}", file=sys.stderr)
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        print("kcloud: aborted", file=sys.stderr)
        sys.exit(1)
    except Exception as exc:  # usage errors from the command-line parser
        show = getattr(exc, "show", None)
        code = getattr(exc, "exit_code", None)
        if callable(show) and isinstance(code, int):
            show()
            sys.exit(code or 2)
        raise
