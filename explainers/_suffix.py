"""Run a network from one layer's output onward, the layers before it computed once.

The model is traced with ``torch.fx`` (the target layer kept as one call); the graph is cut
after that layer: the *prefix* computes every value the rest of the network still needs
(the layer's output and, inside residual blocks, the tensors that skip over it), the
*suffix* is a new graph taking those values. Perturbing the layer's output (Ablation-CAM)
then costs only the suffix per perturbation.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, fx, nn


class SuffixUnavailable(RuntimeError):
    """The model cannot be cut at this layer (not traceable, or the layer runs twice)."""


class _KeepLayer(fx.Tracer):
    def __init__(self, layer: str) -> None:
        super().__init__()
        self.layer = layer

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname == self.layer or super().is_leaf_module(m, qualname)


class LayerSuffix:
    """``prefix(x)`` -> the cut values; ``suffix(values)`` -> the model's output.

    Parameters
    ----------
    model : nn.Module
        The network (its modules are shared, never copied).
    layer : str
        Name of the module after which to cut.

    Raises
    ------
    SuffixUnavailable
        When ``torch.fx`` cannot trace the model or the layer is not called exactly once.
    """

    def __init__(self, model: nn.Module, layer: str) -> None:
        try:
            tracer = _KeepLayer(layer)
            graph = tracer.trace(model)
        except Exception as err:  # noqa: BLE001  (any tracing failure: fall back)
            raise SuffixUnavailable(f"torch.fx cannot trace the model: {err}") from err
        self.module = fx.GraphModule(tracer.root, graph)
        nodes = list(graph.nodes)
        at = [i for i, n in enumerate(nodes) if n.op == "call_module" and n.target == layer]
        if len(at) != 1:
            raise SuffixUnavailable(f"layer {layer!r} is called {len(at)} times in the traced graph")
        cut = at[0] + 1
        self.prefix_nodes = nodes[:cut]
        suffix_nodes = nodes[cut:]
        later = set(suffix_nodes)
        self.live = [n for n in self.prefix_nodes if any(u in later for u in n.users)]
        self.layer_index = self.live.index(nodes[at[0]])
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {n: g.placeholder(f"cut_{i}") for i, n in enumerate(self.live)}
        for n in suffix_nodes:
            if n.op == "output":
                g.output(fx.map_arg(n.args[0], lambda a: env[a]))
            else:
                env[n] = g.node_copy(n, lambda a: env[a])
        self.suffix_module = fx.GraphModule(tracer.root, g)
        modules = dict(tracer.root.named_modules())
        #: the suffix writes into some tensor in place (ReLU(inplace=True) right after the
        #: layer, ``out += identity``): it then runs on copies, so the cut values (the
        #: layer's activations, the skip tensors) stay as computed for the next batch
        self.mutates = any(_in_place(n, modules) for n in suffix_nodes)

    def prefix(self, inputs: Tensor) -> list[Tensor]:
        """The cut values for a batch (index ``layer_index`` is the layer's output)."""
        interp = fx.Interpreter(self.module)
        interp.env = {}
        interp.args_iter = iter([inputs])
        for node in self.prefix_nodes:
            interp.env[node] = interp.run_node(node)
        return [interp.env[n] for n in self.live]

    def suffix(self, values: list[Any]) -> Tensor:
        """The model's output from cut values (batched along dim 0); ``values`` are left
        unchanged also when the network computes in place."""
        if self.mutates:
            values = [v.clone() if isinstance(v, Tensor) else v for v in values]
        return self.suffix_module(*values)


def _in_place(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether a traced node may write into one of its inputs."""
    if node.kwargs.get("inplace") is True:
        return True
    if node.op == "call_module":
        return bool(getattr(modules.get(str(node.target)), "inplace", False))
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return name.endswith("_") and not name.startswith("_") or name.startswith("__i")


def expand_values(values: list[Tensor], index: int, batch: int) -> list[Tensor]:
    """Image ``index``'s cut values repeated ``batch`` times (views, no copies)."""
    return [v[index : index + 1].expand(batch, *v.shape[1:]) if isinstance(v, Tensor) and v.dim() else v
            for v in values]

