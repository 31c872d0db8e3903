"""The `kcloud` command: one thin sub-command per user question.

Each sub-command lives in its own module and registers itself on `app`. Whatever ends a
command early prints one line on stderr, never a traceback: an error from user input
(`KCloudError`) or a usage error exits 2, Ctrl-C exits 130 and SIGTERM 143 (after the same
clean-ups as an error: workers reaped, temporary files removed).
"""

from __future__ import annotations

import re
import sys
from typing import Any

import typer

from kcloud.errors import KCloudError
from kcloud.runtime import lifecycle

app = typer.Typer(
    name="kcloud",
    help="K-Cloud: plan, run and model AI models on heterogeneous accelerators.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Flags of one command that the layers below name by another command's flag.
_SAME_FLAG = {"--seq-len": ("--input-tokens",), "--input-tokens": ("--seq-len",)}


def _register() -> None:
    # Imported for their side effect of adding commands to `app`.
    from kcloud.cli import calibrate, devices, graph, predict  # noqa: F401

    for optional in ("plan", "clusters", "run", "demo", "serve", "k8s", "sim", "bench",
                     "cloud", "tenant", "key", "deploy", "usage"):
        try:
            __import__(f"kcloud.cli.{optional}")
        except ModuleNotFoundError as exc:  # a command whose module is not there yet
            if exc.name != f"kcloud.cli.{optional}":
                raise


def _command(argv: list[str]) -> Any:
    """The (click) command that `argv` runs, or None."""
    cmd: Any = typer.main.get_command(app)
    for name in (a for a in argv if not a.startswith("-")):
        sub = getattr(cmd, "commands", {}).get(name)
        if sub is None:
            break
        cmd = sub
    return cmd if hasattr(cmd, "params") and not hasattr(cmd, "commands") else None


def _for_command(exc: KCloudError, argv: list[str]) -> str:
    """The error's line in the words of the command that was run: a flag the layers below
    name is changed to this command's flag for the same value, and a hint that names a flag
    this command does not have is left out."""
    cmd = _command(argv)
    if cmd is None:
        return exc.message
    flags = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}

    def own(text: str) -> tuple[str, bool]:
        ok = True

        def swap(m: re.Match[str]) -> str:
            nonlocal ok
            flag = m.group(0)
            if flag in flags:
                return flag
            other = next((f for f in _SAME_FLAG.get(flag, ()) if f in flags), None)
            ok &= other is not None
            return other or flag

        return re.sub(r"(?<![\w-])--[a-z][a-z0-9-]*", swap, text), ok

    problem, _ = own(exc.problem)
    hint, ok = own(exc.hint) if exc.hint else ("", False)
    return f"{problem}; {hint}" if ok and hint else problem


def _fail(line: str, code: int) -> None:
    print(f"kcloud: {line}", file=sys.stderr)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    _register()
    with lifecycle.signals_unwind():
        try:
            code = app(args=args, standalone_mode=False)
        except KCloudError as exc:
            _fail(f"error: {_for_command(exc, args)}", 2)
        except lifecycle.Interrupted as exc:
            how = "interrupted" if exc.exit_code == 130 else "terminated"
            _fail(f"{how} ({exc}); stopped and cleaned up", exc.exit_code)
        except typer.Exit as exc:
            sys.exit(exc.exit_code)
        except typer.Abort as exc:  # Ctrl-C inside the parser or a prompt
            _fail("interrupted", 130 if isinstance(exc.__cause__, KeyboardInterrupt) else 1)
        except typer.TyperException as exc:  # usage errors from the command-line parser
            ctx = getattr(exc, "ctx", None)
            names = []
            while ctx is not None and ctx.parent is not None:  # below the program's name
                names.insert(0, ctx.info_name)
                ctx = ctx.parent
            where = " ".join(["kcloud", *names])
            text = getattr(exc, "format_message", exc.__str__)()
            line = " ".join(text.split()).rstrip(".")
            _fail(f"error: {line}; see `{where} --help`",
                  getattr(exc, "exit_code", 2) or 2)
        except BrokenPipeError:  # stdout closed early (`kcloud ... | head`)
            sys.stderr.close()
            sys.exit(1)
    if isinstance(code, int) and code:  # an exit code the command returned (typer.Exit)
        sys.exit(code)
