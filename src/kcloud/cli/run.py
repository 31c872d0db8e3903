"""`kcloud run`: run a plan with worker processes and compare with the single-process model."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from kcloud.cli import app
from kcloud.cli._common import (
    ModelTimeoutOpt,
    TrustOpt,
    check_model_code,
    check_ray_address,
    check_writable,
    console,
    emit_json,
    load_plan_file,
    progress,
)
from kcloud.cli.plan import (
    BatchOpt,
    DomesticOpt,
    InputTokensOpt,
    MaxDevicesOpt,
    ObjectiveOpt,
    OffloadOpt,
    OutputTokensOpt,
    PowerCapOpt,
    PrecisionOpt,
    SloOpt,
    build_goal,
    search_line,
)
from kcloud.errors import KCloudError
from kcloud.inputs import MAX_MICRO_BATCHES

if TYPE_CHECKING:
    from kcloud.planner.api import Outcome
    from kcloud.planner.goal import Goal
    from kcloud.planner.plan import Plan


@app.command()
def run(
    plan_file: Annotated[Path | None, typer.Argument(
        help="Plan JSON written by `kcloud plan -o` (or plan here with --model/--cluster)")] =
        None,
    model: Annotated[str | None, typer.Option(
        "--model", "-m", help="Plan this model first: zoo name, file.py:factory or .onnx")] =
        None,
    cluster: Annotated[str | None, typer.Option(
        "--cluster", "-c", help="Built-in cluster name or a YAML file (with --model)")] = None,
    objective: ObjectiveOpt = "throughput",
    slo_ms: SloOpt = None,
    batch: BatchOpt = 1,
    power_cap_w: PowerCapOpt = None,
    max_devices: MaxDevicesOpt = None,
    min_domestic_share: DomesticOpt = 0.0,
    precision: PrecisionOpt = None,
    input_tokens: InputTokensOpt = None,
    output_tokens: OutputTokensOpt = None,
    attention_offload: OffloadOpt = "auto",
    mode: Annotated[str, typer.Option(help="real | emulated (absent devices modeled)")] =
        "emulated",
    batches: Annotated[int | None, typer.Option(
        "--batches", min=1, max=MAX_MICRO_BATCHES,
        help="Micro-batches per replica (default: batch / micro-batch)")] = None,
    warmup: Annotated[int, typer.Option(
        "--warmup", help="Untimed micro-batches through every stage before the timed ones")] = 2,
    probes: Annotated[int | None, typer.Option(
        "--probes", help="Requests sent alone through the idle pipeline to measure latency "
        "(default 3; 1 for a generation)")] = None,
    weights: Annotated[Path | None, typer.Option(
        "--weights", help="Local checkpoint to load first: a state dict (.pt, .pth, .bin) "
        "or .safetensors; default: random weights from a fixed seed")] = None,
    trace: Annotated[Path, typer.Option("--trace", help="Chrome trace file to write")] =
        Path("kcloud-trace.json"),
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout")] = False,
    ray_address: Annotated[str | None, typer.Option(
        "--ray", help="Run the workers as Ray actors: 'local' (a Ray instance on this host) "
        "or a cluster address; nodes declare resources kcloud/<device-type>")] = None,
    prompt_only: Annotated[bool, typer.Option(
        "--prompt-only", help="LLM plans: run the prompt (prefill) only, not the generation "
        "of the output tokens")] = False,
    timeout_s: Annotated[float, typer.Option(
        "--timeout", min=1.0, max=7 * 86_400.0,
        help="Seconds the whole run may take")] = 600.0,
    worker_timeout_s: Annotated[float, typer.Option(
        "--worker-timeout", min=1.0, max=86_400.0,
        help="Seconds without a worker's heartbeat before it counts as hung")] = 10.0,
    trust_model_code: TrustOpt = False,
    model_timeout_s: ModelTimeoutOpt = 120.0,
) -> None:
    """Run a plan: one worker per device of each stage (tensor-parallel stages sharded over
    their group), micro-batches streamed through (measured). Zoo LLM plans generate their
    output tokens (greedy, a KV cache per micro-batch in every stage). With --model and
    --cluster the plan is made first, as `kcloud plan` makes it."""
    from kcloud.runtime.executor import execute

    if mode not in ("real", "emulated"):
        raise KCloudError(f"unknown mode '{mode}'", "use --mode real or --mode emulated")
    check_writable(trace, "--trace")  # outputs are checked before the run, not after it
    if ray_address is not None:
        check_ray_address(ray_address)
    goal = None
    if cluster is not None or (model is not None and plan_file is None):
        goal = build_goal(objective, slo_ms, batch, power_cap_w, max_devices,
                          min_domestic_share, precision, input_tokens, output_tokens,
                          attention_offload=attention_offload)
    plan, planned = _plan_to_run(plan_file, model, cluster, goal, trust_model_code,
                                 model_timeout_s)
    workers = sum(len(r.devices) + sum(1 for s in r.stages if s.attention_offload)
                  for r in plan.replicas)  # a PIM group's attention runs in one worker
    with progress(f"running {plan.model}: {workers} worker(s)", not as_json):
        report = execute(plan, mode=mode, n_micro=batches, trace_path=trace,
                         ray_address=ray_address, warmup=warmup, probes=probes,
                         weights=weights, prompt_only=prompt_only, timeout_s=timeout_s,
                         worker_timeout_s=worker_timeout_s)
    if as_json:
        doc = report.to_dict()
        if planned is not None:
            doc["plan"] = plan.to_dict()
            doc["search_time_s"] = planned.search_time_s
            doc["kernel_s"] = planned.kernel_s
        emit_json(doc)
        return
    m, p = report.measured, report.predicted
    ok = "[green]ok[/]" if report.reference_ok else "[red]MISMATCH[/]"
    console.print(f"{report.model}: {report.replicas} replica(s) x {report.n_micro} "
                  f"micro-batch(es) of {report.micro_batch}, mode {report.mode}")
    generated = m.get("ttft_s") is not None
    what = "tokens and logits" if generated else "outputs"
    console.print(f"{what} vs single process: max abs error {report.max_abs_error:.3g} {ok}")
    t = Table(show_header=True, header_style="bold")
    t.add_column("")
    t.add_column("latency", justify="right")
    t.add_column("throughput", justify="right")
    # An emulated stage's numerics ran on this host: what is measured is this host's time.
    t.add_row("measured" if report.emulated is None else "measured (this host; emulated "
              "stages' numerics on its CPU)", f"{m['latency_s'] * 1e3:,.3f} ms",
              f"{m['throughput']:,.1f} {m['unit']}")
    if report.emulated is not None:
        e = report.emulated
        t.add_row("real measured + emulated modeled", f"{e['latency_s'] * 1e3:,.3f} ms",
                  f"{e['throughput']:,.1f} {e['unit']}")
    t.add_row("predicted (modeled)", f"{p['latency_s'] * 1e3:,.3f} ms",
              f"{p['throughput']:,.1f} {p['unit']}")
    console.print(t)
    if generated:
        tpot = (f"{m['tpot_s'] * 1e3:,.3f} ms" if m.get("tpot_s") is not None else "-")
        ptpot = f"{p['tpot_s'] * 1e3:,.3f} ms" if p.get("tpot_s") is not None else "-"
        console.print(f"generation of {m['output_tokens']} tokens: time to first token "
                      f"{m['ttft_s'] * 1e3:,.3f} ms, per output token after it {tpot} "
                      f"(measured); stage compute summed {p['ttft_s'] * 1e3:,.3f} ms and "
                      f"{ptpot} (modeled, transfers excluded)")
    if report.energy is not None:
        e = report.energy
        per = e["unit"].split("/", 1)[1]
        console.print(f"energy (modeled: cost-model power x this run's stage times): "
                      f"{e['energy_per_item_j'] * 1e3:,.4g} mJ/{per} at {e['power_w']:,.1f} W; "
                      f"the plan predicted {e['predicted_energy_per_item_j'] * 1e3:,.4g} "
                      f"mJ/{per}" + (" (* built on estimated power figures)"
                                     if e.get("estimated") else ""))
    title = ("stages (time per micro-batch: its whole generation; prefill and decode step "
             "measured vs modeled; send per hop)" if generated
             else "stages (time per micro-batch)")
    s = Table(title=title, show_header=True, header_style="bold")
    cols = ["replica", "stage", "layers", "device", "backend", "time", "figures",
            "predicted (modeled)"]
    if generated:
        cols += ["prefill (measured / modeled)", "decode step (measured / modeled)"]
    for col in [*cols, "send (measured)"]:
        s.add_column(col, justify="left" if col in cols[:5] or col == "figures" else "right")
    for st in report.stages:
        row = [str(st.replica), str(st.stage), f"{st.layers[0]}-{st.layers[1]}",
               st.device_type + (f" x{st.tp}" + ("" if st.sharded else " (whole)")
                                 if st.tp > 1 else ""), st.backend,
               f"{st.time_s * 1e3:,.3f} ms", st.figures, f"{st.predicted_time_s * 1e3:,.3f} ms"]
        if generated:
            row += [_vs(st.measured_prefill_s, st.predicted_prefill_s),
                    _vs(st.measured_decode_s, st.predicted_decode_s)]
        s.add_row(*row, f"{st.measured_send_s * 1e3:,.3f} ms")
    console.print(s)
    for note in report.notes:
        console.print(f"note: {note}")
    console.print(f"timeline: {report.trace_file}")
    if planned is not None:
        console.print(f"planned here: {len(plan.replicas)} replica(s) on {len(plan.devices)} "
                      f"device(s) of {plan.cluster}; {search_line(planned)}")


def _vs(measured: float | None, modeled: float | None) -> str:
    """"measured / modeled" in ms."""
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v * 1e3:,.3f}"
    return f"{ms(measured)} / {ms(modeled)} ms"


def _plan_to_run(plan_file: Path | None, model: str | None, cluster: str | None,
                 goal: Goal | None, trust_model_code: bool = False,
                 model_timeout_s: float = 120.0) -> tuple[Plan, Outcome | None]:
    """The plan and its search (None for a plan file): from its file, or made here for model,
    cluster and goal. A plan file is data: the Python model file it may name runs only when
    the user names it too (`--model`) or trusts it (`--trust-model-code`)."""
    if plan_file is not None:
        if cluster is not None:
            raise KCloudError("give a plan file or --model/--cluster, not both",
                              "drop the plan file to plan here, or drop --cluster")
        return load_plan_file(plan_file, model, trust_model_code, model_timeout_s), None
    if (model is None) != (cluster is None):
        given, missing = ("--model", "--cluster") if cluster is None else ("--cluster", "--model")
        raise KCloudError(f"{given} needs {missing} to plan", f"add {missing}")
    if model is None or cluster is None or goal is None:
        raise KCloudError("nothing to run: no plan file and no --model/--cluster",
                          "give PLAN.json, or --model M --cluster NAME")
    from kcloud.hardware.cluster import load_cluster
    from kcloud.planner.api import make_plan, resolve

    cl = load_cluster(cluster)  # a bad cluster fails before the model is captured
    check_model_code(model, model_timeout_s, batch=1, seq_len=goal.input_tokens)
    with progress(f"planning {model} on {cl.name}"):
        m, _ = resolve(model, cl, goal)
        out = make_plan(m, cl, goal)
    return out.plan, out
