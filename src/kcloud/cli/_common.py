"""Shared helpers for the CLI: JSON output and the Rich console."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from kcloud.errors import KCloudError

# Wide enough for the tables when the output is not a terminal (CI logs, pipes).
# No emoji codes: a model "file.py:ok" prints as written.
console = Console(width=None if sys.stdout.isatty() else 150, emoji=False)
err_console = Console(stderr=True, emoji=False)


def emit_json(obj: Any) -> None:
    """Print exactly one JSON object on stdout."""
    sys.stdout.write(json.dumps(obj, default=_default) + "\n")


def _default(o: Any) -> Any:
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if hasattr(o, "value"):
        return o.value
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def si(value: float, unit: str = "", digits: int = 3) -> str:
    """A number with an SI prefix, e.g. 3.2e12 -> '3.20 T'."""
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.{digits}g} {prefix}{unit}"
    return f"{value:.{digits}g} {unit}".rstrip()


# ---- user code: a model file runs in a child process, under a time limit -------------------

ModelTimeoutOpt = Annotated[float, typer.Option(
    "--model-timeout", min=0.1, max=86_400.0,
    help="Seconds a model file's import, factory and capture may take (it runs first in a "
    "child process)")]


def _capture(spec: str, shape: dict[str, Any]) -> Any:
    from kcloud.graph.loaders import load_model_spec

    return load_model_spec(spec, **shape)


def check_model_code(spec: str, timeout_s: float, **shape: Any) -> Any:
    """For a `file.py:factory` model: its import, factory and capture in a child process that
    dies with this one, within `timeout_s`; its LayerGraph (None for zoo and ONNX models,
    which run no code). A loop, a hang, a crash or an `os._exit` there is a one-line error."""
    from kcloud.graph.loaders import runs_code

    if not runs_code(spec):
        return None
    from kcloud.runtime.lifecycle import call_in_child

    with progress(f"capturing {spec} (a child process, at most {timeout_s:g} s)"):
        return call_in_child(_capture, spec, shape, timeout_s=timeout_s,
                             what=f"model file {spec}",
                             hint="fix the model file, or raise --model-timeout")


def load_plan_file(path: Path, model: str | None, trust_model_code: bool,
                   model_timeout_s: float) -> Any:
    """A plan file, as data: the Python model file it may name runs only when the user names
    it too (`model`, from --model) or trusts it (`--trust-model-code`); then first in a child
    process under the time limit, as a model file given on the command line."""
    from kcloud.graph.loaders import runs_code
    from kcloud.planner.plan import Plan

    p = Plan.load(path)
    if model is not None and model != p.model:
        raise KCloudError(f"--model {model} is not the plan's model ({p.model})",
                          "drop --model, or give the plan's model")
    if runs_code(p.model):
        if model is None and not trust_model_code:
            raise KCloudError(
                f"plan {path} names Python model code ({p.model}); a plan file runs no code "
                f"of its own", f"name it with --model {p.model} (or --trust-model-code) if "
                "you trust that file")
        check_model_code(p.model, model_timeout_s, batch=p.micro_batch, seq_len=p.seq_len,
                         phase=p.phase if p.phase != "forward" else None)
    return p


def check_ray_address(address: str, timeout_s: float = 3.0) -> None:
    """A Ray cluster address (host:port, ray://host:port) must answer within `timeout_s`
    (Ray itself retries for minutes)."""
    import socket

    if address in ("local", "auto"):
        return
    host, colon, port = address.removeprefix("ray://").rpartition(":")
    if not colon or not port.isdigit() or not host:
        raise KCloudError(f"--ray '{address}' is not host:port",
                          "pass --ray local, or the address of a running Ray cluster "
                          "(host:port)")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        why = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        raise KCloudError(f"nothing answers at --ray {address} within {timeout_s:g} s ({why})",
                          "start the cluster (`ray start --head`), or pass --ray local"
                          ) from None


TrustOpt = Annotated[bool, typer.Option(
    "--trust-model-code", help="Run the Python model file a plan file names (a plan is data: "
    "without this, or --model naming that file, its code does not run)")]


@contextlib.contextmanager
def progress(what: str, enabled: bool = True) -> Iterator[None]:
    """A spinner with the elapsed time on stderr while `what` runs (terminals only: logs and
    pipes get no progress lines)."""
    if not enabled or not err_console.is_terminal:
        yield
        return
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=err_console, transient=True) as bar:
        bar.add_task(what, total=None)
        yield


def check_writable(path: Path, flag: str) -> None:
    """Fail now, before any work, when `path` (an output file) cannot be written."""
    existed = path.exists()
    if path.is_dir():
        raise KCloudError(f"{flag} {path} is a directory", f"give {flag} a file path")
    try:
        with path.open("a"):
            pass
    except OSError as exc:
        raise KCloudError(f"cannot write {flag} {path}: {exc.strerror or exc}",
                          f"give {flag} a writable path") from None
    if not existed:
        with contextlib.suppress(OSError):
            os.unlink(path)
