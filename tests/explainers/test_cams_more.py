"""FullGrad, Shapley-CAM and Finer-CAM: equal to pytorch-grad-cam 1.5.7 on the reference CNN,
ResNet-18 and VGG-11 (float64), and their refusals."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attriflow.explainers import ExplainerParamError, UnsupportedModelError, get_explainer
from tests.explainers import test_reference as _ref

models64 = _ref.models64  # the reference CNN, ResNet-18 and VGG-11 in float64, with inputs
CAM_LAYERS, postprocess = _ref.CAM_LAYERS, _ref._gradcam_postprocess


def _minmax(m: torch.Tensor) -> torch.Tensor:  # pytorch-grad-cam's scale_cam_image, no resize
    flat = m.flatten(1)
    lo, hi = flat.min(1).values[:, None, None], flat.max(1).values[:, None, None]
    return (m - lo) / (1e-7 + hi - lo)


def _targets(t: torch.Tensor, kind: str = "logit") -> list[Any]:
    from pytorch_grad_cam.utils.model_targets import (
        ClassifierOutputReST,
        ClassifierOutputSoftmaxTarget,
        ClassifierOutputTarget,
    )

    cls = {"logit": ClassifierOutputTarget, "prob": ClassifierOutputSoftmaxTarget,
           "rest": ClassifierOutputReST}
    return [cls[kind](int(c)) for c in t]


def _fullgrad_peer(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> np.ndarray:
    from pytorch_grad_cam import FullGrad as RefFullGrad

    with RefFullGrad(model=model, target_layers=[]) as cam:
        return cam(input_tensor=x.clone(), targets=_targets(t))


# ----------------------------------------------------------------------------- FullGrad


@pytest.mark.parametrize("which", ["resnet18", "vgg11"])
def test_fullgrad_equals_pytorch_grad_cam(which, models64) -> None:
    """Input-gradient map plus every conv / batch-norm bias-gradient map (BN: its effective
    bias), each channel min-max scaled; pytorch-grad-cam min-max scales the sum once more.
    ResNet-18: batch norms after bias-free convs, a downsample branch; VGG-11: conv biases."""
    model, x, t = models64[which]
    if which != "reference":
        x, t = x[:2], t[:2]
    ours = get_explainer("fullgrad")(model).attribute(x, t, batch_size=1).double()
    np.testing.assert_allclose(_minmax(ours).numpy(), _fullgrad_peer(model, x, t), atol=2e-5)


class _Shared(nn.Module):
    """conv1 -> BN(affine or not) -> ReLU -> conv2 -> ReLU -> conv2 again (``shared``) or a
    copy of it, -> GAP -> linear."""

    def __init__(self, shared: bool, affine: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4, affine=affine)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv3 = self.conv2 if shared else nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.bn(self.conv1(x)))))
        return self.fc(F.relu(self.conv3(x)).mean(dim=(2, 3)))


def test_fullgrad_counts_every_call_and_a_non_affine_batch_norm() -> None:
    """Our two deviations, on the nets pytorch-grad-cam can run: a conv called twice counts
    each call (= two convs with the same weights), and a BatchNorm2d without affine
    parameters its shift -mean / std (= an affine one with weight 1 and bias 0)."""
    torch.manual_seed(0)
    shared = _Shared(shared=True, affine=False).double().eval()
    with torch.no_grad():
        shared.bn.running_mean.uniform_(-1, 1)
        shared.bn.running_var.uniform_(0.5, 2)
    plain = _Shared(shared=False, affine=True).double().eval()
    state = {k: v for k, v in shared.state_dict().items() if not k.startswith("conv3")}
    plain.load_state_dict({**state, **{k.replace("conv2", "conv3"): v for k, v in state.items()
                                       if k.startswith("conv2")},
                           "bn.weight": torch.ones(4, dtype=torch.float64),
                           "bn.bias": torch.zeros(4, dtype=torch.float64)})
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64), torch.tensor([0, 2])
    ours = get_explainer("fullgrad")(shared).attribute(x, t).double()
    torch.testing.assert_close(ours, get_explainer("fullgrad")(plain).attribute(x, t).double())
    np.testing.assert_allclose(_minmax(ours).numpy(), _fullgrad_peer(plain, x, t), atol=2e-5)


class _Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3, 3, 3))
        self.bias = nn.Parameter(torch.randn(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, padding=1)


class _Offset(nn.Module):
    def __init__(self, number: bool = False) -> None:
        super().__init__()
        self.offset = 0.5 if number else nn.Parameter(torch.randn(1, 4, 8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.offset


def _head(*body: nn.Module) -> nn.Module:
    return nn.Sequential(*body, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()


@pytest.mark.parametrize(("make", "words"), [
    (lambda: _head(nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4)), ("group_norm", "1")),
    (lambda: _head(nn.Conv2d(3, 4, 3, padding=1), nn.InstanceNorm2d(4, affine=True)), ("instance_norm", "1")),
    (lambda: _head(_Functional()), ("conv2d", "0", "applies a bias")),
    (lambda: _head(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, track_running_stats=False)),
     ("batch statistics", "batch_norm", "1")),
    (lambda: _head(nn.Conv2d(3, 4, 3, padding=1), _Offset()), ("constant", "add", "1")),
    (lambda: _head(nn.Conv2d(3, 4, 3, padding=1), _Offset(number=True)), ("constant", "add", "1")),
])
def test_fullgrad_refuses_a_bias_it_cannot_count(make, words) -> None:
    torch.manual_seed(0)
    model = make()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([0, 1])
    with pytest.raises(UnsupportedModelError) as err:
        get_explainer("fullgrad")(model).check(x[:1])  # before any work
    msg = str(err.value)
    assert all(w in msg for w in words), msg
    assert "pytorch-grad-cam" in msg
    # the plain conv + batch norm version of the same net is accepted
    ok = _head(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))
    assert get_explainer("fullgrad")(ok).attribute(x, t).abs().amax() > 0


# ----------------------------------------------------------------------------- Shapley-CAM


def _gradcam_peer(ref_name: str, model, layer: str, x, targets, **call: Any) -> np.ndarray:
    import pytorch_grad_cam

    module = dict(model.named_modules())[layer]
    with getattr(pytorch_grad_cam, ref_name)(model=model, target_layers=[module]) as cam:
        return cam(x.clone().requires_grad_(), targets, **call)


@pytest.mark.parametrize(("which", "score"), [("reference", "logit"), ("reference", "prob"),
                                             ("reference", "rest"), ("vgg11", "prob")])
def test_shapley_cam_equals_pytorch_grad_cam(which, score, models64) -> None:
    """weights = mean(grads - 0.5 * H @ A); pytorch-grad-cam's targets for each score (two
    images on the torchvision nets: its double backward runs through the whole net)."""
    model, x, t = models64[which]
    if which != "reference":
        x, t = x[:2], t[:2]
    layer = CAM_LAYERS[which]
    exp = get_explainer("shapley_cam")(model, layer=layer, score=score)
    low = exp.layer_map(x, t)
    ref = _gradcam_peer("ShapleyCAM", model, layer, x, _targets(t, score))
    np.testing.assert_allclose(postprocess(low, tuple(x.shape[-2:])).numpy(), ref, atol=2e-5)
    full = exp.attribute(x, t)
    torch.testing.assert_close(full, F.interpolate(low[:, None], size=x.shape[-2:], mode="bilinear",
                                                   align_corners=False)[:, 0].float())
    # on these ReLU nets the Hessian of the logit is 0: Shapley-CAM is Grad-CAM there (not
    # with a softmax-type score: the test sees the second-order term)
    gc = get_explainer("grad_cam")(model, layer=layer).layer_map(x, t)
    diff = float((low - gc).abs().max() / gc.abs().max())
    assert diff == 0.0 if score == "logit" else diff > 1e-4, diff


def _silu_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.SiLU(), nn.Conv2d(6, 8, 3, padding=1), nn.SiLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 4)).double().eval()


def test_shapley_cam_hessian_of_a_smooth_net_equals_pytorch_grad_cam() -> None:
    """With SiLU / GELU after the layer the logit's Hessian is not 0 (the map is not Grad-CAM)."""
    model = _silu_net()
    g = torch.Generator().manual_seed(4)
    x, t = torch.randn(3, 3, 10, 10, generator=g, dtype=torch.float64), torch.tensor([0, 3, 1])
    exp = get_explainer("shapley_cam")(model, layer="1")
    low = exp.layer_map(x, t)
    ref = _gradcam_peer("ShapleyCAM", model, "1", x, _targets(t))
    np.testing.assert_allclose(postprocess(low, tuple(x.shape[-2:])).numpy(), ref, atol=2e-5)
    gc = get_explainer("grad_cam")(model, layer="1").layer_map(x, t)
    assert float((low - gc).abs().max() / gc.abs().max()) > 1e-3
    acts, grads = exp.activations(x, t)  # weighted() is the per-channel map combine() sums
    assert exp.weighted(x, t, acts, grads).shape == acts.shape
    torch.testing.assert_close(exp.weighted(x, t, acts, grads).sum(1), exp.combine(x, t, acts, grads))
    assert exp.cost() == {"forward": 1, "backward": 2}


class _Once(torch.autograd.Function):
    """x * sigmoid(x) whose backward cannot be differentiated again."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x * torch.sigmoid(x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        return grad * (s + x * s * (1 - s))


class _OnceAct(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Once.apply(x)


def test_shapley_cam_refuses_a_backward_it_cannot_differentiate() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), _OnceAct(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3)).eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(UnsupportedModelError, match=r"double backward.*'0'|'0'.*double backward"):
        get_explainer("shapley_cam")(model, layer="0").check(x[:1])


# ----------------------------------------------------------------------------- Finer-CAM


@pytest.mark.parametrize(("which", "alpha", "ranks"), [
    ("reference", 1.0, (1, 2, 3)), ("reference", 0.6, (1, 3)), ("resnet18", 1.0, (1, 2, 3)),
    ("vgg11", 0.6, (1, 3))])
def test_finer_cam_equals_pytorch_grad_cam(which, alpha, ranks, models64) -> None:
    """Grad-CAM of sum_k p_k (z_t - alpha z_k) / sum_k p_k over the classes of logits closest
    to z_t; pytorch-grad-cam's FinerCAM with ``target_idx`` = each image's target."""
    model, x, t = models64[which]
    layer = CAM_LAYERS[which]
    exp = get_explainer("finer_cam")(model, layer=layer, alpha=alpha, comparison_categories=ranks)
    low = exp.layer_map(x, t)
    ref = np.concatenate([_gradcam_peer("FinerCAM", model, layer, x[i : i + 1], None, alpha=alpha,
                                        comparison_categories=list(ranks), target_idx=int(t[i]))
                          for i in range(len(x))])
    # pytorch-grad-cam divides by sum_k p_k + 1e-9, we by sum_k p_k (the docstring): a
    # relative difference of 1e-9 / sum_k p_k (2e-5 for the trained reference CNN)
    mass = min(float(_compared(z, int(c), ranks)[1]) for z, c in zip(model(x).detach(), t))
    np.testing.assert_allclose(postprocess(low, tuple(x.shape[-2:])).numpy(), ref, atol=2e-5 + 2e-9 / mass)
    # the comparison changes the map: it is not Grad-CAM of the target
    gc = get_explainer("grad_cam")(model, layer=layer).layer_map(x, t)
    assert float((low - gc).abs().max() / gc.abs().max()) > 1e-3


def _compared(z: torch.Tensor, target: int, ranks: tuple[int, ...]) -> tuple[list[int], torch.Tensor]:
    """pytorch-grad-cam's comparison classes (argsort of |z - z_t|) and their softmax mass."""
    order = np.argsort(np.abs(z.numpy() - z[target].item()))
    classes = [int(order[r]) for r in ranks]
    return classes, torch.softmax(z, dim=0)[classes].sum()


def test_finer_cam_where_the_softmax_saturates() -> None:
    """Logits 1e4 times larger: the compared classes' float32 probabilities are 0 and
    pytorch-grad-cam's FinerCAM map is all zero (its 1e-9 guard); ours is the Grad-CAM of the
    weighted mean of differences, = pytorch-grad-cam's GradCAM with that target."""
    model = _silu_net().float()
    with torch.no_grad():
        model[-1].weight.mul_(1e4)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 10, 10, generator=g)
    t = model(x).argmax(1)
    ranks = (1, 2)
    assert max(float(_compared(z, int(c), ranks)[1]) for z, c in zip(model(x).detach(), t)) < 1e-9
    peer = _gradcam_peer("FinerCAM", model, "1", x[:1], None, comparison_categories=list(ranks),
                         target_idx=int(t[0]))
    assert np.abs(peer).max() == 0.0
    exp = get_explainer("finer_cam")(model, layer="1", comparison_categories=ranks)
    low = exp.layer_map(x, t)
    assert (low.abs().flatten(1).amax(1) > 0).all()

    def weighted_mean(target: int, classes: list[int]) -> Any:
        def score(out: torch.Tensor) -> torch.Tensor:
            w = torch.softmax(out[classes], dim=0)
            return (w * (out[target] - out[classes])).sum()
        return score

    targets = [weighted_mean(int(c), _compared(z, int(c), ranks)[0]) for z, c in zip(model(x).detach(), t)]
    ref = _gradcam_peer("GradCAM", model, "1", x, targets)
    np.testing.assert_allclose(postprocess(low.double(), tuple(x.shape[-2:])).numpy(), ref, atol=2e-5)


def test_finer_cam_refusals_and_params(tiny_cnn, tiny_inputs) -> None:
    x, _ = tiny_inputs
    one = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 1)).double().eval()
    with pytest.raises(UnsupportedModelError, match="single output"):
        get_explainer("finer_cam")(one, layer="1").check(x[:1])
    with pytest.raises(UnsupportedModelError, match="comparison_categories"):  # tiny_cnn has 3 classes
        get_explainer("finer_cam")(tiny_cnn, comparison_categories=(3, 4)).check(x[:1])
    for bad in ({"comparison_categories": ()}, {"comparison_categories": (0, 1)}, {"alpha": float("nan")}):
        with pytest.raises(ExplainerParamError):
            get_explainer("finer_cam")(tiny_cnn, **bad)
    # ranks past the classes are dropped, as in pytorch-grad-cam: (1, 2, 3) on 3 classes is (1, 2)
    t = torch.tensor([0, 1, 2, 1, 0])
    a = get_explainer("finer_cam")(tiny_cnn).attribute(x, t)
    b = get_explainer("finer_cam")(tiny_cnn, comparison_categories=(1, 2)).attribute(x, t)
    torch.testing.assert_close(a, b)


def test_finer_cam_warns_of_ranks_beyond_the_classes(tiny_cnn, tiny_inputs) -> None:
    x, t = tiny_inputs
    classes = int(tiny_cnn(x[:1]).shape[1])
    with pytest.warns(UserWarning, match=rf"\[{classes + 5}\] are beyond"):
        get_explainer("finer_cam")(tiny_cnn, comparison_categories=(1, classes + 5)).check(x[:1])
