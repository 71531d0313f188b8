"""Config fuzzing: random YAML documents never escape as a traceback; they validate or fail
with a ConfigError that names a field (the CLI prints it and exits 2)."""

from __future__ import annotations

import json

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attriflow.tasks.config import ConfigError, RunConfig, load_config, parse_config

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["cuda", "saliency", "grad_cam", "block4", "dask",
                                                           "imagefolder", "-1", "1e400", "nan"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=12)
DEFAULT = json.loads(RunConfig().model_dump_json())


def _paths(tree, prefix=()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield prefix + (k,)
            yield from _paths(v, prefix + (k,))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield prefix + (i,)
            yield from _paths(v, prefix + (i,))


PATHS = list(_paths(DEFAULT))


def _check(doc: object) -> None:
    try:
        cfg = parse_config(doc, "<fuzz>")
    except ConfigError as err:
        assert str(err).startswith("invalid config <fuzz>")
    else:
        assert isinstance(cfg, RunConfig)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values)
def test_random_documents_validate_or_name_the_problem(doc) -> None:
    _check(doc)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(PATHS), values)
def test_one_mutated_field_of_a_valid_config(path, value) -> None:
    doc = json.loads(json.dumps(DEFAULT))
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    _check(doc)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=200))
def test_random_text_files(tmp_path_factory, text) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "config.yaml"
    path.write_text(text)
    try:
        cfg = load_config(path)
    except ConfigError as err:
        assert "config" in str(err)
    else:
        assert isinstance(cfg, RunConfig)


def test_yaml_tags_are_not_executed(tmp_path) -> None:
    path = tmp_path / "evil.yaml"
    path.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    try:
        load_config(path)
    except ConfigError as err:
        assert "python/object" in str(err) or "could not" in str(err) or "YAML" in str(err)
    else:
        raise AssertionError("a python tag must not load")
    assert yaml.safe_load("a: 1") == {"a": 1}
