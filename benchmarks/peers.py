"""attriflow against Captum, pytorch-grad-cam and zennit, side by side (issue #8).

One process, one model, the same inputs and thread settings for every contender. For each
explainer a peer also implements it times, alternating over repetitions after a warm-up:

* ``ours``: the attriflow explainer at its automatic batch size;
* ``peer``: the peer library called as its documentation shows (its defaults);
* ``peer best``: the peer tuned (batch size chosen for this machine, parameters frozen so
  no weight gradient is computed), under the same allocator settings as ours;

and the forward-pass limit of the model measured in the same run: the best seconds per image
of one forward (``fwd``) and of one forward plus input gradient (``fwd+bwd``) over batch sizes
1-64. ``ours/limit`` is ours divided by (passes the method needs x that best time). Peak
memory is the largest growth of malloc's bytes in use during one call (sampled every 2 ms).

The script re-executes itself once with the CLI's glibc tunables (see ``flows/cli.py``), so
"peer defaults" are measured with our allocator too: the real defaults, under glibc's
defaults, are slower still (``benchmarks/PERF.md``), and peer/ours against them is a lower
bound. ``make bench`` runs every configuration below and renders ``benchmarks/RESULTS.md``;
one configuration::

    .venv/bin/python benchmarks/peers.py --model resnet50 [--only NAME ...] [--reps 3]
    .venv/bin/python benchmarks/peers.py --model reference --precision bf16
    .venv/bin/python benchmarks/results.py   # benchmarks/results/*.json -> RESULTS.md

Sampling explainers on ResNet-50 and VGG-16 run on fewer images (``images`` in each case)
so that the whole harness stays under about half an hour on two cores; seconds per image
and every ratio are per image, so they do not depend on that count.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import sys
import threading
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from attriflow.flows.cli import allocator_env  # noqa: E402

OUT_DIR = ROOT / "benchmarks" / "results"


# ------------------------------------------------------------------------------ measuring
class PeakAlloc:
    """Largest growth of the bytes malloc has handed out (``mallinfo2``: arena plus mmap'd
    blocks in use) above the level at entry, sampled every 2 ms. Unlike the resident set it
    sees a buffer that a warm allocator reuses, so it is the memory a call needs."""

    def __init__(self) -> None:
        import ctypes

        class MallInfo2(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in (
                "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                "fordblks", "keepcost")]

        self._libc = ctypes.CDLL(None)
        self._libc.mallinfo2.restype = MallInfo2
        self.peak = 0
        self._stop = threading.Event()

    def _used(self) -> int:
        info = self._libc.mallinfo2()
        return int(info.uordblks + info.hblkhd)

    def _poll(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._used() - self.base)

    def __enter__(self) -> PeakAlloc:
        self.base = self._used()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._used() - self.base)


#: Where models and inputs live (``--device``); CUDA timings synchronise, memory is CUDA's.
DEVICE = torch.device("cpu")


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(seconds, peak memory growth in MiB) of one call: resident memory on CPU, the CUDA
    allocator's peak on a GPU (after synchronising, so the time is the kernels' too)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)
        torch.cuda.reset_peak_memory_stats(DEVICE)
        base = torch.cuda.memory_allocated(DEVICE)
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize(DEVICE)
        return time.perf_counter() - t0, (torch.cuda.max_memory_allocated(DEVICE) - base) / 2**20
    with PeakAlloc() as mem:
        t0 = time.perf_counter()
        fn()
        seconds = time.perf_counter() - t0
    return seconds, mem.peak / 2**20


def measure_limit(model: torch.nn.Module, example: torch.Tensor, reps: int,
                  batches: tuple[int, ...], autocast: contextlib.AbstractContextManager | None = None
                  ) -> dict[str, float]:
    """Best seconds per image of a forward and of a forward + input gradient (weights frozen)."""
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    best = {"fwd": float("inf"), "fwd+bwd": float("inf")}
    try:
        for b in batches:
            x = example[:1].expand(b, *example.shape[1:]).contiguous()
            if autocast is not None and getattr(autocast, "channels_last", False):
                x = x.contiguous(memory_format=torch.channels_last)

            def fwd() -> None:
                with torch.no_grad(), (autocast or contextlib.nullcontext()):
                    model(x)

            def fwdbwd() -> None:
                xi = x.detach().requires_grad_(True)
                with (autocast or contextlib.nullcontext()):
                    out = model(xi)
                torch.autograd.grad(out[:, 0].sum(), xi)

            for name, fn in (("fwd", fwd), ("fwd+bwd", fwdbwd)):
                fn()  # warm-up of this shape
                runs = [timed(fn) for _ in range(reps)]
                best[name] = min(best[name], statistics.median(s for s, _ in runs) / b)
                best[f"{name} peak MiB @{b}"] = max(m for _, m in runs)
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
    return best


# ------------------------------------------------------------------------------ models
def real_images(n: int, size: int) -> torch.Tensor:
    """``n`` photographs shipped with scikit-image, resized and ImageNet-normalised."""
    from skimage import data

    names = ["astronaut", "chelsea", "coffee", "rocket", "brick", "grass", "gravel", "camera"]
    out = []
    for name in (names * ((n + len(names) - 1) // len(names)))[:n]:
        img = np.asarray(getattr(data, name)(), dtype=np.float32) / 255.0
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        t = torch.from_numpy(img[..., :3]).permute(2, 0, 1)[None]
        out.append(F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False))
    x = torch.cat(out)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (x - mean) / std


def load_model(name: str, n_images: int) -> tuple[torch.nn.Module, torch.Tensor, dict[str, str]]:
    """(model in eval mode, inputs, CAM layers) for ``resnet50``, ``vgg16`` or ``reference``."""
    if name == "reference":
        from attriflow.data.embedded import render
        from attriflow.tasks.config import ModelConfig
        from attriflow.tasks.models import build_model

        loaded = build_model(ModelConfig())
        imgs = np.stack([render(i).image for i in range(n_images)])
        x = loaded.normalize(torch.from_numpy(imgs).permute(0, 3, 1, 2).float())
        module = loaded.module.eval()
        for p in module.parameters():  # as a user's freshly built model (peers rely on it)
            p.requires_grad_(True)
        return module, x, {"cam": "block4", "module": "block4"}
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    layer = "layer4" if name.startswith("resnet") else "features.29"
    return model, real_images(n_images, 224), {"cam": layer, "module": layer}


# ------------------------------------------------------------------------------ peers
def frozen(fn: Callable[[], object], model: torch.nn.Module) -> Callable[[], object]:
    """``fn`` run with the model's parameters frozen (no weight gradients)."""

    def run() -> object:
        flags = [p.requires_grad for p in model.parameters()]
        for p in model.parameters():
            p.requires_grad_(False)
        try:
            return fn()
        finally:
            for p, f in zip(model.parameters(), flags):
                p.requires_grad_(f)

    return run


def gradcam_call(cls_name: str, model, layer, x, t, batch: int | None = None) -> Callable[[], object]:
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    def run() -> object:
        with getattr(pytorch_grad_cam, cls_name)(model=model, target_layers=[layer]) as cam:
            if batch is not None:
                cam.batch_size = batch
            return cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in t])

    return run


def captum_call(cls_name: str, model, x, t, wrap: str | None = None, **kwargs) -> Callable[[], object]:
    import captum.attr

    def run() -> object:
        method = getattr(captum.attr, cls_name)(model)
        if wrap == "noise_tunnel":
            method = captum.attr.NoiseTunnel(method)
        return method.attribute(x.clone().requires_grad_(), target=t, **kwargs)

    return run


def captum_layer_call(cls_name: str, model, layer, x, t, **kwargs) -> Callable[[], object]:
    import captum.attr

    def run() -> object:
        return getattr(captum.attr, cls_name)(model, layer).attribute(x.clone().requires_grad_(), target=t, **kwargs)

    return run


def captum_friendly(model: torch.nn.Module) -> torch.nn.Module:
    """A copy Captum's DeepLift accepts: every torchvision ResNet block gets its own ReLU
    module per use (Captum fails on the shared one)."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    twin = copy.deepcopy(model)
    for block in twin.modules():
        if isinstance(block, Bottleneck):
            block.relu1, block.relu2, block.relu3 = torch.nn.ReLU(), torch.nn.ReLU(), torch.nn.ReLU()

            def forward(self, x):
                identity = x if self.downsample is None else self.downsample(x)
                out = self.relu1(self.bn1(self.conv1(x)))
                out = self.relu2(self.bn2(self.conv2(out)))
                return self.relu3(self.bn3(self.conv3(out)) + identity)

            block.forward = types.MethodType(forward, block)
        elif isinstance(block, BasicBlock):
            block.relu1, block.relu2 = torch.nn.ReLU(), torch.nn.ReLU()

            def forward(self, x):  # noqa: F811
                identity = x if self.downsample is None else self.downsample(x)
                out = self.relu1(self.bn1(self.conv1(x)))
                return self.relu2(self.bn2(self.conv2(out)) + identity)

            block.forward = types.MethodType(forward, block)
    return twin


def zennit_call(model, x, t, composite: str) -> Callable[[], object]:
    """zennit's ``Gradient`` attributor with a named composite (ResNetCanonizer on ResNets,
    ZBox bounds at the normalised image range)."""
    from zennit.attribution import Gradient
    from zennit.composites import (
        EpsilonGammaBox,
        EpsilonPlusFlat,
        SpecialFirstLayerMapComposite,
        layer_map_base,
    )
    from zennit.rules import Epsilon, ZBox, ZPlus
    from zennit.torchvision import ResNetCanonizer, VGGCanonizer
    from zennit.types import Convolution, Linear

    canon = [ResNetCanonizer()] if hasattr(model, "layer4") else [VGGCanonizer()]
    lo, hi = float(x.min()), float(x.max())

    def make():
        if composite == "EpsilonPlusFlat":
            return EpsilonPlusFlat(canonizers=canon)
        if composite == "EpsilonGammaBox":
            return EpsilonGammaBox(low=lo, high=hi, canonizers=canon)
        assert composite == "EpsilonPlusBox"  # our epsilon_plus_box: ZPlus conv, Epsilon dense, ZBox first
        layer_map = layer_map_base() + [(Convolution, ZPlus()), (Linear, Epsilon(1e-6))]
        return SpecialFirstLayerMapComposite(layer_map=layer_map, first_map=[(Convolution, ZBox(lo, hi))],
                                             canonizers=canon)

    def run() -> object:
        with Gradient(model=model, composite=make()) as attributor:
            _, rel = attributor(x.clone().requires_grad_(), lambda out: torch.eye(out.shape[1]).to(out)[t] * out)
        return rel

    return run


def superpixel_masks(x: torch.Tensor, segments: int) -> list[torch.Tensor]:
    """Each image's SLIC superpixels as attriflow computes them, so that both sides explain
    the same features (the peer gets them as Captum's ``feature_mask``)."""
    from attriflow.explainers._segments import SuperpixelParams, segment

    return segment(x.cpu(), SuperpixelParams(segments=segments), normalization=None)


def captum_superpixel_call(cls_name: str, model, x, t, segments: int, **kwargs) -> Callable[[], object]:
    """A Captum perturbation method over superpixels, one image per call (masks differ per
    image), as Captum's tutorials run LIME and KernelSHAP on images; the SLIC segmentation is
    timed with it, as ours is."""
    import captum.attr

    def run() -> object:
        masks = [m.to(x.device) for m in superpixel_masks(x, segments)]
        method = getattr(captum.attr, cls_name)(model)
        with torch.no_grad():
            return [method.attribute(x[i:i + 1], target=int(t[i]), feature_mask=masks[i][None, None],
                                     **kwargs) for i in range(len(x))]

    return run


def pair_call(cls_name: str, model, x, t, **kwargs) -> Callable[[], object]:
    """PAIR's ``saliency`` method on each image (HWC NumPy, as the library takes it), the
    model's input gradients computed by torch in the call-back PAIR asks for."""
    import saliency.core as saliency

    def run() -> object:
        out = []
        for i in range(len(x)):
            def call(batch, call_model_args=None, expected_keys=None, i=i):
                xb = torch.from_numpy(np.asarray(batch, dtype=np.float32)).permute(0, 3, 1, 2).to(x.device)
                xb.requires_grad_(True)
                (grad,) = torch.autograd.grad(model(xb)[:, int(t[i])].sum(), xb)
                return {saliency.INPUT_OUTPUT_GRADIENTS: grad.permute(0, 2, 3, 1).cpu().numpy()}

            img = x[i].permute(1, 2, 0).cpu().numpy()
            quantile = np.quantile  # PAIR's GuidedIG passes NumPy 1's interpolation= keyword
            np.quantile = lambda a, q, interpolation="linear", **kw: quantile(  # noqa: E731
                a, q, method=interpolation, **kw)
            try:
                out.append(getattr(saliency, cls_name)().GetMask(img, call, **kwargs))
            finally:
                np.quantile = quantile
        return out

    return run


def _xrai_steps(steps: int):
    import saliency.core as saliency

    return saliency.XRAIParameters(steps=steps)


def finer_call(model, layer, x, t) -> Callable[[], object]:
    """pytorch-grad-cam's FinerCAM, one call per image (its target index is per call)."""
    import pytorch_grad_cam

    def run() -> object:
        with pytorch_grad_cam.FinerCAM(model=model, target_layers=[layer]) as cam:
            return [cam(input_tensor=x[i:i + 1], target_idx=int(t[i])) for i in range(len(x))]

    return run


def torchray_call(name: str, model, layer: str | None, x, t, **kwargs) -> Callable[[], object]:
    """A TorchRay attribution function on the batch (``extremal_perturbation``: per image, as
    its area constraint is per call); the parameters' ``requires_grad`` TorchRay switches off
    are restored."""
    import importlib

    module = "extremal_perturbation" if name == "extremal_perturbation" else "excitation_backprop"
    fn = getattr(importlib.import_module(f"torchray.attribution.{module}"), name)

    def run() -> object:
        flags = [p.requires_grad for p in model.parameters()]
        try:
            if name == "extremal_perturbation":
                return [fn(model, x[i:i + 1], int(t[i]), areas=[0.1], **kwargs) for i in range(len(x))]
            if name == "contrastive_excitation_backprop":
                fc = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)][-1]
                contrast = [n for n, m in model.named_children() if not isinstance(m, torch.nn.Flatten)][-2]
                return fn(model, x, t, saliency_layer=layer, contrast_layer=contrast, classifier_layer=fc)
            return fn(model, x, t, saliency_layer=layer)
        finally:
            for p, f in zip(model.parameters(), flags):
                p.requires_grad_(f)

    return run


def gaussian_references(x: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` N(0, 1) reference images (our ``gradient_shap`` / ``deeplift_shap`` default)."""
    return torch.randn((count, *x.shape[1:]), generator=torch.Generator().manual_seed(0)).to(x.device)


def rise_reference(model, x, t, masks: int, batch: int, grid: int = 7, keep: float = 0.5) -> Callable[[], object]:
    """The plain batched RISE of the authors' code: all masks drawn up front per image, then
    ``batch`` masked inputs per forward, softmax score of the target."""
    n, _, h, w = x.shape
    cell = int(np.ceil(h / grid))

    def run() -> object:
        gen = torch.Generator().manual_seed(0)
        out = torch.zeros(n, h, w)
        with torch.no_grad():
            for i in range(n):
                g = (torch.rand(masks, 1, grid, grid, generator=gen) < keep).float()
                up = F.interpolate(g, size=((grid + 1) * cell,) * 2, mode="bilinear", align_corners=False)
                dy, dx = torch.randint(0, cell, (2, masks), generator=gen)
                m = torch.stack([up[k, 0, dy[k]:dy[k] + h, dx[k]:dx[k] + w] for k in range(masks)])
                for s in range(0, masks, batch):
                    mb = m[s:s + batch]
                    p = torch.softmax(model(x[i:i + 1] * mb[:, None]), 1)[:, t[i]]
                    out[i] += (p[:, None, None] * mb).sum(0)
        return out / (masks * keep)

    return run


# ------------------------------------------------------------------------------ cases
@dataclass
class Case:
    """One explainer and its peer: ``passes`` is (limit kind, passes per image)."""

    name: str
    ours: str
    params: dict
    peer: str
    passes: tuple[str, int]
    peer_default: Callable[..., Callable[[], object]] | None
    peer_best: Callable[..., Callable[[], object]] | None = None
    images: int | None = None  # fewer images than the run's (expensive cases on big models)
    models: tuple[str, ...] = ("resnet50", "reference")
    sampling: bool = False
    note: str = ""


def cases(model_name: str, layers: dict[str, str], channels: int) -> list[Case]:
    """The comparison table for one model (functions of (model, layer module, x, t))."""
    big = model_name != "reference"
    few = 2 if big else None  # images for sampling explainers on the ImageNet models
    score_imgs = 1 if big else None
    rise_masks = 1000 if big else 4000
    C = [
        Case("Saliency", "saliency", {"reduce": "max_abs"}, "captum Saliency", ("fwd+bwd", 1),
             lambda m, l, x, t: captum_call("Saliency", m, x, t),
             lambda m, l, x, t: frozen(captum_call("Saliency", m, x, t), m)),
        Case("Gradient x Input", "gradient_x_input", {}, "captum InputXGradient", ("fwd+bwd", 1),
             lambda m, l, x, t: captum_call("InputXGradient", m, x, t),
             lambda m, l, x, t: frozen(captum_call("InputXGradient", m, x, t), m)),
        Case("Guided Backprop", "guided_backprop", {"reduce": "sum"}, "captum GuidedBackprop", ("fwd+bwd", 1),
             lambda m, l, x, t: captum_call("GuidedBackprop", m, x, t),
             lambda m, l, x, t: frozen(captum_call("GuidedBackprop", m, x, t), m)),
        Case("Deconvnet", "deconvnet", {"reduce": "sum"}, "captum Deconvolution", ("fwd+bwd", 1),
             lambda m, l, x, t: captum_call("Deconvolution", m, x, t),
             lambda m, l, x, t: frozen(captum_call("Deconvolution", m, x, t), m)),
        Case("DeepLIFT", "deeplift", {}, "captum DeepLift", ("fwd+bwd", 2),
             lambda m, l, x, t: captum_call("DeepLift", m, x, t),
             lambda m, l, x, t: frozen(captum_call("DeepLift", captum_friendly(m), x, t), m),
             note="peer best: a copy with one ReLU module per use (Captum fails on torchvision's shared ReLU)"),
        Case("Grad-CAM", "grad_cam", {"layer": layers["cam"]}, "grad-cam GradCAM", ("fwd", 1),
             lambda m, l, x, t: gradcam_call("GradCAM", m, l, x, t)),
        Case("Grad-CAM (Captum)", "grad_cam", {"layer": layers["cam"]}, "captum LayerGradCam", ("fwd", 1),
             lambda m, l, x, t: captum_layer_call("LayerGradCam", m, l, x, t),
             lambda m, l, x, t: frozen(captum_layer_call("LayerGradCam", m, l, x, t), m)),
        Case("Grad-CAM++", "grad_cam_plus_plus", {"layer": layers["cam"]}, "grad-cam GradCAMPlusPlus", ("fwd", 1),
             lambda m, l, x, t: gradcam_call("GradCAMPlusPlus", m, l, x, t)),
        Case("XGrad-CAM", "xgrad_cam", {"layer": layers["cam"]}, "grad-cam XGradCAM", ("fwd", 1),
             lambda m, l, x, t: gradcam_call("XGradCAM", m, l, x, t)),
        Case("Layer-CAM", "layer_cam", {"layer": layers["cam"]}, "grad-cam LayerCAM", ("fwd", 1),
             lambda m, l, x, t: gradcam_call("LayerCAM", m, l, x, t)),
        Case("Eigen-CAM", "eigen_cam", {"layer": layers["cam"]}, "grad-cam EigenCAM", ("fwd", 1),
             lambda m, l, x, t: gradcam_call("EigenCAM", m, l, x, t)),
        Case("Guided Grad-CAM", "guided_grad_cam", {"layer": layers["cam"]}, "captum GuidedGradCam", ("fwd+bwd", 1),
             lambda m, l, x, t: captum_layer_call("GuidedGradCam", m, l, x, t),
             lambda m, l, x, t: frozen(captum_layer_call("GuidedGradCam", m, l, x, t), m)),
        Case("Ablation-CAM", "ablation_cam", {"layer": layers["cam"]}, "grad-cam AblationCAM", ("fwd", 1),
             lambda m, l, x, t: gradcam_call("AblationCAM", m, l, x, t),
             None, images=score_imgs, note="the method needs 1 forward plus C head evaluations"),
        Case("Score-CAM", "score_cam", {"layer": layers["cam"], "score": "logit", "channel_softmax": True,
                                        "align_corners": True}, "grad-cam ScoreCAM", ("fwd", 1 + channels),
             lambda m, l, x, t: gradcam_call("ScoreCAM", m, l, x, t),
             lambda m, l, x, t: gradcam_call("ScoreCAM", m, l, x, t, batch=8),
             images=score_imgs, sampling=True),
        Case("RISE", "rise", {"masks": rise_masks}, "batched reference", ("fwd", rise_masks),
             lambda m, l, x, t: rise_reference(m, x, t, rise_masks, batch=100),
             lambda m, l, x, t: rise_reference(m, x, t, rise_masks, batch=16),
             images=few, sampling=True, note="reference batch: 100 (the authors' code), best 16"),
        Case("Occlusion", "occlusion", {"window": 32 if big else 16, "stride": 16 if big else 8}, "captum Occlusion",
             ("fwd", 0),
             lambda m, l, x, t: captum_call("Occlusion", m, x, t, **_occl_kwargs(big)),
             lambda m, l, x, t: captum_call("Occlusion", m, x, t, perturbations_per_eval=16, **_occl_kwargs(big)),
             images=few, sampling=True),
        Case("Integrated Gradients", "integrated_gradients", {"steps": 50, "rule": "riemann_trapezoid"},
             "captum IntegratedGradients", ("fwd+bwd", 50),
             lambda m, l, x, t: captum_call("IntegratedGradients", m, x, t, n_steps=50),
             lambda m, l, x, t: frozen(captum_call("IntegratedGradients", m, x, t, n_steps=50,
                                                   internal_batch_size=16), m),
             images=few, sampling=True),
        Case("SmoothGrad", "smooth_grad", {"samples": 25}, "captum NoiseTunnel(Saliency)", ("fwd+bwd", 25),
             lambda m, l, x, t: captum_call("Saliency", m, x, t, wrap="noise_tunnel", nt_type="smoothgrad",
                                            nt_samples=25, stdevs=0.5),
             lambda m, l, x, t: frozen(captum_call("Saliency", m, x, t, wrap="noise_tunnel", nt_type="smoothgrad",
                                                   nt_samples=25, stdevs=0.5, nt_samples_batch_size=16), m),
             images=few, sampling=True),
        Case("SISE", "sise", {}, "(no peer)", ("fwd", 0), None, images=score_imgs, sampling=True),
        Case("LRP EpsilonPlusFlat", "lrp_composite", {}, "zennit EpsilonPlusFlat", ("fwd+bwd", 1),
             lambda m, l, x, t: zennit_call(m, x, t, "EpsilonPlusFlat"),
             lambda m, l, x, t: frozen(zennit_call(m, x, t, "EpsilonPlusFlat"), m),
             models=("resnet50", "reference")),
        Case("LRP EpsilonPlusBox", "lrp_composite", {"preset": "epsilon_plus_box"}, "zennit (same rules)",
             ("fwd+bwd", 1),
             lambda m, l, x, t: zennit_call(m, x, t, "EpsilonGammaBox"),
             lambda m, l, x, t: frozen(zennit_call(m, x, t, "EpsilonPlusBox"), m),
             images=few, models=("vgg16",),
             note="zennit's EpsilonGammaBox (Gamma for convolutions) is timed as `peer`"),
        # issue #17: the methods added from the peers' catalogues
        Case("HiResCAM", "hires_cam", {"layer": layers["cam"]}, "grad-cam HiResCAM", ("fwd+bwd", 1),
             lambda m, l, x, t: gradcam_call("HiResCAM", m, l, x, t)),
        Case("Grad-CAM element-wise", "grad_cam_elementwise", {"layer": layers["cam"]},
             "grad-cam GradCAMElementWise", ("fwd+bwd", 1),
             lambda m, l, x, t: gradcam_call("GradCAMElementWise", m, l, x, t)),
        Case("Eigen-Grad-CAM", "eigen_grad_cam", {"layer": layers["cam"]}, "grad-cam EigenGradCAM",
             ("fwd+bwd", 1),
             lambda m, l, x, t: gradcam_call("EigenGradCAM", m, l, x, t)),
        Case("KPCA-CAM", "kpca_cam", {"layer": layers["cam"]}, "grad-cam KPCA_CAM", ("fwd", 1),
             lambda m, l, x, t: gradcam_call("KPCA_CAM", m, l, x, t)),
        Case("Feature Ablation", "feature_ablation", {"segments": 50}, "captum FeatureAblation", ("fwd", 0),
             lambda m, l, x, t: captum_superpixel_call("FeatureAblation", m, x, t, 50),
             lambda m, l, x, t: captum_superpixel_call("FeatureAblation", m, x, t, 50,
                                                       perturbations_per_eval=16),
             images=few, sampling=True, note="SLIC, 50 superpixels (the same masks given to Captum)"),
        Case("Shapley Value Sampling", "shapley_sampling", {"segments": 25, "samples": 25},
             "captum ShapleyValueSampling", ("fwd", 0),
             lambda m, l, x, t: captum_superpixel_call("ShapleyValueSampling", m, x, t, 25),
             lambda m, l, x, t: captum_superpixel_call("ShapleyValueSampling", m, x, t, 25,
                                                       perturbations_per_eval=16),
             images=few, sampling=True, note="SLIC, 25 superpixels, 25 permutations (Captum's default)"),
        Case("LIME", "lime", {"segments": 50, "samples": 50}, "captum Lime", ("fwd", 0),
             lambda m, l, x, t: captum_superpixel_call("Lime", m, x, t, 50),
             lambda m, l, x, t: captum_superpixel_call("Lime", m, x, t, 50, perturbations_per_eval=16),
             images=few, sampling=True, note="SLIC, 50 superpixels, 50 coalitions (Captum's default)"),
        Case("KernelSHAP", "kernel_shap", {"segments": 50, "samples": 25}, "captum KernelShap", ("fwd", 0),
             lambda m, l, x, t: captum_superpixel_call("KernelShap", m, x, t, 50),
             lambda m, l, x, t: captum_superpixel_call("KernelShap", m, x, t, 50, perturbations_per_eval=16),
             images=few, sampling=True, note="SLIC, 50 superpixels, 25 coalitions (Captum's default)"),
        Case("Gradient SHAP", "gradient_shap", {"samples": 5}, "captum GradientShap", ("fwd+bwd", 5),
             lambda m, l, x, t: captum_call("GradientShap", m, x, t, baselines=gaussian_references(x, 10)),
             lambda m, l, x, t: frozen(captum_call("GradientShap", m, x, t,
                                                   baselines=gaussian_references(x, 10)), m),
             sampling=True, note="5 draws (Captum's default) from 10 N(0, 1) references"),
        Case("DeepLIFT SHAP", "deeplift_shap", {"baselines": 10}, "captum DeepLiftShap", ("fwd+bwd", 20),
             lambda m, l, x, t: captum_call("DeepLiftShap", m, x, t, baselines=gaussian_references(x, 10)),
             lambda m, l, x, t: frozen(captum_call("DeepLiftShap", captum_friendly(m), x, t,
                                                   baselines=gaussian_references(x, 10)), m),
             images=few, sampling=True,
             note="10 N(0, 1) references; peer best: the copy with one ReLU module per use, as DeepLIFT"),
        Case("Blur IG", "blur_ig", {}, "PAIR BlurIG", ("fwd+bwd", 100),
             lambda m, l, x, t: pair_call("BlurIG", m, x, t),
             lambda m, l, x, t: frozen(pair_call("BlurIG", m, x, t, batch_size=16), m),
             images=few, sampling=True, note="PAIR's defaults: 100 steps to sigma 50"),
        Case("XRAI", "xrai", {"steps": 25}, "PAIR XRAI", ("fwd+bwd", 50),
             lambda m, l, x, t: pair_call("XRAI", m, x, t, extra_parameters=_xrai_steps(25)),
             lambda m, l, x, t: frozen(pair_call("XRAI", m, x, t, extra_parameters=_xrai_steps(25),
                                                 batch_size=16), m),
             images=few, sampling=True, note="25 IG steps from each of PAIR's two baselines"),
        Case("FullGrad", "fullgrad", {}, "grad-cam FullGrad", ("fwd+bwd", 1),
             lambda m, l, x, t: gradcam_call("FullGrad", m, l, x, t)),
        Case("Shapley-CAM", "shapley_cam", {"layer": layers["cam"]}, "grad-cam ShapleyCAM", ("fwd+bwd", 1),
             lambda m, l, x, t: gradcam_call("ShapleyCAM", m, l, x, t)),
        Case("Finer-CAM", "finer_cam", {"layer": layers["cam"]}, "grad-cam FinerCAM", ("fwd+bwd", 1),
             lambda m, l, x, t: finer_call(m, l, x, t)),
        Case("Excitation Backprop", "excitation_backprop", {"layer": layers["cam"]},
             "TorchRay excitation_backprop",
             ("fwd+bwd", 1), lambda m, l, x, t: torchray_call("excitation_backprop", m, layers["cam"], x, t)),
        Case("Contrastive EB", "contrastive_excitation_backprop", {"layer": layers["cam"]},
             "TorchRay contrastive_excitation_backprop", ("fwd+bwd", 2),
             lambda m, l, x, t: torchray_call("contrastive_excitation_backprop", m, layers["cam"], x, t)),
        Case("Extremal Perturbations", "extremal_perturbation", {"iterations": 100},
             "TorchRay extremal_perturbation",
             ("fwd+bwd", 99),
             lambda m, l, x, t: torchray_call("extremal_perturbation", m, None, x, t, max_iter=100),
             images=few, sampling=True, note="100 iterations (TorchRay's default is 800), area 0.1"),
        Case("Guided IG", "guided_ig", {}, "PAIR GuidedIG", ("fwd+bwd", 200),
             lambda m, l, x, t: pair_call("GuidedIG", m, x, t),
             lambda m, l, x, t: frozen(pair_call("GuidedIG", m, x, t), m),
             images=few, sampling=True, note="PAIR's defaults: 200 steps; the path is sequential per image"),
    ]
    return [c for c in C if model_name in c.models]


def _occl_kwargs(big: bool) -> dict:
    w, s = (32, 16) if big else (16, 8)
    return {"sliding_window_shapes": (3, w, w), "strides": (3, s, s), "baselines": 0.0}


# ------------------------------------------------------------------------------ running
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["resnet50", "vgg16", "reference"], required=True)
    ap.add_argument("--only", nargs="*", default=None, help="case names (substring match)")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--no-peers", action="store_true", help="ours and the limit only")
    ap.add_argument("--peer-defaults-only", action="store_true",
                    help="the peers at their defaults only (with --allocator default: as users run them)")
    ap.add_argument("--allocator", choices=["tuned", "default"], default="tuned",
                    help="tuned: re-execute with the CLI's glibc tunables; default: glibc's defaults")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="where models and inputs live (cuda: bf16 autocast on CUDA, CUDA memory peaks)")
    args = ap.parse_args(argv)

    if args.allocator == "tuned":
        env = allocator_env(dict(os.environ), sys.platform, platform.libc_ver()[0])
        if env is not None:
            os.execve(sys.executable, [sys.executable, *sys.argv], env)
    elif "GLIBC_TUNABLES" in os.environ:
        env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)

    from attriflow.explainers import get_explainer

    model, x_all, layers = load_model(args.model, args.images)
    global DEVICE
    DEVICE = torch.device(args.device)
    model, x_all = model.to(DEVICE), x_all.to(DEVICE)
    with torch.no_grad():
        t_all = model(x_all).argmax(1)
    layer_module = dict(model.named_modules())[layers["module"]]
    with torch.no_grad():
        from attriflow.explainers._hooks import capture_outputs

        with capture_outputs(model, [layers["cam"]]) as acts:
            model(x_all[:1])
        channels = acts[layers["cam"]].shape[1]

    bf16 = args.precision == "bf16"
    ours_model = copy.deepcopy(model).to(memory_format=torch.channels_last) if bf16 else model

    def autocast() -> contextlib.AbstractContextManager:
        return torch.autocast(DEVICE.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    ac = autocast()
    if bf16:
        ac.channels_last = True  # type: ignore[attr-defined]
    batches = {"resnet50": (1, 8, 16, 32, 64), "vgg16": (1, 8, 16)}.get(args.model, (8, 32, 64, 128, 256, 512))
    limit_reps = 3
    limits = [measure_limit(ours_model, x_all, limit_reps, batches, ac if bf16 else None)]
    print(json.dumps(limits[0]))
    print(f"limit ({args.precision}): fwd {limits[0]['fwd'] * 1e3:.2f} ms/img, "
          f"fwd+bwd {limits[0]['fwd+bwd'] * 1e3:.2f} ms/img", flush=True)

    rows = []
    for case in cases(args.model, layers, channels):
        if args.only and not any(o.lower() in case.name.lower() for o in args.only):
            continue
        if bf16 and not case.sampling:
            continue
        n = min(case.images or args.images, len(x_all))
        x, t = x_all[:n], t_all[:n]
        exp = get_explainer(case.ours)(ours_model, **case.params)
        exp.normalization = None
        seeds = torch.arange(n, dtype=torch.int64)
        xo = x.contiguous(memory_format=torch.channels_last) if bf16 else x

        def ours_fn(exp=exp, xo=xo, t=t, seeds=seeds) -> object:
            with autocast():
                return exp.attribute(xo, t, seeds=seeds)

        contenders: dict[str, Callable[[], object]] = {} if args.peer_defaults_only else {"ours": ours_fn}
        errors: dict[str, str] = {}
        if not args.no_peers:
            makers = [("peer", case.peer_default)]
            if not args.peer_defaults_only:
                makers.append(("peer best", case.peer_best))
            for label, make in makers:
                if make is not None:
                    contenders[label] = make(model, layer_module, x, t)
        if not contenders:
            continue
        # warm-up (lazy initialisation, shapes); a peer that fails is recorded, not timed
        heavy = case.sampling and args.model != "reference"
        for label, fn in list(contenders.items()):
            if heavy and label != "ours":
                continue  # too expensive to run twice; the ours warm-up warms the model
            try:
                fn()
            except Exception as err:  # noqa: BLE001 - the failure is the measurement
                errors[label] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
                contenders.pop(label)
        reps = 1 if heavy else args.reps
        if not contenders:  # every contender failed in the warm-up
            rows.append({"case": case.name, "ours": case.ours, "params": case.params, "peer": case.peer,
                         "images": n, "reps": 0, "sampling": case.sampling, "note": case.note,
                         "passes": list(case.passes), "batch_size": None, "seconds": {}, "peak_mib": {},
                         "errors": errors})
            continue
        times: dict[str, list[float]] = {k: [] for k in contenders}
        mems: dict[str, list[float]] = {k: [] for k in contenders}
        order = list(contenders)
        for r in range(reps):
            for label in order[r % len(order):] + order[: r % len(order)]:
                try:
                    s, mib = timed(contenders[label])
                except Exception as err:  # noqa: BLE001
                    errors[label] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
                    order.remove(label)
                    break
                times[label].append(s / n)
                mems[label].append(mib)
        passes = case.passes
        if "ours" in contenders and exp.last_forward_passes is not None and case.passes[0] == "fwd":  # the method's own count
            passes = ("fwd", float(exp.last_forward_passes.float().mean()))
        row = {
            "case": case.name, "ours": case.ours, "params": case.params, "peer": case.peer,
            "images": n, "reps": reps, "sampling": case.sampling, "note": case.note,
            "passes": list(passes), "batch_size": exp.batch_size,
            "seconds": {k: statistics.median(v) for k, v in times.items() if v},
            "peak_mib": {k: max(v) for k, v in mems.items() if v},
            "errors": errors,
        }
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("case", "seconds", "peak_mib", "errors", "passes")}), flush=True)
    limits.append(measure_limit(ours_model, x_all, limit_reps, batches, ac if bf16 else None))
    limit = {k: (min if "peak" not in k else max)(d[k] for d in limits) for k in limits[0]}
    result = {
        "model": args.model, "precision": args.precision, "images": args.images,
        "input": list(x_all.shape[1:]), "allocator": args.allocator, "peer_defaults_only": args.peer_defaults_only, "channels_at_cam_layer": channels,
        "limit_seconds_per_image": limit, "limit_runs": limits,
        "device": args.device,
        "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else None,
                    "python": platform.python_version(), "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")},
        "versions": _versions(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows,
    }
    suffix = "-peer-defaults-glibc" if args.peer_defaults_only and args.allocator == "default" else ""
    suffix += "-cuda" if DEVICE.type == "cuda" else ""
    out = args.out or OUT_DIR / f"{args.model}-{args.precision}{suffix}{'-' + '_'.join(args.only) if args.only else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    names = ("torch", "torchvision", "captum", "grad-cam", "zennit", "saliency", "torchray", "numpy")
    return {p: version(p) for p in names}


if __name__ == "__main__":
    main()
