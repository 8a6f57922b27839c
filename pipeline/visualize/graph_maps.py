"""Feature maps of a graph fmap cannot hook: an `onnx:` file, or the ONNX view of a TorchScript or
torch.export program. The chosen Conv outputs are added as graph outputs and read from onnxruntime,
so feature-map grids, overlays and the QA gallery work as for a torch model. Grad-CAM does not:
onnxruntime's inference sessions compute no gradients (see GRADCAM_SKIPPED).

Layers are named by the torch module path the exporter recorded (`layer1.0.conv1`) when the Conv is
that module's output, else by the node's name (`/graph/Conv_1` in a torch.export program's view).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline.visualize import similarity as sim
from pipeline.visualize.featuremaps import spread_layers, unknown_layers_error

CONV_OPS = ("Conv", "ConvTranspose")
GRADCAM_SKIPPED = ("onnxruntime computes no gradients; feature maps and overlays only "
                   "(Grad-CAM needs the model's Python source)")


def conv_layers(path: str | Path) -> list[str]:
    """Names of the graph's convolutions in topological order (a proxy for depth): the module path when
    the Conv is its module's output, else the node's name (what `similarity.onnx_layer_map` finds)."""
    import onnx

    nodes = [n for n in onnx.load(str(path), load_external_data=False).graph.node
             if n.output and n.op_type not in ("QuantizeLinear", "DequantizeLinear")]
    last_of_path = {sim.module_path_of_node(n): n.output[0] for n in nodes}
    names: list[str] = []
    for node in nodes:
        if node.op_type in CONV_OPS:
            path = sim.module_path_of_node(node)
            name = path if path and last_of_path[path] == node.output[0] else node.name
            if name and name not in names:
                names.append(name)
    return names


def resolve_layers(path: str | Path, requested: list[str] | None, count: int = 3) -> list[str]:
    """Requested names checked against the graph's Conv layers (close matches named), or ~3 defaults."""
    from pipeline.errors import BadInput

    convs = conv_layers(path)
    if not requested:
        if not convs:
            raise BadInput("visualize: the ONNX graph has no Conv node; name layers with --layers / layers:")
        return spread_layers(convs, count)
    unknown = [r for r in requested if r not in convs]
    if unknown:
        raise unknown_layers_error(unknown, convs)
    return list(requested)


def capture(path: str | Path, x: torch.Tensor, layers: list[str], threads: int,
            ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run `x` once through the graph; return (logits, {layer: activation [N,C,H,W]})."""
    logits, acts, _ = sim.onnx_activations(path, x.numpy(), layers, threads)
    return torch.from_numpy(logits), {name: torch.from_numpy(a) for name, a in acts.items()}


def graph_file(model: Any, example_input: torch.Tensor, view_path: Path) -> Path:
    """The model's own ONNX file, or an ONNX export of a TorchScript / torch.export program."""
    source = getattr(model, "onnx_path", None)
    if source is not None:
        return Path(source)
    from pipeline.export.onnx import export_onnx

    export_onnx(model, example_input[:1], view_path, dynamic_batch=True)
    return view_path
