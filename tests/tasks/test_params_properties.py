"""Property tests of params loading: whatever a user writes into params.yaml, the loader either
returns typed params or raises a ParamsError naming a key it was given (the CLI's exit 2), never
another exception, and never accepts a non-finite number."""

import dataclasses
import math
import re

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tasks.config.params import Params, ParamsError, load_params

SECTIONS = {field.name: field.type for field in dataclasses.fields(Params) if field.name != "preset"}
KEYS = {name: [field.name for field in dataclasses.fields(getattr(Params(), name))] for name in SECTIONS}
NON_FINITE = (math.inf, -math.inf, math.nan)

values = st.one_of(
    st.sampled_from(NON_FINITE),
    st.integers(min_value=-10**7, max_value=10**7),
    st.floats(min_value=-1e7, max_value=1e7, allow_nan=False),
    st.booleans(),
    st.text(max_size=8),
    st.none(),  # null: the preset decides
    st.lists(st.integers(), max_size=2),
)
entries = st.sampled_from(sorted(SECTIONS)).flatmap(lambda section: st.tuples(st.just(section), st.sampled_from(KEYS[section]), values))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(entries, min_size=1, max_size=4), st.sampled_from(["smoke", "L", "H"]))
def test_any_params_file_loads_or_names_a_key_it_was_given(tmp_path, chosen, preset):
    tree: dict = {"preset": preset}
    for section, key, value in chosen:
        tree.setdefault(section, {})[key] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tree))
    written = [value for section in SECTIONS for value in tree.get(section, {}).values()]  # the last value of a repeated key
    non_finite = any(isinstance(value, float) and not math.isfinite(value) for value in written)
    try:
        load_params(path)
    except ParamsError as error:
        named = {f"{section}.{key}" for section, key in re.findall(r"\b([a-z_]+)\.([a-z_0-9]+)", str(error)) if key in KEYS.get(section, ())}
        assert {name.split(".")[0] for name in named} & {section for section, _, _ in chosen}, f"{error} names none of the keys set"
    else:
        assert not non_finite, f"{chosen} loaded with a non-finite number"
