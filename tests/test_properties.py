"""Property-based checks of the loaders (hypothesis): whatever a user writes, a config, a search space
or a --set override either loads or fails with a ConfigError (one clear message, exit 2 at the CLI),
never with another exception (a traceback)."""
import json
import os

import yaml
from conftest import repo_root
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raysweep.config import (
    RunBase,
    apply_overrides,
    load_config,
    run_config_model,
    validate_config,
)
from raysweep.errors import ConfigError
from raysweep.sweeps.space import load_search_space

# 120 examples per property in the default run (seconds); RAYSWEEP_HYPOTHESIS_EXAMPLES=5000 for a long hunt.
SETTINGS = settings(max_examples=int(os.environ.get("RAYSWEEP_HYPOTHESIS_EXAMPLES", 120)), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _field_names(model, seen=None) -> set[str]:
    """Every field name of the run schema, nested ones included: keys likely to reach deep validators."""
    from raysweep.sweeps.space import _model_of

    seen = set() if seen is None else seen
    for name, field in model.model_fields.items():
        seen.add(name)
        sub = _model_of(field.annotation)
        if sub is not None and sub.__name__ not in seen:
            seen.add(sub.__name__)
            _field_names(sub, seen)
    return {s for s in seen if not s[:1].isupper()}


KEYS = st.sampled_from(sorted(_field_names(run_config_model()))) | st.text(max_size=8)
SCALARS = (st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=12) | st.sampled_from(["lenet5", "resnet18", "synthetic", "ray", "bagging", "pgd",
                                                      "linf", "sgd", "cuda", "auto", "1e-3", "-1"]))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=5),
                      max_leaves=20)
SMALL = {"data": {"dataset": "synthetic", "train_size": 64, "test_size": 32, "batch_size": 32},
         "ensemble": {"k": 2}, "train": {"epochs": 1}, "eval": {"uap": None, "jacobian_samples": 0}}


def _set(raw: dict, path: list[str], value) -> dict:
    node = raw
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[path[-1]] = value
    return raw


@SETTINGS
@given(st.dictionaries(KEYS, VALUES, max_size=6))
def test_any_mapping_is_a_config_or_a_config_error(raw):
    try:
        assert isinstance(validate_config(raw), RunBase)
    except ConfigError:
        pass


@SETTINGS
@given(st.lists(KEYS, min_size=1, max_size=4), VALUES)
def test_one_wrong_value_anywhere_in_a_valid_config_is_a_config_error_or_fine(path, value):
    raw = _set(json.loads(json.dumps(SMALL)), path, value)
    try:
        validate_config(raw)
    except ConfigError:
        pass


@SETTINGS
@given(st.text(max_size=200))
def test_any_file_text_loads_or_is_a_config_error(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    try:
        load_config(path)
    except ConfigError:
        pass


@SETTINGS
@given(st.text(max_size=40), st.text(max_size=40))
def test_any_set_override_applies_or_is_a_config_error(key, value):
    try:
        validate_config(apply_overrides(json.loads(json.dumps(SMALL)), [f"{key}={value}"]))
    except ConfigError:
        pass


PATHS = st.sampled_from(["train.jr.lambda_jr", "ensemble.k", "ensemble.method", "train.lr", "train.adversarial.eps",
                         "train.pdd.m", "data.batch_size", "model.arch", "eval.uap.eps", "nope.x"]) | st.text(max_size=15)
DISTRIBUTION = st.dictionaries(st.sampled_from(["uniform", "loguniform", "int", "choice", "per_member", "normal"]),
                               VALUES, min_size=1, max_size=2)


@SETTINGS
@given(st.dictionaries(PATHS, DISTRIBUTION | VALUES, max_size=3),
       st.sampled_from(["clean_acc", "weighted_acc", "auc", ["clean_acc", "mean_uap_acc"], {"metric": "robust_acc"}])
       | VALUES, st.dictionaries(st.sampled_from(["samples", "seed", "asha", "max_concurrent", "color_by",
                                                   "trial_cpus", "unknown"]), VALUES, max_size=3))
def test_any_search_section_loads_or_is_a_config_error(tmp_path, params, objective, extra):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({**SMALL, "search": {"objective": objective, "params": params, **extra}}))
    try:
        load_search_space(path)
    except ConfigError:
        pass


def test_the_shipped_spaces_still_load():
    for path in sorted((repo_root() / "search_spaces").glob("*_sweep.yaml")):
        load_search_space(path)
