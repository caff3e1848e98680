"""The text path of a late-fusion encoder graph, as a graph of its own.

A late-fusion encoder ends in `Concat(text embedding, audio evidence, flags)`. For a row without audio the evidence
is 0, yet the graph runs the frozen Whisper branch on a placeholder sample for every call: on two CPU cores that
costs about as much per call as a dozen text tokens, the whole price of a one-utterance text request's encoder
call. `text_path_graph` cuts the graph down to the nodes that compute the text embedding and the flags, and ends it
in `Concat(text embedding, zeros, flags)`: the same inputs, the same `embedding` output and width, the same
values for calls in which no row has audio (its nodes are the original graph's own, so the text part is the same
computation). The runtime opens it beside the full graph and uses it for such calls (model/runtime.py).
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper
from onnx.utils import Extractor

OUTPUT = "embedding"
_PARTS = 3  # text embedding, audio evidence, flags


class NoTextPath(ValueError):
    """The graph does not end the way a late-fusion encoder does; the full graph serves every call."""


def text_path_graph(encoder_path: Path, evidence_width: int) -> bytes:
    """The serialised text-path graph of the late-fusion encoder at `encoder_path`, whose audio evidence has
    `evidence_width` columns."""
    model = onnx.load(str(encoder_path))
    text, flags = _text_and_flags(model)
    inputs = [value.name for value in model.graph.input]
    # Every input is kept (an exporter may take the batch size from any of them); unused ones cost nothing.
    cut = Extractor(model).extract_model(inputs, [text, flags])
    graph = cut.graph
    batch_input = next(value.name for value in model.graph.input if _rank(value) >= 1)
    graph.initializer.append(helper.make_tensor("text_path.evidence_width", TensorProto.INT64, [1], [evidence_width]))
    graph.node.extend(
        [
            helper.make_node("Shape", [batch_input], ["text_path.rows"], start=0, end=1),
            helper.make_node(
                "Concat", ["text_path.rows", "text_path.evidence_width"], ["text_path.evidence_shape"], axis=0
            ),
            helper.make_node(
                "ConstantOfShape",
                ["text_path.evidence_shape"],
                ["text_path.no_evidence"],
                value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]),
            ),
            helper.make_node("Concat", [text, "text_path.no_evidence", flags], [OUTPUT], axis=-1),
        ]
    )
    output = next(value for value in model.graph.output if value.name == OUTPUT)
    del graph.output[:]
    graph.output.append(output)
    return cut.SerializeToString()


def _text_and_flags(model: onnx.ModelProto) -> tuple[str, str]:
    producers = {name: node for node in model.graph.node for name in node.output}
    last = producers.get(OUTPUT)
    if last is None or last.op_type != "Concat" or len(last.input) != _PARTS:
        raise NoTextPath(f"the graph's {OUTPUT!r} is not the concatenation of text, audio evidence and flags")
    text, _, flags = last.input
    return text, flags


def _rank(value: onnx.ValueInfoProto) -> int:
    return len(value.type.tensor_type.shape.dim)
