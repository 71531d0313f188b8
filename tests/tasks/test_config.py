"""A bad config fails before any work, naming the bad field."""

from __future__ import annotations

import pytest

from attriflow.tasks.config import ConfigError, RunConfig, load_config, parse_config


def test_defaults_are_the_embedded_run() -> None:
    cfg = load_config(None)
    assert cfg.data.kind == "embedded" and cfg.data.n_samples >= 256
    assert cfg.model.arch == "reference"
    from attriflow.explainers import Family, get_explainer

    # every family of the white-box catalogue; mask optimisation (NeuroMask, thousands of
    # backward passes per image) does not fit the 5-minute default run on 2 CPU cores
    families = {get_explainer(e.method).spec.family for e in cfg.explain.explainers}
    assert families == {Family.GRADIENT, Family.RELEVANCE, Family.CAM, Family.PERTURBATION}
    assert cfg.digest() == RunConfig().digest()


@pytest.mark.parametrize(
    ("raw", "field", "why"),
    [
        ({"shard_sise": 8}, "shard_sise", "Extra inputs"),
        ({"shard_size": 0}, "shard_size", "greater than or equal to 1"),
        ({"data": {"n_samples": -3}}, "data.n_samples", "greater than or equal to 1"),
        ({"data": {"kind": "imagenet"}}, "data.kind", "embedded"),
        ({"data": {"kind": "imagefolder"}}, "data", "data.root is required"),
        ({"explain": {"batch_size": "many"}}, "explain.batch_size", "integer"),
        ({"explain": {"explainers": [{"method": "gradcam"}]}}, "explain.explainers.0.method", "unknown explainer 'gradcam'; registered: "),
        ({"explain": {"explainers": [{"method": "grad_cam", "params": {"layr": "x"}}]}},
         "explain.explainers.0", "'grad_cam': layr"),
        ({"explain": {"explainers": [{"method": "saliency", "params": {"reduce": "mean"}}]}},
         "explain.explainers.0", "reduce"),
        ({"explain": {"explainers": [{"method": "saliency"}, {"method": "saliency"}]}},
         "explain.explainers", "repeated: saliency"),
        ({"evaluate": {"steps": 0}}, "evaluate.steps", "greater than or equal to 1"),
        # an unknown architecture is said before the weights it would also need
        ({"model": {"arch": "resnet99"}}, "model.arch", "unknown architecture 'resnet99'"),
    ],
)
def test_bad_field_is_named(raw, field, why) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(raw, "test.yaml")
    msg = str(err.value)
    assert msg.startswith(f"invalid config test.yaml: {field}"), msg  # one bad field: one line, naming it
    assert why in msg and "\n" not in msg, msg


def test_yaml_file_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("explain: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(listed)
    unsafe = tmp_path / "unsafe.yaml"
    unsafe.write_text("name: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(unsafe)


def test_labels_allow_one_method_twice() -> None:
    cfg = parse_config({"explain": {"explainers": [
        {"method": "grad_cam", "label": "cam3", "params": {"layer": "block3"}},
        {"method": "grad_cam", "label": "cam4"},
    ]}})
    assert [e.name for e in cfg.explain.explainers] == ["cam3", "cam4"]


def test_shipped_example_configs_parse() -> None:
    from pathlib import Path

    configs = Path(__file__).resolve().parents[2] / "configs"
    assert load_config(configs / "default.yaml") == RunConfig()
    example = load_config(configs / "imagefolder-resnet50.yaml")
    assert example.model.arch == "resnet50" and example.data.kind == "imagefolder"
    for name in sorted(p.name for p in configs.glob("*.yaml")):
        load_config(configs / name)  # every example validates as written


def test_a_label_cannot_look_like_a_store_entry() -> None:
    with pytest.raises(ConfigError, match="'@' is reserved"):
        parse_config({"explain": {"explainers": [{"method": "saliency", "label": "saliency@dea860bc"}]}})


@pytest.mark.parametrize(("section", "expected"), [
    ({"explain": {"explainers": [{"method": "lime", "params": {"baseline": float("nan")}}]}},
     r"explainer 'lime': baseline: must be a finite number, got nan"),
    # was silently run with the default gamma: the JSON form of the config turned inf into null
    ({"explain": {"explainers": [{"method": "kpca_cam", "params": {"gamma": float("inf")}}]}},
     r"explainer 'kpca_cam': gamma: must be a finite number, got inf"),
    ({"evaluate": {"blur_sigma": float("inf")}}, r"evaluate.blur_sigma: Input should be a finite number"),
])
def test_nan_and_infinity_are_refused_naming_the_field(section, expected) -> None:
    with pytest.raises(ConfigError, match=expected):
        parse_config(section)
