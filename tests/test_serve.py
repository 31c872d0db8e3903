"""`kcloud serve`: a real server on 127.0.0.1, driven with the official `openai` client and
plain HTTP; tokens checked against the single-process model."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from kcloud.graph import zoo
from kcloud.planner.plan import Plan, Replica, Stage
from kcloud.runtime.generate import reference_generate

openai = pytest.importorskip("openai")

START_S = 240.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclasses.dataclass
class Server:
    proc: subprocess.Popen[str]
    url: str
    log: Path

    @property
    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics").text
        out: dict[str, float] = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out[s.name] = out.get(s.name, 0.0) + s.value
        return out

    def workers(self) -> list[dict[str, object]]:
        return httpx.get(self.url + "/ready").json()["workers"]


def _children(pid: int) -> set[int]:
    out: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            out |= {int(x) for x in (task / "children").read_text().split()}
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


@contextlib.contextmanager
def serving(tmp_path: Path, *args: str) -> Iterator[Server]:
    port = _free_port()
    log = tmp_path / f"serve-{port}.log"
    cmd = [sys.executable, "-m", "kcloud.cli", "serve", "--port", str(port), *args]
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + START_S
    try:
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"server exited {proc.returncode}: {log.read_text()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            if time.monotonic() > end:
                raise AssertionError(f"server not ready: {log.read_text()}")
            time.sleep(0.3)
        kids = _children(proc.pid)
        yield Server(proc, url, log)
    finally:
        kids = _children(proc.pid) if proc.poll() is None else set()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        end = time.monotonic() + 10
        while any(_alive(k) for k in kids) and time.monotonic() < end:
            time.sleep(0.1)
        assert not [k for k in kids if _alive(k)], "worker processes outlived the server"


def _plan(tmp_path: Path, model: str, replicas: int = 1, stages: int = 1) -> Path:
    """A plan of `replicas` replicas of `stages` stages on emulated RNGDs."""
    from kcloud.runtime.model import layer_graph

    llm = zoo.model_info(model).is_llm
    g = layer_graph(model, batch=1, seq_len=16 if llm else None,
                    phase="prefill" if llm else None)
    n = len(g.layers)
    cuts = [round(i * n / stages) for i in range(stages + 1)]
    reps = tuple(Replica(tuple(
        Stage(cuts[i], cuts[i + 1], "furiosa-rngd", (f"r{r}/furiosa-rngd/{i}",), "fp16")
        for i in range(stages))) for r in range(replicas))
    from kcloud.planner.plan import Predicted

    plan = Plan(model=model, cluster="k-cloud-rack", objective="latency", batch=1,
                micro_batch=1, seq_len=16 if llm else None,
                phase="prefill" if llm else "forward", n_layers=n, replicas=reps,
                predicted=Predicted(0.01, 1.0, "tokens/s" if llm else "samples/s", 1.0, 1.0,
                                    0.0, None, 0.0), output_tokens=8 if llm else None)
    path = tmp_path / f"plan-{model.replace('/', '_')}-{replicas}x{stages}.json"
    plan.save(path)
    return path


@pytest.fixture(scope="module")
def gpt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("serve")
    with serving(tmp, "--plan", str(_plan(tmp, "tiny-gpt", 1, 2)), "--max-queue", "64") as s:
        yield s


@pytest.fixture(scope="module")
def tiny_gpt() -> torch.nn.Module:
    module, _ = zoo.build("tiny-gpt", device="cpu", batch=1, seq_len=8)
    return module


def _reference(module: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    tokens, _ = reference_generate(module, torch.tensor([prompt]), n)
    return tokens[0].tolist()


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 60, (n,), generator=g).tolist()
    return [torch.randint(0, 256, (k,), generator=g).tolist() for k in lengths]


def test_completion_models_and_usage(gpt: Server, tiny_gpt: torch.nn.Module) -> None:
    c = gpt.client
    assert [m.id for m in c.models.list().data] == ["tiny-gpt"]
    prompt = [72, 101, 108, 108, 111]
    r = c.completions.create(model="tiny-gpt", prompt=prompt, max_tokens=10, temperature=0,
                             extra_body={"ignore_eos": True})
    assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 10
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].model_extra["token_ids"] == _reference(tiny_gpt, prompt, 10)
    # the engine's own time for the request (its steps' wall time) is within its end-to-end
    k = r.model_extra["kcloud"]
    assert 0 < k["engine_s"] <= k["e2e_s"]
    text = c.completions.create(model="tiny-gpt", prompt="Hello", max_tokens=4, temperature=0)
    assert text.usage.prompt_tokens == len(b"Hello")


def test_streamed_chat_with_usage(gpt: Server) -> None:
    c = gpt.client
    chunks = list(c.chat.completions.create(
        model="tiny-gpt", messages=[{"role": "user", "content": "Say something"}],
        max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    ids = [t for ch in chunks if ch.choices for t in ch.choices[0].model_extra["token_ids"]]
    assert len(ids) == 12
    finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    assert finish[-1] == "length"
    # the same request without streaming gives the same text
    whole = c.chat.completions.create(
        model="tiny-gpt", messages=[{"role": "user", "content": "Say something"}],
        max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert whole.choices[0].message.content == streamed


def test_32_concurrent_greedy_streams_equal_one_at_a_time(gpt: Server,
                                                          tiny_gpt: torch.nn.Module) -> None:
    prompts = _prompts(32)
    client = openai.AsyncOpenAI(base_url=gpt.url + "/v1", api_key="none", max_retries=0)

    async def one(p: list[int]) -> list[int]:
        got: list[int] = []
        stream = await client.completions.create(model="tiny-gpt", prompt=p, max_tokens=16,
                                                 temperature=0, stream=True,
                                                 extra_body={"ignore_eos": True})
        async for ch in stream:
            got += ch.choices[0].model_extra["token_ids"]
        return got

    async def all_of() -> list[list[int]]:
        return await asyncio.gather(*(one(p) for p in prompts))

    got = asyncio.run(all_of())
    for p, g in zip(prompts, got, strict=True):
        assert g == _reference(tiny_gpt, p, 16)
    m = gpt.metrics()
    assert m["kcloud_generation_tokens_total"] >= 32 * 16


def test_sampling_is_seeded_and_stop_strings_end_text(gpt: Server) -> None:
    c = gpt.client
    kw = {"model": "tiny-gpt", "prompt": [1, 2, 3, 4], "max_tokens": 12, "temperature": 0.9,
          "top_p": 0.9, "extra_body": {"ignore_eos": True}}
    a = c.completions.create(seed=7, **kw).choices[0].model_extra["token_ids"]
    b = c.completions.create(seed=7, **kw).choices[0].model_extra["token_ids"]
    other = c.completions.create(seed=8, **kw).choices[0].model_extra["token_ids"]
    assert a == b and a != other
    text = c.completions.create(model="tiny-gpt", prompt=[1, 2, 3, 4], max_tokens=12,
                                temperature=0, extra_body={"ignore_eos": True}).choices[0].text
    stop = text[2:4]
    assert stop
    r = c.completions.create(model="tiny-gpt", prompt=[1, 2, 3, 4], max_tokens=12,
                             temperature=0, stop=[stop], extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == text[:text.find(stop)]


def test_bad_requests_get_openai_errors(gpt: Server) -> None:
    url = gpt.url + "/v1/completions"
    cases = [
        ({"model": "nope", "prompt": "x"}, 404, "model"),
        ({"model": "tiny-gpt", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ({"model": "tiny-gpt", "prompt": "x", "max_tokens": 256}, 400, "max_tokens"),
        ({"model": "tiny-gpt", "prompt": [1] * 300}, 400, "prompt"),
        ({"model": "tiny-gpt", "prompt": [99999]}, 400, "prompt"),
        ({"model": "tiny-gpt", "prompt": "x", "temperature": -1}, 400, "temperature"),
        ({"prompt": "x"}, 400, "model"),
    ]
    for body, status, param in cases:
        r = httpx.post(url, json=body)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert err["param"] == param and param in err["message"] and err["type"]
    r = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(url, content=b"x" * (5 << 20), headers={"content-type": "application/json"})
    assert r.status_code == 413
    with pytest.raises(openai.NotFoundError):
        gpt.client.completions.create(model="other", prompt="x")
    assert httpx.get(gpt.url + "/health").json() == {"status": "ok"}


def test_disconnect_frees_its_blocks(gpt: Server) -> None:
    body = {"model": "tiny-gpt", "prompt": [5] * 40, "max_tokens": 200, "temperature": 0,
            "stream": True, "ignore_eos": True}
    with httpx.stream("POST", gpt.url + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data:"):
                break
        assert gpt.metrics()["kcloud_kv_blocks_used"] > 0
    end = time.monotonic() + 15
    while gpt.metrics()["kcloud_kv_blocks_used"] > 0:
        assert time.monotonic() < end, "the disconnected request kept its KV blocks"
        time.sleep(0.2)


def test_metrics_parse_and_name_what_users_watch(gpt: Server) -> None:
    m = gpt.metrics()
    for name in ("kcloud_requests_total", "kcloud_time_to_first_token_seconds_count",
                 "kcloud_time_per_output_token_seconds_count",
                 "kcloud_e2e_request_latency_seconds_count", "kcloud_queue_length",
                 "kcloud_running_batch_size", "kcloud_kv_blocks_used", "kcloud_kv_blocks_free",
                 "kcloud_preemptions_total", "kcloud_generation_tokens_total",
                 "kcloud_server_overhead_seconds_count"):
        assert name in m, name
    text = httpx.get(gpt.url + "/metrics").text
    assert 'figures="modeled"' in text


def test_kv_exhaustion_preempts_and_every_request_completes(tmp_path: Path,
                                                           tiny_gpt: torch.nn.Module) -> None:
    prompts = _prompts(12, seed=3)
    with serving(tmp_path, "--plan", str(_plan(tmp_path, "tiny-gpt")), "--kv-blocks", "14",
                 "--max-queue", "64") as s:
        client = openai.AsyncOpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)

        async def one(p: list[int]) -> list[int]:
            r = await client.completions.create(model="tiny-gpt", prompt=p, max_tokens=24,
                                                temperature=0, extra_body={"ignore_eos": True})
            return r.choices[0].model_extra["token_ids"]

        async def all_of() -> list[list[int]]:
            return await asyncio.gather(*(one(p) for p in prompts))

        got = asyncio.run(all_of())
        assert s.metrics()["kcloud_preemptions_total"] > 0
    for p, g in zip(prompts, got, strict=True):
        assert g == _reference(tiny_gpt, p, 24)


def test_queue_bound_gives_429_with_retry_after(tmp_path: Path) -> None:
    with serving(tmp_path, "--plan", str(_plan(tmp_path, "tiny-gpt")), "--max-queue", "2",
                 "--max-batch", "1") as s:
        body = {"model": "tiny-gpt", "prompt": [3] * 50, "max_tokens": 150, "temperature": 0,
                "ignore_eos": True}
        codes: list[tuple[int, str | None]] = []

        def post() -> None:
            r = httpx.post(s.url + "/v1/completions", json=body, timeout=120)
            codes.append((r.status_code, r.headers.get("retry-after")))

        threads = [threading.Thread(target=post) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert any(c == 200 for c, _ in codes)
        limited = [ra for c, ra in codes if c == 429]
        assert limited and all(ra is not None for ra in limited)


def test_killed_worker_leaves_no_request_hanging(tmp_path: Path,
                                                 tiny_gpt: torch.nn.Module) -> None:
    prompts = _prompts(12, seed=5)
    with serving(tmp_path, "--plan", str(_plan(tmp_path, "tiny-gpt", replicas=2)),
                 "--max-queue", "64") as s:
        client = openai.AsyncOpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0,
                                    timeout=120)
        victim = next(w for w in s.workers() if w["replica"] == 0)

        async def streamed(p: list[int]) -> tuple[str, list[int]]:
            got: list[int] = []
            try:
                stream = await client.completions.create(
                    model="tiny-gpt", prompt=p, max_tokens=120, temperature=0, stream=True,
                    extra_body={"ignore_eos": True})
                async for ch in stream:
                    got += ch.choices[0].model_extra.get("token_ids", [])
            except openai.APIError as exc:
                return f"error: {exc}", got
            return ("done" if len(got) == 120 else "error"), got

        async def whole(p: list[int]) -> tuple[str, list[int]]:
            r = await client.completions.create(model="tiny-gpt", prompt=p, max_tokens=40,
                                                temperature=0, extra_body={"ignore_eos": True})
            return "done", r.choices[0].model_extra["token_ids"]

        async def kill_soon() -> None:
            await asyncio.sleep(0.5)
            os.kill(int(victim["pid"]), signal.SIGKILL)  # type: ignore[call-overload]

        async def run() -> list[tuple[str, list[int]]]:
            jobs = [streamed(p) for p in prompts[:6]] + [whole(p) for p in prompts[6:]]
            out = await asyncio.wait_for(asyncio.gather(*jobs, kill_soon()), 120)
            return out[:-1]

        results = asyncio.run(run())
        for (status, got), p in zip(results[6:], prompts[6:], strict=True):
            assert status == "done" and got == _reference(tiny_gpt, p, 40)  # retried whole
        for status, _got in results[:6]:
            assert status in ("done", "error") or status.startswith("error")
        end = time.monotonic() + 120
        while s.metrics().get("kcloud_replica_restarts_total", 0) < 1 or \
                any(w["state"] != "idle" and w["state"] != "busy" for w in s.workers()):
            assert time.monotonic() < end, "the replica did not restart"
            time.sleep(0.5)
        r = s.client.completions.create(model="tiny-gpt", prompt=prompts[0], max_tokens=8,
                                        temperature=0, extra_body={"ignore_eos": True})
        assert r.choices[0].model_extra["token_ids"] == _reference(tiny_gpt, prompts[0], 8)


def test_hf_directory_serves_the_tokens_of_transformers(tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    from kcloud.graph.hf import write_tiny_llama

    d = write_tiny_llama(tmp_path / "tiny-llama")
    ref = LlamaForCausalLM.from_pretrained(d).eval()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(d)
    with serving(tmp_path, "--plan", str(_plan(tmp_path, str(d), 1, 2)),
                 "--served-name", "tiny-llama") as s:
        for text in ("The quick brown fox", "K-Cloud runs AI models"):
            ids = tok.encode(text, add_special_tokens=False)
            want = ref.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                                min_new_tokens=12)[0, len(ids):].tolist()
            r = s.client.completions.create(model="tiny-llama", prompt=text, max_tokens=12,
                                            temperature=0, extra_body={"ignore_eos": True})
            assert r.choices[0].model_extra["token_ids"] == want
            assert r.choices[0].text == tok.decode(want, skip_special_tokens=True)
        chat = s.client.chat.completions.create(
            model="tiny-llama", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
            temperature=0)
        want = tok.apply_chat_template([{"role": "user", "content": "hi"}],
                                       add_generation_prompt=True, tokenize=True)
        if hasattr(want, "keys"):
            want = want["input_ids"]
        assert chat.usage.prompt_tokens == len(want)


def test_non_llm_dynamic_batching(tmp_path: Path) -> None:
    module, (x,) = zoo.build("tiny-resnet", device="cpu", batch=6)
    with serving(tmp_path, "--plan", str(_plan(tmp_path, "tiny-resnet", 1, 2)),
                 "--max-wait-ms", "20") as s:
        def post(i: int, out: dict[int, list[float]]) -> None:
            r = httpx.post(s.url + "/v1/infer", json={"model": "tiny-resnet",
                                                      "inputs": x[i].tolist()}, timeout=60)
            assert r.status_code == 200, r.text
            out[i] = r.json()["outputs"]

        got: dict[int, list[float]] = {}
        threads = [threading.Thread(target=post, args=(i, got)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        with torch.inference_mode():
            want = module(x)
        for i in range(6):
            assert torch.allclose(torch.tensor(got[i])[0], want[i], atol=1e-4)
        bad = httpx.post(s.url + "/v1/infer", json={"model": "tiny-resnet", "inputs": [1, 2]})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "inputs"


def test_sigterm_drains_running_requests(tmp_path: Path) -> None:
    with serving(tmp_path, "--plan", str(_plan(tmp_path, "tiny-gpt"))) as s:
        body = {"model": "tiny-gpt", "prompt": [7] * 20, "max_tokens": 60, "temperature": 0,
                "ignore_eos": True}
        out: list[httpx.Response] = []
        t = threading.Thread(target=lambda: out.append(
            httpx.post(s.url + "/v1/completions", json=body, timeout=60)))
        t.start()
        time.sleep(0.3)
        kids = _children(s.proc.pid)
        s.proc.send_signal(signal.SIGTERM)
        t.join(60)
        assert s.proc.wait(60) == 0
        assert out and out[0].status_code == 200
        assert json.loads(out[0].text)["usage"]["completion_tokens"] == 60
        end = time.monotonic() + 10
        while any(_alive(k) for k in kids) and time.monotonic() < end:
            time.sleep(0.1)
        assert not [k for k in kids if _alive(k)]


@pytest.mark.slow
def test_serve_on_ray_actors(tmp_path: Path, tiny_gpt: torch.nn.Module) -> None:
    pytest.importorskip("ray", reason="ray is not installed (pip install 'kcloud[ray]')")
    with serving(tmp_path, "--plan", str(_plan(tmp_path, "tiny-gpt", 1, 2)), "--ray",
                 "local") as s:
        prompt = [9, 8, 7, 6, 5]
        r = s.client.completions.create(model="tiny-gpt", prompt=prompt, max_tokens=10,
                                        temperature=0, extra_body={"ignore_eos": True})
        assert r.choices[0].model_extra["token_ids"] == _reference(tiny_gpt, prompt, 10)


def test_front_end_probes_measure_the_server(gpt: Server, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """`kcloud sim front-end` probes a running server: its model list reports the engine's
    limits, its metrics its event loop's CPU; the costs are saved for `sim run --front-end`."""
    from kcloud.cli import main
    from kcloud.errors import KCloudError
    from kcloud.sim import front_end as fe

    served = fe.served_config(gpt.url)
    assert served.name == "tiny-gpt" and served.replicas == 1
    assert served.config.token_budget == 256 and served.config.num_blocks > 0
    with pytest.raises(KCloudError, match="does not serve 'nope'"):
        fe.served_config(gpt.url, "nope")
    cpu0 = gpt.metrics()["kcloud_event_loop_cpu_seconds"]
    monkeypatch.setenv("KCLOUD_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(fe, "PROBES", ((1, 8, 8), (4, 8, 8), (8, 8, 4), (2, 24, 16)))
    main(["sim", "front-end", "--url", gpt.url, "--rounds", "2", "--json"])
    d = json.loads(capsys.readouterr().out)
    assert d["figures"] == "measured" and d["probes"] == 8
    assert d["token_s"] + d["delivery_s"] > 0 and d["request_s"] >= 0 and d["latency_s"] >= 0
    assert gpt.metrics()["kcloud_event_loop_cpu_seconds"] > cpu0
    main(["sim", "run", "--model", "tiny-gpt", "--cluster", "local-cpu", "--rate", "2",
          "--duration", "2", "--prompt-tokens", "8", "--output-tokens", "4", "--front-end",
          "--json"])
    run = json.loads(capsys.readouterr().out)
    assert run["completed"] == run["requests"] > 0
