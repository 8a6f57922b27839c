"""Trace a model once on a real input and record every intermediate tensor in execution order.

torch.fx gives the full dataflow (functional ops included) where the model traces; forward hooks on
leaf modules are the fallback so that every model can be profiled. Both paths run the real forward
and keep every output alive until the trace ends, so a tensor's storage address identifies it:
views and in-place ops (flatten, ReLU(inplace=True)) show up as the *same* storage, which is how
the liveness analysis avoids double counting aliases.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

# Ops whose output values are exact zeros where the input was negative: APoZ is measured after them.
RELU_LIKE_MODULES = (nn.ReLU, nn.ReLU6)
RELU_LIKE_FUNCS = {"relu", "relu_", "relu6"}
# Per-channel ops that may sit between a conv and its activation without mixing channels.
PASS_THROUGH_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.Dropout, nn.Identity)
_NO_COMPUTE = {"flatten", "view", "reshape", "getitem", "cat", "concat", "stack", "permute", "transpose",
               "contiguous", "squeeze", "unsqueeze", "chunk", "split", "size", "dim", "expand", "narrow",
               "Flatten", "Identity", "Dropout", "Unflatten", "getattr", "to", "type", "float", "clone"}
_MATMUL = {"matmul", "mm", "bmm", "linear", "einsum"}


@dataclass
class Node:
    """One executed op and the tensor(s) it produced (for one batch of `Graph.batch_size`)."""

    name: str
    op: str  # module class name ("Conv2d") or function/method name ("add", "flatten")
    kind: str  # "module" | "function" | "method"
    inputs: list[str]  # names of producing nodes ("input" for the model input)
    output_shape: list[int] | None
    dtype: str
    bytes: int  # bytes of the output tensor(s), views included (what torchinfo would sum)
    out_storages: list[tuple[int, int]]  # (storage key, storage bytes) of every output tensor
    in_storages: list[int]  # storage keys of every tensor argument
    params: int = 0
    macs: int = 0
    receptive_field: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    module: nn.Module | None = field(default=None, repr=False)
    # Module invocations executing this node, outermost first ("layer1", "layer1.0", ...). In eager
    # mode a tensor passed into a module call stays referenced by that call's frame until it
    # returns; the liveness walk uses this to match what the allocator really holds.
    stack: list[str] = field(default_factory=list, repr=False)

    @property
    def channels(self) -> int | None:
        return self.output_shape[1] if self.output_shape and len(self.output_shape) >= 2 else None

    @property
    def volume(self) -> int | None:
        """Per-sample feature-map volume C*H*W (all non-batch dims)."""
        return math.prod(self.output_shape[1:]) if self.output_shape and len(self.output_shape) >= 2 else None

    def to_dict(self) -> dict[str, Any]:
        rf, st = self.receptive_field, self.stride
        return {
            "name": self.name, "type": self.op, "output_shape": self.output_shape, "channels": self.channels,
            "volume": self.volume, "bytes": self.bytes, "params": self.params, "macs": self.macs,
            "receptive_field": max(rf), "stride": max(st), "inputs": self.inputs,
        }


@dataclass
class Graph:
    nodes: list[Node]
    method: str  # "fx" or "hooks"
    batch_size: int
    input_storages: set[int]
    input_bytes: int
    param_bytes: int
    output_storages: set[int]
    total_params: int
    fallback_reason: str = ""


def _tensors(obj: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor)]


def _skey(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _storages(tensors: list[torch.Tensor]) -> list[tuple[int, int]]:
    seen: dict[int, int] = {}
    for t in tensors:
        if t.numel() and t.device.type != "meta":
            seen.setdefault(_skey(t), t.untyped_storage().nbytes())
    return list(seen.items())


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return (int(v[0]), int(v[-1]))
    return (int(v), int(v))


def _macs(op: str, mod: nn.Module | None, args: list[torch.Tensor], out: list[torch.Tensor]) -> int:
    """Multiply-accumulates for the whole batch. Elementwise ops, norms and activations count one
    per output value; pooling counts one per window element; views, concat and copies count zero."""
    if not out:
        return 0
    o = out[0]
    if isinstance(mod, nn.modules.conv._ConvNd):
        k = math.prod(mod.kernel_size)
        if isinstance(mod, nn.modules.conv._ConvTransposeNd):
            return args[0].numel() * (mod.out_channels // mod.groups) * k
        return o.numel() * (mod.in_channels // mod.groups) * k
    if isinstance(mod, nn.Linear):
        return o.numel() * mod.in_features
    if isinstance(mod, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
        ks = mod.kernel_size
        return o.numel() * (math.prod(ks) if isinstance(ks, (tuple, list)) else ks ** (o.dim() - 2))
    if isinstance(mod, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool3d)):
        return args[0].numel() if args else o.numel()
    if op in ("conv1d", "conv2d", "conv3d") and len(args) >= 2:
        w = args[1]
        return o.numel() * math.prod(w.shape[1:])
    if op in _MATMUL and args:
        return o.numel() * int(args[0].shape[-1])
    if op in ("max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "mean", "sum"):
        return args[0].numel() if args else o.numel()
    if op in _NO_COMPUTE:
        return 0
    return sum(t.numel() for t in out)


def _spatial_op(mod: nn.Module | None, op: str, args: list[torch.Tensor], out: list[torch.Tensor]
                ) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """(effective kernel, stride) per spatial dim for ops that move the receptive field."""
    if isinstance(mod, nn.modules.conv._ConvNd) and len(mod.kernel_size) == 2 and not isinstance(
            mod, nn.modules.conv._ConvTransposeNd):
        kh, kw = mod.kernel_size
        dh, dw = mod.dilation
        return ((kh - 1) * dh + 1, (kw - 1) * dw + 1), tuple(mod.stride)  # type: ignore[return-value]
    if isinstance(mod, (nn.MaxPool2d, nn.AvgPool2d)):
        kh, kw = _pair(mod.kernel_size)
        sh, sw = _pair(mod.stride if mod.stride is not None else mod.kernel_size)
        dh, dw = _pair(getattr(mod, "dilation", 1))
        return ((kh - 1) * dh + 1, (kw - 1) * dw + 1), (sh, sw)
    global_pool = isinstance(mod, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) or op in (
        "adaptive_avg_pool2d", "adaptive_max_pool2d")
    if global_pool and args and args[0].dim() == 4 and out and out[0].dim() == 4:
        ih, iw = args[0].shape[-2:]
        oh, ow = out[0].shape[-2:]
        sh, sw = max(ih // max(oh, 1), 1), max(iw // max(ow, 1), 1)
        return (int(ih - (oh - 1) * sh), int(iw - (ow - 1) * sw)), (sh, sw)
    return None


def _finish_node(node: Node, mod: nn.Module | None, args: list[torch.Tensor], out: list[torch.Tensor],
                 producers: dict[str, Node], image_hw: tuple[int, int]) -> None:
    """Fill params, MACs, receptive field and cumulative stride from the inputs' nodes."""
    node.params = sum(p.numel() for p in mod.parameters()) if mod is not None else 0
    node.macs = _macs(node.op, mod, args, out)
    ins = [producers[n] for n in node.inputs if n in producers]
    rf = (max((n.receptive_field[0] for n in ins), default=1), max((n.receptive_field[1] for n in ins), default=1))
    st = (max((n.stride[0] for n in ins), default=1), max((n.stride[1] for n in ins), default=1))
    spatial = _spatial_op(mod, node.op, args, out)
    if spatial is not None:
        (kh, kw), (sh, sw) = spatial
        rf = (rf[0] + (kh - 1) * st[0], rf[1] + (kw - 1) * st[1])
        st = (st[0] * sh, st[1] * sw)
    elif isinstance(mod, nn.Linear) or node.op in _MATMUL:
        rf = (max(rf[0], image_hw[0]), max(rf[1], image_hw[1]))  # sees every input position
    node.receptive_field, node.stride = rf, st


def _op_name(target: Any) -> str:
    if isinstance(target, str):
        return target
    name = getattr(target, "__name__", None) or type(target).__name__
    return name


def trace_graph(model: nn.Module, example_input: torch.Tensor, prefer: str = "fx") -> Graph:
    """Run `model(example_input)` once under no_grad and return the executed graph.

    `prefer="hooks"` forces the fallback (tests use it); fx failures fall back automatically.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if prefer == "fx":
                try:
                    return _trace_fx(model, example_input)
                except Exception as exc:  # noqa: BLE001 - any trace failure means: use hooks
                    graph = _trace_hooks(model, example_input)
                    graph.fallback_reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}" if str(
                        exc) else type(exc).__name__
                    return graph
            return _trace_hooks(model, example_input)
    finally:
        model.train(was_training)


def _common(model: nn.Module, x: torch.Tensor) -> tuple[set[int], int, int, tuple[int, int]]:
    tensors = list(model.parameters()) + list(model.buffers())
    pkeys = {_skey(t) for t in tensors if t.numel()}
    pbytes = sum(n for _, n in _storages(tensors))
    image_hw = (int(x.shape[-2]), int(x.shape[-1])) if x.dim() >= 3 else (1, 1)
    return pkeys, pbytes, sum(p.numel() for p in model.parameters()), image_hw


def _trace_fx(model: nn.Module, x: torch.Tensor) -> Graph:
    import torch.fx

    gm = torch.fx.symbolic_trace(model)
    modules = dict(gm.named_modules())
    pkeys, pbytes, total_params, image_hw = _common(model, x)
    nodes: list[Node] = []
    by_name: dict[str, Node] = {}
    keep: list[Any] = []  # every value stays alive, so storage addresses are never reused
    outputs: set[int] = set()
    names: dict[str, str] = {}  # fx node name -> Node.name (module name, '#k' when called again)

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> Any:
            result = super().run_node(n)
            keep.append(result)
            if n.op == "output":
                outputs.update(k for k, _ in _storages(_tensors(result)))
                return result
            if n.op in ("placeholder", "get_attr"):
                return result
            args = _tensors((self.fetch_args_kwargs_from_env(n)))
            out = _tensors(result)
            mod = modules.get(n.target) if n.op == "call_module" else None  # type: ignore[arg-type]
            op = type(mod).__name__ if mod is not None else _op_name(n.target)
            if op == "getitem" and n.target is not operator.getitem:
                op = _op_name(n.target)
            inputs = ["input" if a.op == "placeholder" else names.get(a.name, a.name)
                      for a in n.all_input_nodes if a.op != "get_attr"]
            name = str(n.target) if n.op == "call_module" else n.name
            k = 1
            while (name if k == 1 else f"{name}#{k}") in by_name:
                k += 1
            name = name if k == 1 else f"{name}#{k}"
            names[n.name] = name
            node = Node(
                name=name, op=op,
                kind={"call_module": "module", "call_function": "function"}.get(n.op, "method"),
                inputs=inputs, output_shape=list(out[0].shape) if out else None,
                dtype=str(out[0].dtype).replace("torch.", "") if out else "",
                bytes=sum(t.numel() * t.element_size() for t in out),
                out_storages=[s for s in _storages(out) if s[0] not in pkeys],
                in_storages=[k for k, _ in _storages(args)], module=mod,
                stack=list(n.meta.get("nn_module_stack", {}).keys()),
            )
            _finish_node(node, mod, args, out, by_name, image_hw)
            nodes.append(node)
            by_name[node.name] = node
            return result

    Recorder(gm, garbage_collect_values=False).run(x)
    return Graph(nodes, "fx", int(x.shape[0]), {k for k, _ in _storages([x])}, x.numel() * x.element_size(),
                 pbytes, outputs, total_params)


def _trace_hooks(model: nn.Module, x: torch.Tensor) -> Graph:
    """Leaf-module hooks: tensors made by functional code between modules appear as
    'functional@<consumer>' nodes, allocated just before the module that consumes them."""
    return _HookTracer(model, x).trace()


class _HookTracer:
    """The state of one hook trace: nodes so far and which node last produced each storage."""

    def __init__(self, model: nn.Module, x: torch.Tensor) -> None:
        self.model, self.x = model, x
        self.pkeys, self.pbytes, self.total_params, self.image_hw = _common(model, x)
        self.in_keys = {k for k, _ in _storages([x])}
        self.nodes: list[Node] = []
        self.by_name: dict[str, Node] = {}
        self.owner: dict[int, str] = {k: "input" for k in self.in_keys}  # storage -> latest producer/aliaser
        self.keep: list[Any] = []  # tensors stay alive for the whole trace: storage ids are not reused
        self.counts: dict[str, int] = {}
        self.stack: list[str] = []
        self.calls: dict[str, int] = {}

    def push(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        self.stack.append(f"{name}@{self.calls[name]}")

    def _functional(self, fname: str, key: int, nbytes: int, stack: list[str] | None) -> None:
        """A tensor made by code no hook sees (torch.flatten, +, ...), as a node of its own."""
        node = Node(fname, "functional", "function", [], None, "", nbytes, [(key, nbytes)], [], module=None,
                    stack=stack)
        self.nodes.append(node)
        self.by_name[fname] = node
        self.owner[key] = fname

    def hook(self, mod: nn.Module, args: tuple, out: Any, name: str) -> None:
        self.keep.append((args, out))
        a, o = _tensors(args), _tensors(out)
        ins_st = _storages(a)
        for key, nbytes in ins_st:
            if key not in self.owner and key not in self.pkeys:
                self._functional(f"functional@{name}", key, nbytes, self.stack[:-1])
        self.counts[name] = self.counts.get(name, 0) + 1
        nname = name if self.counts[name] == 1 else f"{name}#{self.counts[name]}"  # a module called twice
        node = Node(
            name=nname, op=type(mod).__name__, kind="module",
            inputs=list(dict.fromkeys(self.owner[k] for k, _ in ins_st if k in self.owner)),
            output_shape=list(o[0].shape) if o else None, dtype=str(o[0].dtype).replace("torch.", "") if o else "",
            bytes=sum(t.numel() * t.element_size() for t in o),
            out_storages=[s for s in _storages(o) if s[0] not in self.pkeys],
            in_storages=[k for k, _ in ins_st], module=mod, stack=list(self.stack),
        )
        _finish_node(node, mod, a, o, self.by_name, self.image_hw)
        self.nodes.append(node)
        self.by_name[nname] = node
        for key, _ in node.out_storages:
            self.owner[key] = nname

    def trace(self) -> Graph:
        handles = []
        for n, m in self.model.named_modules():
            if not n:
                continue
            handles.append(m.register_forward_pre_hook(lambda m, a, n=n: self.push(n)))
            if not any(True for _ in m.children()):
                handles.append(m.register_forward_hook(lambda m, a, o, n=n: self.hook(m, a, o, n)))
            handles.append(m.register_forward_hook(lambda m, a, o: (self.stack.pop(), None)[1]))
        try:
            result = self.model(self.x)
        finally:
            for h in handles:
                h.remove()
        outputs = {k for k, _ in _storages(_tensors(result))}
        for key, nbytes in _storages(_tensors(result)):
            if key not in self.owner and key not in self.pkeys:
                self.nodes.append(Node("functional@output", "functional", "function", [], None, "", nbytes,
                                       [(key, nbytes)], []))
        x = self.x
        return Graph(self.nodes, "hooks", int(x.shape[0]), self.in_keys, x.numel() * x.element_size(), self.pbytes,
                     outputs, self.total_params)


def following_activation(model: nn.Module, layers: list[str]) -> dict[str, str]:
    """For each layer, the op where its channels' zeros actually appear (a module name when the
    ReLU is a module, else the fx node name); layers with none map to themselves."""
    gm = _try_trace(model)
    if gm is None:
        return {name: name for name in layers}
    return {layer: display for layer, (_, display) in activation_nodes(gm, layers).items()}


def _try_trace(model: nn.Module) -> Any:
    import torch.fx

    try:
        return torch.fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001 - untraceable: callers fall back to the layer itself
        return None


def activation_nodes(gm: Any, layers: list[str]) -> dict[str, tuple[str, str]]:
    """layer -> (fx node name, display name) of the op to measure in GraphModule `gm`.

    Follows the single-consumer chain layer -> (BatchNorm | Dropout | Identity)* -> ReLU-like.
    The fx node name pins the exact call, so a ReLU module used twice in a block is measured only
    at the call that follows the layer.
    """
    modules = dict(gm.named_modules())
    wanted = set(layers)
    result: dict[str, tuple[str, str]] = {}
    for n in gm.graph.nodes:
        if n.op != "call_module" or n.target not in wanted or n.target in result:
            continue
        result[n.target] = (n.name, str(n.target))
        cur = n
        while len(cur.users) == 1:
            nxt = next(iter(cur.users))
            mod = modules.get(nxt.target) if nxt.op == "call_module" else None
            fname = _op_name(nxt.target) if nxt.op != "call_module" else ""
            if isinstance(mod, RELU_LIKE_MODULES) or fname in RELU_LIKE_FUNCS:
                result[n.target] = (nxt.name, str(nxt.target) if mod is not None else nxt.name)
                break
            if isinstance(mod, PASS_THROUGH_MODULES) and nxt.args and nxt.args[0] is cur:
                cur = nxt
                continue
            break
    return result
