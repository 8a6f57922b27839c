"""Small read helpers over an ONNX graph shared by equalization and bias correction."""

from __future__ import annotations

from typing import Any


def index(graph: Any) -> tuple[dict[str, Any], dict[str, Any], dict[str, list[Any]]]:
    """(initializers by name, producer node by tensor, consumer nodes by tensor)."""
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return inits, producer, consumers


def attr(node: Any, name: str, default: Any = None) -> Any:
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def set_initializer(graph: Any, name: str, array: Any) -> None:
    from onnx import numpy_helper

    for i, t in enumerate(graph.initializer):
        if t.name == name:
            graph.initializer[i].CopyFrom(numpy_helper.from_array(array.astype(numpy_helper.to_array(t).dtype), name))
            return
    raise KeyError(name)
