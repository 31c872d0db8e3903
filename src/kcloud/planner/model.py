"""The model as the planner sees it: one forward graph, or an LLM's prefill and decode graphs.

Non-LLM models cost one forward pass per item. An LLM request is a prompt of `input_tokens`
(prefill), whose last position gives the first token, followed by one decode step for each
further token (`output_tokens - 1`) over a KV cache whose mean length is prompt + half the
output, as in `kcloud.predict`; its items are generated tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from kcloud.errors import KCloudError
from kcloud.graph.layergraph import LayerGraph, OpClass
from kcloud.hardware.steps import decode_steps
from kcloud.planner.goal import Goal
from kcloud.workloads import Shape


@dataclass(frozen=True)
class ModelGraphs:
    spec: str  # what the runtime rebuilds: zoo name, file.py:factory or .onnx
    forward: LayerGraph  # the forward pass (non-LLM) or the prefill of the prompt (LLM)
    decode: LayerGraph | None = None  # LLM: one decode step at the mean KV length
    output_tokens: int = 1  # LLM: generated tokens per request
    workload: Shape | None = None  # the workload whose lengths these graphs have

    def __post_init__(self) -> None:
        if not self.forward.layers:
            raise KCloudError(f"{self.spec} has no layers", "give a model with at least one layer")
        if self.decode is not None and len(self.decode.layers) != len(self.forward.layers):
            raise KCloudError(
                f"{self.spec}: prefill and decode graphs have {len(self.forward.layers)} and "
                f"{len(self.decode.layers)} layers", "capture both phases of the same model")

    @property
    def is_llm(self) -> bool:
        return self.decode is not None

    @property
    def n_layers(self) -> int:
        return len(self.forward.layers)

    @property
    def prompt_tokens(self) -> int:
        return self.forward.seq_len or 1

    @property
    def items_per_sequence(self) -> int:
        """Items one sample yields: generated tokens for an LLM, 1 otherwise."""
        return self.output_tokens if self.is_llm else 1

    @property
    def decode_steps(self) -> int:
        """LLM: decode steps per request. The prompt's forward pass gives the first token;
        each later token takes one step (the runtime generates the same way)."""
        return decode_steps(self.output_tokens) if self.is_llm else 0

    @property
    def unit(self) -> str:
        return "tokens/s" if self.is_llm else "samples/s"

    @property
    def context_tokens(self) -> int:
        return self.prompt_tokens + self.output_tokens

    @cached_property
    def peak_act_elems(self) -> np.ndarray:
        """Per layer: the largest op's activation elements (inputs + outputs, KV excluded) per
        sample of the forward/prefill graph."""
        g = self.forward
        out = np.zeros(self.n_layers)
        for li, layer in enumerate(g.layers):
            for op in layer.ops:
                out[li] = max(out[li], max(0, op.in_elems + op.out_elems - op.kv_elems))
        return out / g.batch

    @cached_property
    def cut_elems(self) -> tuple[np.ndarray, np.ndarray | None]:
        """Per cut (after each layer but the last): elements crossing it in the forward/prefill
        graph and (LLM) the decode graph, for their own batches."""
        def cuts(g: LayerGraph) -> np.ndarray:
            return np.array([layer.cut_elems for layer in g.layers[:-1]], dtype=float)

        return cuts(self.forward), None if self.decode is None else cuts(self.decode)

    @cached_property
    def kv_elems_per_token(self) -> np.ndarray:
        """LLM: per layer, the KV-cache elements one token of context keeps."""
        if self.decode is None:
            return np.zeros(self.n_layers)
        d = self.decode
        per_layer = np.array([float(sum(op.kv_elems for op in layer.ops)) for layer in d.layers])
        total = d.meta.get("kv_elems_per_token") or self.forward.meta.get("kv_elems_per_token")
        if per_layer.sum() > 0:
            if total:
                return per_layer * (float(total) / per_layer.sum())
            return per_layer / (d.batch * (d.kv_len or 1))
        if not total:
            raise KCloudError(f"{self.spec} has no KV-cache size in its graph metadata",
                              "capture it from the zoo or give an LLM factory that sets it")
        attn = np.array([any(op.op_class is OpClass.ATTENTION for op in layer.ops)
                         for layer in self.forward.layers], dtype=float)
        if attn.sum() == 0:
            attn[:] = 1.0
        return attn * (float(total) / attn.sum())


def llm_graphs(spec: str, prefill: LayerGraph, decode: LayerGraph,
               output_tokens: int) -> ModelGraphs:
    return ModelGraphs(spec, prefill, decode, output_tokens)


def load_model(spec: str, goal: Goal) -> ModelGraphs:
    """Capture `spec` (zoo name, file.py:factory or .onnx) for `goal`'s workload and lengths,
    as `kcloud predict` does (`kcloud.predict.model_inputs`)."""
    from kcloud.predict import model_inputs

    inputs = model_inputs(spec, goal.workload, input_tokens=goal.input_tokens,
                          output_tokens=goal.output_tokens)
    if not inputs.is_llm:
        return ModelGraphs(spec, inputs.graphs[0], workload=inputs.shape)
    prefill, decode = inputs.graphs
    return ModelGraphs(spec, prefill, decode, inputs.shape.output_tokens or 1,
                       workload=inputs.shape)
