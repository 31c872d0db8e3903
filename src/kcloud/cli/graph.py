"""`kcloud models` (the zoo) and `kcloud graph MODEL` (a model's layers, FLOPs and cuts)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kcloud.cli import app
from kcloud.cli._common import ModelTimeoutOpt, check_model_code, console, emit_json, si
from kcloud.errors import KCloudError
from kcloud.inputs import MAX_BATCH, MAX_TOKENS

_PHASES = ("forward", "prefill", "decode")
_CUT_BYTES = 2  # cut sizes are shown at fp16

_TABLE_WIDTH = 120

_JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]


def _out() -> Console:
    if console.is_terminal:
        return console
    return Console(width=max(console.width, _TABLE_WIDTH), emoji=False)


@app.command("models")
def models(as_json: _JsonOption = False) -> None:
    """List the model zoo: name, parameters, task, whether it runs for real on a CPU."""
    from kcloud.graph.zoo import list_models

    infos = list_models()
    if as_json:
        emit_json({"models": [asdict(m) for m in infos]})
        return
    table = Table(title="K-Cloud model zoo (built from configs, no weights downloaded)",
                  title_justify="left", header_style="bold", box=box.SIMPLE_HEAD)
    for col, justify in (("name", "left"), ("params", "right"), ("task", "left"),
                         ("CPU", "center"), ("description", "left")):
        table.add_column(col, justify=justify, no_wrap=col in ("name", "params"))
    for m in infos:
        table.add_row(m.name, si(m.params), m.task, "yes" if m.runnable_on_cpu else "-",
                      escape(m.description))
    out = _out()
    out.print(table)
    out.print("CPU: runs for real with random weights; the others are captured on the meta "
                  "device. Run `kcloud graph NAME` for a model's layers.")


@app.command("graph")
def graph(
    model: Annotated[str, typer.Argument(help="Zoo name, path/to/file.py:factory or model.onnx")],
    batch: Annotated[int | None, typer.Option("--batch", min=1, max=MAX_BATCH,
                                              help="Samples per batch")] = None,
    seq_len: Annotated[int | None, typer.Option("--seq-len", min=1, max=MAX_TOKENS,
                                                help="Tokens per sample")] = None,
    phase: Annotated[str | None, typer.Option(
        "--phase", help="LLMs: prefill (a prompt of --seq-len) or decode (one token)")] = None,
    kv_len: Annotated[int | None, typer.Option(
        "--kv-len", min=0, max=MAX_TOKENS, help="Decode: tokens already in the KV cache")] =
        None,
    as_json: _JsonOption = False,
    model_timeout_s: ModelTimeoutOpt = 120.0,
) -> None:
    """Capture a model and show its layers: FLOPs, parameters, cut sizes, tensor parallelism."""
    from kcloud.graph.loaders import load_model_spec

    for flag, value in (("--batch", batch), ("--seq-len", seq_len)):
        if value is not None and value < 1:
            raise KCloudError(f"{flag} must be a positive integer, got {value}",
                              f"pass {flag} 1 or more")
    if kv_len is not None and kv_len < 0:
        raise KCloudError(f"--kv-len must not be negative, got {kv_len}", "pass --kv-len 0 or more")
    if phase is not None and phase not in _PHASES:
        raise KCloudError(f"unknown phase '{phase}'", f"use one of: {', '.join(_PHASES)}")
    shape = {"batch": batch, "seq_len": seq_len, "phase": phase, "kv_len": kv_len}
    g = check_model_code(model, model_timeout_s, **shape) or load_model_spec(model, **shape)
    if as_json:
        d = g.to_dict()
        d.update(
            n_layers=len(g.layers), input_elems=g.input_elems, output_elems=g.output_elems,
            capture_dtype_bytes=g.capture_dtype_bytes,
        )
        emit_json(d)
        return
    shape = [f"batch {g.batch}"]
    if g.seq_len is not None:
        shape.append(f"seq {g.seq_len}")
    if g.kv_len is not None:
        shape.append(f"KV cache {g.kv_len}")
    table = Table(title=f"{g.model} — {g.phase}, {', '.join(shape)}", title_justify="left",
                  header_style="bold", box=box.SIMPLE_HEAD)
    numeric = ("#", "FLOPs", "params", "cut (fp16)")
    for col in ("#", "layer", "kind", "FLOPs", "params", "cut (fp16)", "tensor parallel"):
        table.add_column(col, justify="right" if col in numeric else "left",
                         no_wrap=col != "layer")
    for layer in g.layers:
        tp = ", ".join(f"{t.style.value}≤{t.max_degree}" for t in layer.tp) or "-"
        table.add_row(
            str(layer.index), escape(layer.name), escape(layer.kind), si(layer.total_flops),
            si(layer.params), si(layer.cut_elems * _CUT_BYTES, "B"), tp,
        )
    table.add_section()
    table.add_row("", "total", f"{len(g.layers)} layers", si(g.total_flops),
                  si(g.total_params), "", "")
    out = _out()
    out.print(table)
    by_class = ", ".join(f"{k} {si(v)}" for k, v in g.flops_by_class().items() if v)
    out.print(f"FLOPs by class: {by_class}")
    out.print(
        f"weights: {si(g.total_weight_bytes(), 'B')} at {g.capture_dtype_bytes} B/param "
        "(capture dtype). cut: every tensor live across the cut after a layer, at fp16. "
        "FLOPs are counted on the captured graph, not measured; tensor parallel: style≤size "
        "of the split dimension (degrees must divide it)."
    )
