"""Capture, model zoo, user-model loaders and the `kcloud models` / `kcloud graph` commands."""

from __future__ import annotations

import json
import math
import textwrap
import warnings
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from torch.fx.passes.split_module import split_module

from kcloud.cli import main
from kcloud.errors import CaptureError
from kcloud.graph import build, capture_model, list_models, load_model_spec, trace_layers
from kcloud.graph.capture import capture
from kcloud.graph.layergraph import LayerGraph, OpClass, TPStyle

# Published parameter counts.
REAL_PARAMS = {
    "llama-2-70b": 68.98e9,
    "llama-2-7b": 6.74e9,
    "llama-3.1-8b": 8.03e9,
    "gpt-j-6b": 6.05e9,
    "bert-large": 335e6,
    "resnet50": 25.6e6,
}


class TwoLayerMLP(nn.Module):
    def __init__(self, d: int = 32, h: int = 128) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, h)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(h, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class NormBetween(nn.Module):
    """Linear -> LayerNorm -> Linear: the norm needs the whole vector, so no MLP pair."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 64)
        self.norm = nn.LayerNorm(64)
        self.fc2 = nn.Linear(64, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(self.fc1(x)))


class TokenMixer(nn.Module):
    """Linear over features, then over tokens: the split axis moves, so no MLP pair."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Linear(16, 16)
        self.tokens = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tokens(torch.relu(self.features(x)).transpose(1, 2))


class TopLevelSkip(nn.Module):
    """A skip connection across two top-level units: x + b(a(x))."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.b(self.a(x))


def _meta(module_cls: type[nn.Module], *shape: int) -> tuple[nn.Module, tuple[torch.Tensor]]:
    with torch.device("meta"):
        return module_cls(), (torch.empty(*shape),)


# ---- zoo ----------------------------------------------------------------------------------


def test_zoo_param_counts_match_the_published_models() -> None:
    infos = {m.name: m for m in list_models()}
    for name, real in REAL_PARAMS.items():
        assert abs(infos[name].params - real) / real < 0.02, (name, infos[name].params)
    for name in ("mlp", "tiny-gpt", "tiny-resnet", "tiny-unet"):
        assert infos[name].runnable_on_cpu
        assert infos[name].params < 20e6
    assert infos["llama-2-70b"].is_llm and not infos["resnet50"].is_llm


def test_captured_params_equal_module_params() -> None:
    for name in ("resnet50", "bert-large", "tiny-gpt", "tiny-unet", "mlp"):
        g = capture_model(name)
        assert g.total_params == g.meta["params"], name


def test_resnet50_forward_flops() -> None:
    g = capture_model("resnet50")
    assert g.total_flops == pytest.approx(8.2e9, rel=0.03)  # 2 x 4.1 GMACs
    by_class = g.flops_by_class()
    assert by_class["conv"] > 0.99 * 8.0e9
    names = [layer.name for layer in g.layers]
    assert names[0] == "conv1" and names[-1] == "fc"
    assert sum(n.startswith("layer") for n in names) == 16  # 3 + 4 + 6 + 3 bottlenecks
    assert g.input_elems == 3 * 224 * 224 and g.output_elems == 1000
    assert g.meta["input_shape"] == [3, 224, 224] and g.meta["is_llm"] is False


def test_llama_prefill_flops_are_two_flops_per_param_per_token_plus_attention() -> None:
    tokens = 2048
    g = capture_model("llama-2-7b", seq_len=tokens)
    linear = sum(op.weight_elems for op in g.ops() if op.op_class is OpClass.MATMUL)
    embed = g.layers[0].params  # a gather: no FLOPs; the norms' weights are the rest
    assert linear == pytest.approx(g.total_params - embed, rel=1e-4)
    matmul = 2 * linear * tokens
    m = g.meta
    attention = 4 * m["n_layers"] * tokens * tokens * m["hidden"]
    assert g.flops_by_class()["matmul"] == pytest.approx(matmul, rel=1e-6)
    assert g.flops_by_class()["attention"] == pytest.approx(attention, rel=1e-6)
    assert g.total_flops == pytest.approx(matmul + attention, rel=0.01)
    assert g.phase == "prefill" and g.seq_len == tokens and g.kv_len is None
    assert len(g.layers) == 32 + 3  # embed, blocks, final norm, head
    for key in ("n_layers", "hidden", "heads", "kv_heads", "head_dim", "vocab", "max_seq_len",
                "kv_elems_per_token", "default_seq_len"):
        assert key in m
    assert m["kv_elems_per_token"] == 2 * 32 * 32 * 128


def test_decode_attention_reads_a_kv_cache_that_grows_with_kv_len() -> None:
    totals = {}
    for kv_len in (512, 1024):
        g = capture_model("llama-2-70b", phase="decode", kv_len=kv_len, batch=2)
        assert g.phase == "decode" and g.seq_len == 1 and g.kv_len == kv_len
        attn = [op for op in g.ops() if op.op_class is OpClass.ATTENTION]
        assert len(attn) == 80
        kv = sum(op.kv_elems for op in attn)
        assert kv == g.meta["kv_elems_per_token"] * (kv_len + 1) * 2
        assert all(op.in_elems > op.kv_elems > 0 for op in attn)
        totals[kv_len] = kv
        # One token per sequence: ~2 FLOPs per (non-embedding) parameter.
        matmul = g.flops_by_class()["matmul"]
        assert matmul == pytest.approx(2 * 2 * (g.total_params - g.layers[0].params), rel=1e-4)
    assert totals[1024] > 1.9 * totals[512]


def test_gqa_and_parallel_blocks_get_head_and_mlp_groups() -> None:
    g = capture_model("tiny-gpt")
    block = g.layers[1]
    styles = {t.style: t for t in block.tp}
    heads, mlp = styles[TPStyle.HEADS], styles[TPStyle.MLP]
    assert heads.column == ("layers.0.attn.q_proj", "layers.0.attn.k_proj",
                            "layers.0.attn.v_proj")
    assert heads.row == ("layers.0.attn.o_proj",)
    assert heads.max_degree == 2  # KV heads
    assert mlp.column == ("layers.0.mlp.gate_proj", "layers.0.mlp.up_proj")
    assert mlp.row == ("layers.0.mlp.down_proj",)
    assert mlp.max_degree == 344
    hidden_out = g.batch * g.seq_len * 128
    assert heads.comm_elems == mlp.comm_elems == hidden_out
    assert g.layers[0].tp[0].style is TPStyle.VOCAB
    assert g.layers[-1].tp[0].style is TPStyle.VOCAB and g.layers[-1].tp[0].max_degree == 512

    gptj = capture_model("gpt-j-6b", seq_len=128)
    assert {t.style for t in gptj.layers[1].tp} == {TPStyle.HEADS, TPStyle.MLP}
    assert capture_model("llama-2-70b", seq_len=16).layers[5].tp_max_degree == 8


# ---- cuts ---------------------------------------------------------------------------------


def test_unet_cuts_carry_every_pending_skip_tensor() -> None:
    b = 2
    g = capture_model("tiny-unet", batch=b)
    assert [layer.name for layer in g.layers] == [
        "stem", "down.0", "down.1", "down.2", "up.0", "up.1", "up.2", "head"
    ]
    # Hand count: widths 16/32/64/128 at 32/16/8/4 pixels; skips wait for their up stage.
    s0, d0, d1, d2 = 16 * 32 * 32, 32 * 16 * 16, 64 * 8 * 8, 128 * 4 * 4
    u0, u1, u2, out = 64 * 8 * 8, 32 * 16 * 16, 16 * 32 * 32, 2 * 32 * 32
    expected = [s0, s0 + d0, s0 + d0 + d1, s0 + d0 + d1 + d2, s0 + d0 + u0, s0 + u1, u2, out]
    assert [layer.cut_elems for layer in g.layers] == [b * e for e in expected]


def test_resnet_block_boundaries_and_top_level_skips() -> None:
    g = capture_model("tiny-resnet")
    cuts = {layer.name: layer.cut_elems for layer in g.layers}
    assert cuts["layer1.1"] == 16 * 32 * 32  # the next block's input is also its skip
    assert cuts["layer2.0"] == 32 * 16 * 16
    assert cuts["fc"] == 10
    # A skip around two top-level convs crosses the cut between them.
    module, inputs = _meta(TopLevelSkip, 1, 8, 4, 4)
    t = capture(module, inputs, name="skip", batch=1)
    assert [layer.name for layer in t.layers] == ["a", "b"]
    assert t.layers[0].cut_elems == 2 * 8 * 4 * 4  # x and a(x)


# ---- tensor parallelism on user models ----------------------------------------------------


def test_user_two_linear_mlp_is_one_layer_with_an_mlp_group() -> None:
    module, inputs = _meta(TwoLayerMLP, 4, 32)
    g = capture(module, inputs, name="two-layer", batch=4)
    assert len(g.layers) == 1
    (group,) = g.layers[0].tp
    assert group.style is TPStyle.MLP
    assert group.column == ("fc1",) and group.row == ("fc2",)
    assert group.max_degree == 128
    assert group.comm_elems == 4 * 32
    assert group.sharded_params == 32 * 128 + 128 + 128 * 32

    module, inputs = _meta(NormBetween, 4, 16)
    g = capture(module, inputs, name="norm-between", batch=4)
    assert all(t.style is not TPStyle.MLP for layer in g.layers for t in layer.tp)

    module, inputs = _meta(TokenMixer, 2, 8, 16)
    g = capture(module, inputs, name="mixer", batch=2)
    assert all(not layer.tp for layer in g.layers)


def test_multihead_attention_module_is_a_heads_group() -> None:
    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(64, 8, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.attn(x, x, x, need_weights=False)[0]

    with torch.device("meta"):
        module, x = Encoder(), torch.empty(2, 10, 64)
    g = capture(module, (x,), name="mha", batch=2)
    (group,) = g.layers[0].tp
    assert group.style is TPStyle.HEADS and group.max_degree == 8
    assert g.flops_by_class()["attention"] > 0


# ---- meta device and re-tracing -----------------------------------------------------------


def test_capture_keeps_the_meta_device() -> None:
    module, inputs = build("llama-2-7b", device="meta", seq_len=64)
    g = capture(module, inputs, name="llama", batch=1, seq_len=64, phase="prefill")
    assert all(p.is_meta for p in module.parameters())
    assert all(b.is_meta for b in module.buffers())
    assert g.total_params == sum(p.numel() for p in module.parameters())


def test_trace_layers_cuts_a_real_module_like_the_capture() -> None:
    module, (ids,) = build("tiny-gpt", device="cpu", seq_len=16, seed=1)
    gm, layers = trace_layers(module, (ids,))
    g = capture_model("tiny-gpt", seq_len=16)
    assert [list(layer.nodes) for layer in g.layers] == layers
    names = {n.name for n in gm.graph.nodes}
    assert all(n in names for layer in layers for n in layer)
    with torch.no_grad():
        torch.testing.assert_close(gm(ids), module(ids))
    # The runtime's use: split the real module at the layer boundaries and run the pieces.
    for name in ("tiny-unet", "tiny-gpt"):
        module, inputs = build(name, device="cpu", batch=2)
        gm, layers = trace_layers(module, inputs)
        part = {n: i for i, layer in enumerate(layers) for n in layer}
        staged = split_module(gm, module, lambda node, part=part: part[node.name])
        stages = [k for k, _ in staged.named_children() if k.startswith("submod_")]
        assert len(stages) == len(layers)
        with torch.no_grad():
            torch.testing.assert_close(staged(*inputs), module(*inputs))


def test_cpu_build_runs_and_phases_share_weights() -> None:
    prefill, (ids,) = build("tiny-gpt", device="cpu", seq_len=8, seed=3)
    decode, (one,) = build("tiny-gpt", device="cpu", phase="decode", kv_len=8, seed=3)
    assert one.shape == (1, 1)
    for (k, a), (_, b) in zip(prefill.state_dict().items(), decode.state_dict().items(),
                              strict=True):
        assert torch.equal(a, b), k
    with torch.no_grad():
        assert prefill(ids).shape == (1, 8, 512)
        assert decode(one).shape == (1, 1, 512)
    for name in ("mlp", "tiny-resnet", "tiny-unet"):
        module, inputs = build(name, device="cpu", batch=2)
        with torch.no_grad():
            assert torch.isfinite(module(*inputs)).all()
    with pytest.raises(CaptureError, match="too large"):
        build("llama-2-7b", device="cpu")


def test_zoo_shape_errors() -> None:
    with pytest.raises(CaptureError, match="1 new token"):
        capture_model("tiny-gpt", phase="decode", seq_len=5)
    with pytest.raises(CaptureError, match="not tokens"):
        capture_model("resnet50", seq_len=128)
    with pytest.raises(CaptureError, match="outside"):
        capture_model("bert-large", seq_len=4096)
    with pytest.raises(CaptureError) as exc:
        capture_model("lama-2-7b")
    assert "did you mean 'llama-2-7b'" in exc.value.message
    assert "kcloud models" in exc.value.message


# ---- user files and ONNX ------------------------------------------------------------------

USER_FILE = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(*[Block() for _ in range(3)])
        self.out = nn.Linear(32, 4)

    def forward(self, x, mask=None):
        if mask is not None:
            x = x * mask
        return self.out(self.blocks(x))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(32, 64)
        self.down = nn.Linear(64, 32)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


def make():
    return Net(), (torch.randn(2, 32),)


def make_batched(batch=1):
    return Net(), (torch.randn(batch, 32),)


def wrong():
    return 42


def boom():
    raise RuntimeError("weights not found")
'''


def test_user_file_factory(tmp_path: Path) -> None:
    path = tmp_path / "net.py"
    path.write_text(USER_FILE)
    g = load_model_spec(f"{path}:make")
    assert [layer.name for layer in g.layers] == ["blocks.0", "blocks.1", "blocks.2", "out"]
    assert g.batch == 2 and g.total_params == 3 * (32 * 64 + 64 + 64 * 32 + 32) + 32 * 4 + 4
    assert all(layer.tp[0].style is TPStyle.MLP for layer in g.layers[:3])
    assert load_model_spec(f"{path}:make", batch=8).batch == 8  # inputs resized
    assert load_model_spec(f"{path}:make_batched", batch=5).batch == 5  # passed to the factory


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("{d}/missing.py:make", "no such file"),
        ("{d}/broken.py:make", "cannot import"),
        ("{d}/net.py:nothere", "has no function 'nothere'"),
        ("{d}/net.py:wrong", "returned int"),
        ("{d}/net.py:boom", "boom() failed: RuntimeError: weights not found"),
        ("{d}/net.py", "no factory named"),
        ("{d}/model.pt", "cannot load"),
        ("{d}/missing.onnx", "no such file"),
    ],
)
def test_user_spec_errors_are_one_line(tmp_path: Path, spec: str, needle: str) -> None:
    (tmp_path / "net.py").write_text(USER_FILE)
    (tmp_path / "broken.py").write_text("import torch\nraise_here(\n")
    with pytest.raises(CaptureError) as exc:
        load_model_spec(spec.format(d=tmp_path))
    assert needle in exc.value.message
    assert "\n" not in exc.value.message


def test_untraceable_module_is_a_capture_error(tmp_path: Path) -> None:
    path = tmp_path / "branchy.py"
    path.write_text(textwrap.dedent('''
        import torch
        from torch import nn

        class Branchy(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(4, 4)

            def forward(self, x):
                if x.sum() > 0:
                    return self.fc(x)
                return x

        def make():
            return Branchy(), (torch.randn(2, 4),)
    '''))
    with pytest.raises(CaptureError, match="cannot trace"):
        load_model_spec(f"{path}:make")


class SmallConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x))
        g = torch.relu(self.conv3(torch.relu(self.conv2(h)))) + h
        return self.fc(g.flatten(1))


def _helper_onnx(path: Path) -> None:
    """The same network written with onnx.helper (for hosts where export is unavailable)."""
    torch.manual_seed(0)
    net = SmallConvNet()
    inits = [numpy_helper.from_array(t.detach().numpy(), name) for name, t in
             (("w1", net.conv1.weight), ("b1", net.conv1.bias), ("w2", net.conv2.weight),
              ("b2", net.conv2.bias), ("w3", net.conv3.weight), ("b3", net.conv3.bias),
              ("wf", net.fc.weight), ("bf", net.fc.bias))]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["h1"]),
        helper.make_node("Conv", ["h1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c3"], ["r3"]),
        helper.make_node("Add", ["r3", "h1"], ["h2"]),
        helper.make_node("Flatten", ["h2"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "small", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_onnx_capture_matches_the_torch_capture(tmp_path: Path) -> None:
    path = tmp_path / "small.onnx"
    net = SmallConvNet().eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(net, (torch.randn(1, 3, 8, 8),), str(path), dynamo=False,
                              input_names=["x"], dynamic_axes={"x": {0: "N"}})
    except Exception:  # no TorchScript exporter here: write the graph by hand
        _helper_onnx(path)
    g = load_model_spec(str(path), batch=4)
    ref = capture(net, (torch.randn(4, 3, 8, 8),), name="small", batch=4)
    assert isinstance(g, LayerGraph) and g.batch == 4
    assert [layer.kind for layer in g.layers] == ["Conv", "Conv", "Conv", "Gemm"]
    assert g.total_params == ref.total_params
    by_class, ref_class = g.flops_by_class(), ref.flops_by_class()
    assert by_class["conv"] == pytest.approx(ref_class["conv"])
    assert by_class["matmul"] == pytest.approx(ref_class["matmul"])
    act = 4 * 8 * 8 * 8
    # After conv1: h (conv2's input and the skip); after conv2: its output and the skip h.
    assert [layer.cut_elems for layer in g.layers] == [act, 2 * act, act, 4 * 10]
    assert g.output_elems == 4 * 10
    assert g.layers[0].tp[0].style is TPStyle.CONV and g.layers[0].tp[0].max_degree == 8

    hand = tmp_path / "hand.onnx"
    _helper_onnx(hand)
    h = load_model_spec(str(hand), batch=4)
    assert h.total_flops == pytest.approx(g.total_flops, rel=0.01)
    assert [layer.cut_elems for layer in h.layers] == [act, 2 * act, act, 4 * 10]


# ---- CLI ----------------------------------------------------------------------------------


def test_cli_graph_json_is_one_object(capsys: pytest.CaptureFixture[str]) -> None:
    main(["graph", "tiny-gpt", "--json"])
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    d = json.loads(out)
    for key in ("layers", "total_flops", "total_weight_bytes", "total_params",
                "flops_by_class", "meta", "n_layers"):
        assert key in d
    assert len(d["layers"]) == d["n_layers"] == 7
    assert math.isclose(d["total_flops"], capture_model("tiny-gpt").total_flops)


def test_cli_models_and_table(capsys: pytest.CaptureFixture[str]) -> None:
    main(["models", "--json"])
    names = [m["name"] for m in json.loads(capsys.readouterr().out)["models"]]
    assert {"resnet50", "llama-2-70b", "tiny-unet"} <= set(names)
    main(["graph", "tiny-resnet"])
    out = capsys.readouterr().out
    assert "layer1.0" in out and "conv≤16" in out


@pytest.mark.parametrize("args", [
    ["graph", "nowhere/model.py:make"],
    ["graph", "lama-2-7b"],
    ["graph", "tiny-gpt", "--phase", "sideways"],
    ["graph", "resnet50", "--seq-len", "12"],
])
def test_cli_errors_exit_2_with_one_line(
    capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("kcloud: error: ")
    assert err.count("\n") == 1 and "Traceback" not in err
