"""Properties every registered explainer must have; a new method is tested without new code."""

from __future__ import annotations

import pkgutil

import pytest
import torch

import attriflow.explainers.methods
from attriflow.explainers import REGISTRY, Explainer, ExplainerParamError, get_explainer

NAMES = sorted(REGISTRY)


#: Smaller settings where a method's default budget is only slow, not different in kind.
FAST = {"neuromask": {"iterations": 40}, "rise": {"masks": 500},
        # TorchRay's step 7 / sigma 21 empty the mask of a 12-pixel image in one step
        "extremal_perturbation": {"iterations": 10, "step": 1, "sigma": 3.0},
        # on these noise images SLIC finds one superpixel (and warns): a grid gives nine
        **{n: {"segmentation": "grid", "segments": 9} for n in ("feature_ablation", "shapley_sampling")},
        "kernel_shap": {"segmentation": "grid", "segments": 9, "samples": 200},
        "lime": {"segmentation": "grid", "segments": 9, "samples": 200, "alpha": 1e-4},
        "xrai": {"steps": 4}}


def _make(name: str, model: torch.nn.Module) -> Explainer:
    return get_explainer(name)(model, **FAST.get(name, {}))


def test_registry_is_complete() -> None:
    modules = {m.name for m in pkgutil.iter_modules(attriflow.explainers.methods.__path__)}
    assert modules == set(REGISTRY), "a method module is not imported in explainers/methods/__init__.py"
    for name, cls in REGISTRY.items():
        assert cls.spec.name == name


@pytest.mark.parametrize("name", NAMES)
def test_shape_dtype_finite(name, tiny_cnn, tiny_inputs) -> None:
    x, t = tiny_inputs
    out = _make(name, tiny_cnn).attribute(x, t)
    assert out.shape == (5, 12, 12)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert out.abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_batch_size_and_per_sample_invariance(name, tiny_cnn, tiny_inputs) -> None:
    x, t = tiny_inputs
    exp = _make(name, tiny_cnn)
    seeds = torch.arange(5) * 7 + 3
    full = exp.attribute(x, t, seeds=seeds)
    chunked = exp.attribute(x, t, batch_size=2, seeds=seeds)
    single = torch.cat([exp.attribute(x[i : i + 1], t[i : i + 1], seeds=seeds[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(single, full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_deterministic(name, tiny_cnn, tiny_inputs) -> None:
    x, t = tiny_inputs
    exp = _make(name, tiny_cnn)
    seeds = torch.arange(5)
    assert torch.equal(exp.attribute(x, t, seeds=seeds), exp.attribute(x, t, seeds=seeds))


@pytest.mark.parametrize("name", NAMES)
def test_no_side_effects(name, tiny_cnn, tiny_inputs) -> None:
    x, t = tiny_inputs
    x_before = x.clone()
    params_before = {k: v.clone() for k, v in tiny_cnn.state_dict().items()}
    tiny_cnn.train()
    flags = [p.requires_grad for p in tiny_cnn.parameters()]
    _make(name, tiny_cnn).attribute(x, t, batch_size=3)
    assert torch.equal(x, x_before)
    for k, v in tiny_cnn.state_dict().items():
        assert torch.equal(v, params_before[k]), k
    assert tiny_cnn.training, "training mode must be restored"
    assert [p.requires_grad for p in tiny_cnn.parameters()] == flags
    for m in tiny_cnn.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
    assert all(p.grad is None for p in tiny_cnn.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_hooks_removed_after_exception(name, tiny_cnn, tiny_inputs) -> None:
    x, t = tiny_inputs

    def explode(*_args):
        raise RuntimeError("boom")

    handle = tiny_cnn.fc.register_forward_hook(explode)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            _make(name, tiny_cnn).attribute(x, t)
    finally:
        handle.remove()
    for m in tiny_cnn.modules():
        assert not m._forward_hooks and not m._backward_hooks
    assert all(p.requires_grad for p in tiny_cnn.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_unknown_param_is_named(name, tiny_cnn) -> None:
    with pytest.raises(ExplainerParamError, match=rf"{name}.*no_such_param"):
        get_explainer(name)(tiny_cnn, no_such_param=1)


@pytest.mark.parametrize("name", NAMES)
def test_params_are_json_and_digest_tracks_them(name, tiny_cnn) -> None:
    exp = _make(name, tiny_cnn)
    params = exp.params()
    assert isinstance(params, dict)
    assert exp.digest() == _make(name, tiny_cnn).digest()
    assert len(exp.digest()) == 64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", NAMES)
def test_cuda_matches_cpu(name, tiny_cnn, tiny_inputs) -> None:
    x, t = tiny_inputs
    cpu = _make(name, tiny_cnn).attribute(x, t)
    gpu = _make(name, tiny_cnn.cuda()).attribute(x.cuda(), t.cuda())
    assert gpu.is_cuda
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-5)
