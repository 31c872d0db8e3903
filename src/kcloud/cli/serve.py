"""`kcloud serve`: plan a model (or load its plan) and serve it over an OpenAI-compatible API."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Any

import typer

from kcloud.cli import app
from kcloud.cli._common import (
    ModelTimeoutOpt,
    TrustOpt,
    check_ray_address,
    console,
    err_console,
    load_plan_file,
)
from kcloud.cli.plan import (
    BatchOpt,
    DomesticOpt,
    InputTokensOpt,
    MaxDevicesOpt,
    ObjectiveOpt,
    OutputTokensOpt,
    PowerCapOpt,
    PrecisionOpt,
    SloOpt,
    build_goal,
)
from kcloud.errors import KCloudError


@app.command()
def serve(
    model: Annotated[str | None, typer.Option(
        "--model", "-m", help="Zoo name, a Hugging Face model directory, or file.py:factory "
        "(with --cluster; or the plan's own model with --plan)")] = None,
    cluster: Annotated[str, typer.Option(
        "--cluster", "-c", help="Built-in cluster name or a YAML file")] = "local-cpu",
    plan_file: Annotated[Path | None, typer.Option(
        "--plan", help="Serve this plan (written by `kcloud plan -o`) instead of planning")] =
        None,
    objective: ObjectiveOpt = "throughput",
    slo_ms: SloOpt = None,
    batch: BatchOpt = 1,
    power_cap_w: PowerCapOpt = None,
    max_devices: MaxDevicesOpt = None,
    min_domestic_share: DomesticOpt = 0.0,
    precision: PrecisionOpt = None,
    input_tokens: InputTokensOpt = None,
    output_tokens: OutputTokensOpt = None,
    host: Annotated[str, typer.Option(help="Address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port to listen on")] = 8000,
    uds: Annotated[Path | None, typer.Option(
        "--uds", help="Listen on this unix socket instead of TCP")] = None,
    mode: Annotated[str, typer.Option(help="real | emulated (absent devices modeled)")] =
        "emulated",
    served_name: Annotated[str | None, typer.Option(
        "--served-name", help="The model name clients ask for (default: --model)")] = None,
    max_queue: Annotated[int, typer.Option(
        "--max-queue", help="Requests waiting at most; past it, 429")] = 256,
    max_batch: Annotated[int | None, typer.Option(
        "--max-batch", help="Sequences (samples) a replica runs at once")] = None,
    kv_blocks: Annotated[int | None, typer.Option(
        "--kv-blocks", help="KV blocks per replica (default: from the plan's memory)")] = None,
    max_wait_ms: Annotated[float, typer.Option(
        "--max-wait-ms", help="Non-LLM models: how long a batch waits to fill")] = 5.0,
    weights: Annotated[Path | None, typer.Option(
        "--weights", help="Local checkpoint to load (state dict or .safetensors)")] = None,
    trust_model_code: TrustOpt = False,
    model_timeout_s: ModelTimeoutOpt = 120.0,
    ray_address: Annotated[str | None, typer.Option(
        "--ray", help="Run the workers as Ray actors: 'local' or a cluster address; nodes "
        "declare resources kcloud/<device-type>")] = None,
) -> None:
    """Serve a model: plan it (or load its plan), start its workers once, and answer
    OpenAI-compatible requests with continuous batching until Ctrl-C or SIGTERM (which drains:
    no new requests, those running finish)."""
    if mode not in ("real", "emulated"):
        raise KCloudError(f"unknown mode '{mode}'", "use --mode real or --mode emulated")
    if not 0 < port < 65536:
        raise KCloudError(f"--port {port} is not a TCP port", "pass a port in 1..65535")
    if max_queue < 1:
        raise KCloudError(f"--max-queue must be at least 1, got {max_queue}",
                          "pass --max-queue 1 or more")
    if max_batch is not None and max_batch < 1:
        raise KCloudError(f"--max-batch must be at least 1, got {max_batch}",
                          "pass --max-batch 1 or more")
    if ray_address is not None:
        check_ray_address(ray_address)
    if plan_file is not None:
        plan = load_plan_file(plan_file, model, trust_model_code, model_timeout_s)
    else:
        if model is None:
            raise KCloudError("nothing to serve: no --model and no --plan",
                              "give --model M (planned on --cluster) or --plan PLAN.json")
        from kcloud.graph import zoo

        is_llm = zoo.is_zoo_model(model) and zoo.model_info(model).is_llm
        goal = build_goal(objective, slo_ms, batch, power_cap_w, max_devices,
                          min_domestic_share, precision, input_tokens,
                          output_tokens if output_tokens is not None or not is_llm else 64)
        from kcloud.cli.run import _plan_to_run  # the one way a command plans here

        plan, _ = _plan_to_run(None, model, cluster, goal, model_timeout_s=model_timeout_s)
    start_server(plan, mode=mode, host=host, port=port, uds=uds,
                 served_name=served_name or plan.model, max_queue=max_queue,
                 max_batch=max_batch, kv_blocks=kv_blocks, max_wait_s=max_wait_ms / 1e3,
                 weights=str(weights) if weights is not None else None,
                 ray_address=ray_address)


def start_server(plan: Any, *, mode: str, host: str, port: int, uds: Path | None,
                 served_name: str, max_queue: int, max_batch: int | None,
                 kv_blocks: int | None, max_wait_s: float, weights: str | None,
                 ray_address: str | None = None) -> None:
    """Start the engine and the HTTP server; return when it has stopped (drained)."""
    import uvicorn

    from kcloud.graph.tokenizer import load_tokenizer
    from kcloud.runtime.engine import Engine
    from kcloud.runtime.layout import is_llm_plan
    from kcloud.runtime.model import load_runnable
    from kcloud.serve.async_engine import AsyncEngine
    from kcloud.serve.server import ServeConfig, build_app

    llm = is_llm_plan(plan)
    engine = Engine(plan, mode=mode, max_batch=max_batch, max_queue=max_queue,
                    kv_blocks=kv_blocks, max_wait_s=max_wait_s, weights=weights,
                    ray_address=ray_address)
    tok = load_tokenizer(plan.model) if llm else None
    shape: tuple[int, ...] = ()
    if not llm:
        _, example = load_runnable(plan.model, batch=1, seq_len=plan.seq_len, phase=plan.phase)
        shape = tuple(example[0].shape[1:])
    cfg = ServeConfig(served_name=served_name, model=plan.model, figures=engine.figures,
                      llm=llm, max_len=engine.max_len, vocab=tok.vocab if tok else 0,
                      input_shape=shape)
    aengine = AsyncEngine(lambda: engine)
    web = build_app(aengine, cfg, tok)

    _print_plan(plan, engine)
    where = f"unix:{uds}" if uds is not None else f"http://{host}:{port}"
    console.print(f"serving '{served_name}' at {where}/v1 (OpenAI-compatible; figures "
                  f"{engine.figures}); starting the workers...")

    def announce() -> None:
        aengine.ready.wait()
        console.print(f"ready: {len(plan.replicas)} replica(s) up; Ctrl-C or SIGTERM stops "
                      "(drains)")

    threading.Thread(target=announce, daemon=True).start()
    config = uvicorn.Config(web, host=host, port=port, uds=str(uds) if uds else None,
                            log_level="warning", timeout_graceful_shutdown=30,
                            access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    got: list[int] = []
    old = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda signum, _frame: got.append(signum))
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, old)
        aengine.stop()
    if aengine.error is not None and not server.started:
        raise KCloudError(f"the engine did not start: {aengine.error}",
                          "check the plan's stages and this host's memory")
    if not server.started:
        raise KCloudError(f"could not listen on {where}", "pick a free --port or --uds path")
    if got:
        err_console.print("kcloud: stopped (SIGTERM): drained and every worker reaped")
        sys.exit(0)


def _print_plan(plan: Any, engine: Any) -> None:
    from rich.table import Table

    t = Table(title=f"{plan.model} on {plan.cluster} ({plan.objective} plan; engine "
              f"{'continuous batching' if engine.llm else 'dynamic batching'})",
              header_style="bold", title_justify="left")
    for col in ("replica", "stage", "layers", "devices", "precision"):
        t.add_column(col)
    for ri, rep in enumerate(plan.replicas):
        for si, st in enumerate(rep.stages):
            t.add_row(str(ri), str(si), f"{st.start}-{st.end}",
                      f"{st.device_type} x{st.tp}", st.precision)
    console.print(t)
    if engine.llm:
        console.print(f"KV cache: {engine.kv_blocks} blocks of {engine.block_size} tokens per "
                      f"replica; context {engine.max_len} tokens; batch up to "
                      f"{engine.max_batch} sequences")
    for note in engine.notes:
        console.print(f"note: {note}")
