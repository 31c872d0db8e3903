"""`kcloud predict`: how fast, at what power and energy, does model M run on device D?"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from kcloud.cli import app
from kcloud.cli._common import ModelTimeoutOpt, check_model_code, console, emit_json
from kcloud.errors import KCloudError
from kcloud.inputs import MAX_BATCH, MAX_DEVICES, MAX_TOKENS


@app.command()
def predict(
    model: Annotated[str, typer.Option("--model", "-m", help="Zoo name, file.py:factory or .onnx")],
    device: Annotated[str, typer.Option("--device", "-d", help="Catalog id (id:partition ok)")],
    scenario: Annotated[str, typer.Option(help="offline | single-stream")] = "offline",
    precision: Annotated[str | None, typer.Option(help="fp32|bf16|fp16|fp8|int8|int4")] = None,
    batch: Annotated[int | None, typer.Option(
        min=1, max=MAX_BATCH, help="Fixed batch (offline picks the best)")] = None,
    seq_len: Annotated[int | None, typer.Option(
        "--seq-len", min=1, max=MAX_TOKENS, help="Tokens per sample")] = None,
    input_tokens: Annotated[int | None, typer.Option(
        min=1, max=MAX_TOKENS, help="LLM prompt tokens")] = None,
    output_tokens: Annotated[int | None, typer.Option(
        min=1, max=MAX_TOKENS, help="LLM generated tokens")] = None,
    tp: Annotated[int, typer.Option(
        min=1, max=MAX_DEVICES, help="Tensor-parallel over N such devices")] = 1,
    workload: Annotated[str | None, typer.Option(
        "--workload", help="Benchmark workload whose lengths to use (default: the model's "
        "benchmark, if it has one; 'none': the raw default lengths)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout")] = False,
    model_timeout_s: ModelTimeoutOpt = 120.0,
) -> None:
    """Predict throughput, latency, power and energy of a model on one device (modeled)."""
    from kcloud.predict import SCENARIOS
    from kcloud.predict import predict as run_predict
    from kcloud.workloads import Shape

    if scenario not in SCENARIOS:
        raise KCloudError(f"unknown scenario '{scenario}'", "use offline or single-stream")
    for name, v in (("--batch", batch), ("--seq-len", seq_len), ("--input-tokens", input_tokens),
                    ("--output-tokens", output_tokens)):
        if v is not None and v < 1:
            raise KCloudError(f"{name} must be a positive integer, got {v}",
                              f"pass {name} 1 or more")
    check_model_code(model, model_timeout_s, batch=batch, seq_len=seq_len or input_tokens)
    p = run_predict(model, device, scenario, precision=precision, batch=batch, seq_len=seq_len,
                    input_tokens=input_tokens, output_tokens=output_tokens, tp=tp,
                    workload=workload)
    if as_json:
        emit_json(p.to_dict())
        return
    star = " [yellow]*[/]" if p.estimated else ""
    t = Table(title=f"{p.model} on {p.device} — {p.scenario} (modeled{star})",
              show_header=True, header_style="bold")
    t.add_column("quantity")
    t.add_column("value", justify="right")
    t.add_row("throughput", f"{p.throughput:,.1f} {p.unit}")
    t.add_row("latency" if p.scenario == "single-stream" else "batch time",
              f"{p.latency_s * 1e3:,.3f} ms")
    t.add_row("batch", str(p.batch))
    if p.workload is not None:
        t.add_row("workload", escape(Shape(**p.workload).describe()))
    t.add_row("precision", p.precision_used + ("" if p.precision_used == p.precision
                                               else f" (asked {p.precision})"))
    if p.tp > 1:
        t.add_row("tensor parallel", f"{p.tp} devices (figures per device)")
    t.add_row("bound", p.bound)
    t.add_row("power", f"{p.power_w:,.1f} W")
    per = "token" if p.unit == "tokens/s" else "item"
    t.add_row(f"energy per {per}", f"{p.energy_per_item_j * 1e3:,.3f} mJ")
    t.add_row("memory used", f"{p.memory_bytes / 1e9:,.2f} GB")
    if p.llm:
        t.add_row("prompt / output tokens", f"{p.llm['input_tokens']} / {p.llm['output_tokens']}")
        t.add_row("time to first token", f"{p.llm['ttft_s'] * 1e3:,.2f} ms")
        t.add_row("time per output token", f"{p.llm['tpot_s'] * 1e3:,.3f} ms")
    console.print(t)
    for n in p.notes:
        console.print(f"[yellow]note:[/] {n}")
    if p.estimated:
        console.print(f"[yellow]*[/] built on estimated catalog figures: "
                      f"{', '.join(p.estimated_fields)}")
    if not p.calibrated:
        console.print("efficiencies: class priors (no published result for this device)")
