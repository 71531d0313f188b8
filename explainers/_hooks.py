"""Layer lookup and reversible forward hooks.

Every hook registered here is removed when the ``with`` block ends, also after an
exception, so a worker that runs many methods in turn always gets a clean model back.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn


class LayerNotFoundError(KeyError):
    """A layer name that is not a module of the model; the message lists the valid ones.
    ``layer`` holds the name that was not found (None when unknown)."""

    def __init__(self, message: str, layer: str | None = None) -> None:
        super().__init__(message)
        self.layer = layer

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def get_layer(model: nn.Module, name: str) -> nn.Module:
    """Module called ``name`` in ``model``.

    Parameters
    ----------
    model : nn.Module
        The model.
    name : str
        Dotted module name as in ``model.named_modules()``.

    Returns
    -------
    nn.Module
        The module.

    Raises
    ------
    LayerNotFoundError
        If there is no such module; the message lists the valid names.
    """
    modules = dict(model.named_modules())
    base = name.split("#", 1)[0]  # "name#k": the k-th call of a module used several times
    if base and base in modules:
        return modules[base]
    valid = [n for n in modules if n]
    raise LayerNotFoundError(f"unknown layer {name!r}; valid layers: {', '.join(valid)}", name)


@contextmanager
def capture_outputs(model: nn.Module, names: list[str]) -> Iterator[dict[str, Tensor]]:
    """Record the output of each named module during forward passes inside the block.

    A module called several times in one forward (a reused ReLU) keeps its last output;
    ``"name#k"`` records its k-th call (from 0) of each forward pass instead. The recorded
    tensor is the module's own output even when the network modifies it in place later
    (an in-place activation after the layer): the network continues on a copy.

    Parameters
    ----------
    model : nn.Module
        The model.
    names : list of str
        Module names to record.

    Yields
    ------
    dict of str to Tensor
        Filled during each forward pass.
    """
    store: dict[str, Tensor] = {}
    calls: dict[str, int] = {}
    handles = [model.register_forward_pre_hook(lambda _m, _i: calls.clear())]  # count per pass
    try:
        wanted: dict[str, list[tuple[str, str]]] = {}  # module -> [(key, call index or "")]
        for name in names:
            get_layer(model, name)
            base, _, index = name.partition("#")
            wanted.setdefault(base, []).append((name, index))
        for base, keys in wanted.items():

            def hook(_m: nn.Module, _i: object, out: Tensor, base: str = base,
                     keys: list[tuple[str, str]] = keys) -> Tensor | None:
                k = calls.get(base, 0)
                calls[base] = k + 1
                hit = False
                for key, index in keys:
                    if not index or int(index) == k:
                        store[key] = out
                        hit = True
                # the rest of the network gets a copy: an in-place op after the layer
                # (ReLU(inplace=True), DenseNet's F.relu(norm5(x), inplace=True)) then
                # changes the copy, and the recorded tensor stays the layer's own output,
                # with the gradient taken with respect to it
                return out.clone() if hit and isinstance(out, Tensor) else None

            handles.append(get_layer(model, base).register_forward_hook(hook))
        yield store
    finally:
        for h in handles:
            h.remove()


#: Adaptive pools belong to the classifier head (VGG's 7x7 avgpool resamples, it does not see).
_HEAD_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


@dataclass(frozen=True)
class Call:
    """One finished forward call of a named module during a traced pass."""

    name: str
    module: nn.Module
    input: Tensor | None  # first positional input when it is a tensor
    output: Tensor | None  # the output when it is a tensor


def trace(model: nn.Module, example: Tensor) -> list[Call]:
    """Every named module's forward calls in the order they finish, for one no-grad pass.

    The calls keep their tensors alive, so ``id()`` identifies a tensor across the trace
    (which module produced the tensor another one reads). All hooks are removed afterwards.

    Parameters
    ----------
    model : nn.Module
        The model.
    example : Tensor, shape (N, C, H, W)
        The input of the traced pass.

    Returns
    -------
    list of Call
        In completion order (children before their parents).
    """
    calls: list[Call] = []
    handles = []
    try:
        for name, module in model.named_modules():
            if not name:
                continue

            def hook(m: nn.Module, inp: tuple[object, ...], out: object, key: str = name) -> None:
                first = inp[0] if inp and isinstance(inp[0], Tensor) else None
                calls.append(Call(key, m, first, out if isinstance(out, Tensor) else None))

            handles.append(module.register_forward_hook(hook))
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return calls


def spatial_layers(model: nn.Module, example: Tensor) -> list[tuple[str, tuple[int, ...]]]:
    """Modules with a 4-D spatial output, in the order their forward calls finish.

    Parameters
    ----------
    model : nn.Module
        The model.
    example : Tensor, shape (N, C, H, W)
        An input used for one traced forward pass.

    Returns
    -------
    list of (str, tuple of int)
        Module name and output shape, excluding outputs with a 1x1 spatial size and
        adaptive pooling layers (the head).
    """
    return [
        (c.name, tuple(c.output.shape))
        for c in trace(model, example)
        if c.output is not None and c.output.ndim == 4 and c.output.shape[-1] * c.output.shape[-2] > 1
        and not isinstance(c.module, _HEAD_POOLS)
    ]


def default_cam_layer(model: nn.Module, example: Tensor) -> str:
    """Name of the last convolutional block: the last module with a spatial output.

    Parameters
    ----------
    model : nn.Module
        The model.
    example : Tensor, shape (N, C, H, W)
        An input used for one traced forward pass.

    Returns
    -------
    str
        The module name (``layer4`` for ResNets, ``features`` for VGG, ``block4`` for the
        reference CNN).

    Raises
    ------
    ValueError
        If the model has no module with a spatial output.
    """
    order = spatial_layers(model, example[:1])
    if not order:
        raise ValueError("model has no module with a spatial (N, C, h, w) output")
    return order[-1][0]
