"""Model sources beyond the reference CNN: the user's factory, timm, exported programs;
output selection and class names. Tiny models, 32x32 inputs, nothing downloaded."""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import sys

import pytest
import torch
import torchvision
from torch import nn

from attriflow.explainers import REGISTRY, UnsupportedModelError, get_explainer
from attriflow.tasks.config import ModelConfig, OutputConfig
from attriflow.tasks.models import ModelLoadError, build_model, cached_model, check_model_output

NET = '''
import torch
from torch import nn


class Out:
    def __init__(self, logits, features):
        self.logits = logits
        self.features = features


class Net(nn.Module):
    def __init__(self, width, num_classes, mode):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)
        self.mode = mode

    def forward(self, x):
        feats = self.pool(self.relu(self.conv(x))).flatten(1)
        logits = self.fc(feats)
        if self.mode == "tuple":
            return logits, feats
        if self.mode == "dict":
            return {"aux": feats, "logits": logits}
        if self.mode == "object":
            return Out(logits, feats)
        return logits


def build(width=4, num_classes=3, mode="plain"):
    return Net(width, num_classes, mode)
'''

X = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _import(path):
    spec = importlib.util.spec_from_file_location(f"direct_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def net_file(tmp_path, monkeypatch):
    """``net.py`` in a temporary working directory (factory paths are relative to it)."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "net.py"
    path.write_text(NET)
    return path


def _factory(**kw) -> ModelConfig:
    return ModelConfig(factory="net.py:build", **kw)


# ---------------------------------------------------------------- factory
def test_factory_file_builds_with_kwargs_and_seed(net_file) -> None:
    loaded = build_model(_factory(kwargs={"width": 5, "num_classes": 4}, init_seed=2))
    torch.manual_seed(2)
    direct = _import(net_file).build(width=5, num_classes=4).eval()
    assert torch.equal(loaded.module(X), direct(X))
    assert not loaded.module.training and not any(p.requires_grad for p in loaded.module.parameters())
    assert loaded.mean == (0.485, 0.456, 0.406) and loaded.input_size is None and loaded.opaque is None
    assert check_model_output(loaded, X[:1]) == 4


def test_factory_with_weights(net_file, tmp_path) -> None:
    torch.manual_seed(7)
    trained = _import(net_file).build().eval()
    torch.save(trained.state_dict(), tmp_path / "w.pth")
    loaded = build_model(_factory(weights=str(tmp_path / "w.pth")))
    assert torch.equal(loaded.module(X), trained(X))


def test_factory_digest_follows_the_code(net_file) -> None:
    first = build_model(_factory()).digest
    assert build_model(_factory()).digest == first  # unchanged reload
    assert build_model(_factory(kwargs={"width": 4})).digest != first  # kwargs are part of it
    net_file.write_text(NET + "# a comment\n")
    assert build_model(_factory()).digest != first


def test_editing_a_helper_the_factory_imports_changes_the_model_and_digest(tmp_path, monkeypatch) -> None:
    """The factory file imports ``act`` from a helper in its folder: editing only the helper
    must change the digest and the model (re-imported), in this very process."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lab").mkdir()
    (tmp_path / "lab" / "helper_act_mod.py").write_text("import torch\ndef act(x):\n    return torch.relu(x)\n")
    (tmp_path / "lab" / "model.py").write_text(
        "from torch import nn\nfrom helper_act_mod import act\n\n"
        "class M(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.fc = nn.Linear(3, 2)\n\n    def forward(self, x):\n        return self.fc(act(x.mean(dim=(2, 3))))\n\n"
        "def build():\n    return M()\n")
    cfg = ModelConfig(factory="lab/model.py:build")
    x = -torch.rand(2, 3, 4, 4)  # all negative: relu gives zeros, tanh does not
    first = cached_model(cfg.model_dump_json())
    assert cached_model(cfg.model_dump_json()).digest == first.digest
    (tmp_path / "lab" / "helper_act_mod.py").write_text(
        "import torch\ndef act(x):\n    return torch.tanh(x) * 3  # edited\n")
    second = cached_model(cfg.model_dump_json())
    assert second.digest != first.digest
    assert not torch.allclose(second.module(x), first.module(x))


def test_factory_from_an_installed_module() -> None:
    loaded = build_model(ModelConfig(factory="torchvision.models:resnet18", kwargs={"num_classes": 4}))
    assert isinstance(loaded.module, torchvision.models.ResNet)
    assert loaded.module.fc.out_features == 4


@pytest.mark.parametrize(
    ("spec", "source", "match"),
    [
        ("missing.py:build", None, r"model.factory: file 'missing.py' not found"),
        ("net.py:buidl", NET, r"model.factory: 'net.py' has no attribute 'buidl'; it defines: .*build"),
        ("net.py:build", "def build():\n    return 3\n",
         r"model.factory: build .*returned builtins.int, not a torch.nn.Module"),
        ("net.py:build", "import torch\n\n1 / 0\n", r"model.factory: importing 'net.py' failed \(line 3\): "
                                                    r"ZeroDivisionError: division by zero"),
        ("no_such_package_xyz.nets:build", None, r"model.factory: cannot import module 'no_such_package_xyz"
                                                 r".nets' \(ModuleNotFoundError"),
    ],
)
def test_factory_errors_name_the_field_and_file(tmp_path, monkeypatch, spec, source, match) -> None:
    monkeypatch.chdir(tmp_path)
    if source is not None:
        (tmp_path / "net.py").write_text(source)
    with pytest.raises(ModelLoadError, match=match):
        build_model(ModelConfig(factory=spec))


# ---------------------------------------------------------------- timm
@pytest.fixture(scope="module")
def timm():
    return pytest.importorskip("timm")


def test_timm_model_takes_its_pretrained_cfg(timm, tmp_path) -> None:
    loaded = build_model(ModelConfig(arch="timm:test_resnet", random_init=True, num_classes=5))
    cfg = timm.create_model("test_resnet", pretrained=False).pretrained_cfg
    assert loaded.mean == tuple(cfg["mean"]) and loaded.std == tuple(cfg["std"])
    assert loaded.input_size == tuple(cfg["input_size"][1:])
    assert loaded.crop_pct == cfg["crop_pct"] and loaded.interpolation == cfg["interpolation"]
    assert check_model_output(loaded, X[:1]) == 5
    torch.save(loaded.module.state_dict(), tmp_path / "t.pth")
    again = build_model(ModelConfig(arch="timm:test_resnet", weights=str(tmp_path / "t.pth"), num_classes=5))
    assert again.digest == loaded.digest and torch.equal(again.module(X), loaded.module(X))
    mine = build_model(ModelConfig(arch="timm:test_resnet", random_init=True, mean=(0.1, 0.2, 0.3)))
    assert mine.mean == (0.1, 0.2, 0.3) and mine.std == tuple(cfg["std"])


def test_timm_unknown_name_suggests(timm) -> None:
    with pytest.raises(ModelLoadError, match=r"model.arch: timm has no model 'test_resnt'; did you mean "
                                             r"'timm:test_resnet'"):
        build_model(ModelConfig(arch="timm:test_resnt", random_init=True))


def test_missing_timm_says_how_to_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ModelLoadError, match=r"'timm:resnet18' needs timm: pip install 'attriflow\[timm\]'"):
        build_model(ModelConfig(arch="timm:resnet18", random_init=True))


def test_torchvision_input_metadata() -> None:
    loaded = build_model(ModelConfig(arch="resnet18", random_init=True, num_classes=3))
    assert (loaded.input_size, loaded.crop_pct, loaded.interpolation) == ((224, 224), 0.875, "bilinear")


# ---------------------------------------------------------------- exported programs
def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    """(original module, dynamic-batch program path, static-batch program path)."""
    net, folder = _cnn(), tmp_path_factory.mktemp("programs")
    dynamic, static = folder / "dynamic.pt2", folder / "static.pt2"
    batch = torch.export.Dim("batch")
    torch.export.save(torch.export.export(net, (X,), dynamic_shapes=({0: batch},)), dynamic)
    torch.export.save(torch.export.export(net, (X[:1],)), static)
    return net, dynamic, static


def test_program_runs_like_the_module(programs) -> None:
    net, dynamic, _ = programs
    loaded = build_model(ModelConfig(program=str(dynamic)))
    program = loaded.module
    program.eval()
    program.train()
    program.eval()  # the graph itself refuses train()/eval(); the wrapper does not
    x3 = torch.rand(3, 3, 32, 32)
    assert torch.allclose(program(x3), net(x3), atol=1e-6)
    grads = []
    for m in (program, net):
        x = x3.clone().requires_grad_(True)
        m(x)[:, 1].sum().backward()
        grads.append(x.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    assert loaded.digest == hashlib.sha256(dynamic.read_bytes()).hexdigest()
    assert loaded.opaque and loaded.mean == (0.485, 0.456, 0.406)
    assert check_model_output(loaded, X[:1]) == 3
    assert torch.allclose(copy.deepcopy(program)(x3), net(x3), atol=1e-6)


def test_static_batch_program_says_how_to_export(programs) -> None:
    loaded = build_model(ModelConfig(program=str(programs[2])))
    with pytest.raises(ModelLoadError, match=r"model.program: .*batches of exactly 1 .*"
                                             r"dynamic_shapes=\(\{0: torch.export.Dim\('batch'\)\},\)"):
        check_model_output(loaded, X[:1])


def test_program_with_a_fixed_image_size_gives_it(programs) -> None:
    loaded = build_model(ModelConfig(program=str(programs[1])))
    assert loaded.input_size == (32, 32)
    with pytest.raises(ModelLoadError, match=r"model.program: the program was exported for inputs of shape "
                                             r"\(3, 32, 32\), the run's are \(3, 16, 16\); set data.image_size"):
        check_model_output(loaded, torch.rand(1, 3, 16, 16))


def test_program_file_errors(tmp_path) -> None:
    with pytest.raises(ModelLoadError, match="model.program: file .*nope.pt2' not found"):
        build_model(ModelConfig(program=str(tmp_path / "nope.pt2")))
    (tmp_path / "bad.pt2").write_bytes(b"not a program")
    with pytest.raises(ModelLoadError, match="model.program: .*bad.pt2' is not a loadable torch.export"):
        build_model(ModelConfig(program=str(tmp_path / "bad.pt2")))


def test_explainers_on_a_program(programs) -> None:
    net, dynamic, _ = programs
    program = build_model(ModelConfig(program=str(dynamic))).module
    working = sorted(n for n, c in REGISTRY.items() if not c.spec.needs_internals)
    assert {"saliency", "integrated_gradients", "smooth_grad", "occlusion", "rise"} <= set(working)
    with pytest.raises(UnsupportedModelError, match=r"grad_cam needs the model's layers .*exported program.* "
                                                    r"work: " + ", ".join(working)):
        get_explainer("grad_cam")(program).check(X[:1])
    with pytest.raises(UnsupportedModelError, match=r"smooth_grad \(through guided_backprop\)"):
        get_explainer("smooth_grad")(program, base="guided_backprop").check(X[:1])
    targets = torch.tensor([0, 2])
    got = get_explainer("saliency")(program).attribute(X, targets)
    want = get_explainer("saliency")(net).attribute(X, targets)
    assert torch.allclose(got, want, atol=1e-6)


# ---------------------------------------------------------------- output selection
@pytest.mark.parametrize(
    ("mode", "output"),
    [("tuple", OutputConfig(index=0)), ("dict", OutputConfig(key="logits")),
     ("object", OutputConfig(attribute="logits"))],
)
def test_output_selection(net_file, mode, output) -> None:
    plain = build_model(_factory())
    loaded = build_model(_factory(kwargs={"mode": mode}, output=output))
    assert torch.equal(loaded.module(X), plain.module(X))
    assert check_model_output(loaded, X[:1]) == 3
    assert [n for n, _ in loaded.module.named_modules()] == [n for n, _ in plain.module.named_modules()]
    assert torch.equal(copy.deepcopy(loaded.module)(X), plain.module(X))


@pytest.mark.parametrize(
    ("mode", "shown", "setting"),
    [("tuple", r"tuple\(Tensor\(2, 3\) float32, Tensor\(2, 4\) float32\)", r"\{index: 0\}"),
     ("dict", r"dict\(aux=Tensor\(2, 4\) float32, logits=Tensor\(2, 3\) float32\)",
      r"\{key: aux\} or \{key: logits\}"),
     ("object", r"Out\(logits=Tensor\(2, 3\) float32, features=Tensor\(2, 4\) float32\)",
      r"\{attribute: logits\} or \{attribute: features\}")],
)
def test_unselected_output_shows_structure_and_setting(net_file, mode, shown, setting) -> None:
    loaded = build_model(_factory(kwargs={"mode": mode}))
    with pytest.raises(ModelLoadError, match=rf"model.output: .*returns {shown}: set model.output: "
                                             rf"{setting}"):
        check_model_output(loaded, X[:1])


def test_wrong_selection_fails_clearly(net_file) -> None:
    loaded = build_model(_factory(kwargs={"mode": "tuple"}, output=OutputConfig(index=5)))
    with pytest.raises(ModelLoadError, match=r"model.output: \{index: 5\} does not fit the model's "
                                             r"output tuple\(Tensor\(2, 3\) float32, .*"
                                             r"set model.output: \{index: 0\}"):
        check_model_output(loaded, X[:1])


# ---------------------------------------------------------------- class names
def test_classes_from_list_file_and_imagenet(net_file, tmp_path) -> None:
    assert build_model(_factory(classes=["a", "b", "c"])).classes == ("a", "b", "c")
    (tmp_path / "names.txt").write_text("cat\ndog\n\nbird\n")
    loaded = build_model(_factory(classes="names.txt"))
    assert loaded.classes == ("cat", "dog", "bird") and check_model_output(loaded, X[:1]) == 3
    imagenet = build_model(ModelConfig(arch="resnet18", random_init=True, classes="imagenet"))
    assert len(imagenet.classes) == 1000 and check_model_output(imagenet, X[:1]) == 1000
    with pytest.raises(ModelLoadError, match="model.classes: cannot read class-name file 'nope.txt'"):
        build_model(_factory(classes="nope.txt"))


def test_classes_must_match_the_outputs(net_file) -> None:
    loaded = build_model(_factory(classes=["a", "b"]))
    with pytest.raises(ModelLoadError, match="model.classes: 2 names for a model with 3 outputs"):
        check_model_output(loaded, X[:1])
