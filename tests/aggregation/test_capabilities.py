"""What each aggregator declares about itself (capabilities, options) and what the
registry and the scenario layer make of it."""

from __future__ import annotations

import dataclasses

import pytest

from fedtune.aggregation import (
    Aggregator,
    Capabilities,
    NoOptions,
    aggregator_class,
    available,
    capabilities_of,
    get_aggregator,
    options_for,
    register,
)
from fedtune.aggregation.base import option_names
from fedtune.config import FederationSpec

FIELDS = ("mixed_ranks", "additive", "merges", "pads", "prunes", "dp_form", "client_mode",
          "freeze_A")
#: name -> FIELDS (no_dp_reason is checked where DP is refused: test_privacy_config.py)
EXPECTED = {
    "fedavg": (False, True, True, False, False, "factor", "continue", False),
    "fedsb": (False, False, False, False, False, None, "latent", True),
    "ffa": (False, True, True, False, False, "factor", "continue", True),
    "flexlora": (True, False, False, False, False, "dense", "continue", False),
    "flora": (True, False, False, False, False, "dense", "residual", False),
    "geomedian": (True, False, False, False, False, None, "residual", False),
    "hetlora": (True, False, True, True, True, None, "continue", False),
    "lorafair": (False, False, False, False, False, None, "continue", False),
    "multikrum": (True, False, False, False, False, None, "residual", False),
    "zeropad": (True, True, True, True, False, "factor", "continue", False),
}
OPTIONS = {
    "fedavg": ("merge", "ties_density"),
    "fedsb": (),
    "ffa": ("merge", "ties_density"),
    "flexlora": (),
    "flora": ("rank_budget", "flora_init"),
    "geomedian": ("rank_budget", "gm_smoothing", "gm_iterations", "gm_tolerance"),
    "hetlora": ("merge", "ties_density", "padding", "prune_gamma"),
    "lorafair": (),
    "multikrum": ("rank_budget", "krum_byzantine", "krum_keep"),
    "zeropad": ("merge", "ties_density", "padding"),
}


def test_every_builtin_declares_its_capabilities() -> None:
    assert sorted(EXPECTED) == available()
    for name, expected in EXPECTED.items():
        caps = capabilities_of(name)
        assert tuple(getattr(caps, field) for field in FIELDS) == expected, name


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_instances_read_their_class_capabilities(name) -> None:
    aggregator = get_aggregator(name)
    caps = aggregator.capabilities
    assert aggregator.requires_equal_ranks is not caps.mixed_ranks
    assert (aggregator.client_mode, aggregator.freeze_A) == (caps.client_mode, caps.freeze_A)


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_options_are_the_federation_keys_each_reads(name) -> None:
    cls = aggregator_class(name)
    assert option_names(cls.Options) == OPTIONS[name]
    assert get_aggregator(name).options == cls.Options()


def test_options_defaults_are_the_scenario_defaults() -> None:
    """A key's default lives in two places (the section and the Options); they agree."""
    defaults = {f.name: f.default for f in dataclasses.fields(FederationSpec)}
    for name in available():
        for f in dataclasses.fields(aggregator_class(name).Options):
            assert f.name in defaults, f"{name} reads federation.{f.name}, not in [federation]"
            assert f.default == defaults[f.name], (name, f.name)


@pytest.mark.parametrize(("name", "key", "value", "allowed"), [
    ("fedavg", "merge", "median", "'mean'"),
    ("ffa", "ties_density", 1.5, r"\(0, 1\]"),
    ("zeropad", "padding", "ones", "'zeros'"),
    ("hetlora", "prune_gamma", 1.0, r"\[0, 1\)"),
    ("flora", "rank_budget", 0, ">= 1"),
    ("flora", "flora_init", "warm", "'fresh'"),
])
def test_a_bad_option_value_is_a_named_error(name, key, value, allowed) -> None:
    """The error names the key, the value and what is allowed, built either way."""
    pattern = rf"{key} = {value!r} is not allowed; expected .*{allowed}"
    with pytest.raises(ValueError, match=pattern):
        options_for(name, {key: value})
    with pytest.raises(ValueError, match=pattern):
        get_aggregator(name, **{key: value})


def test_options_for_picks_the_aggregators_keys_only() -> None:
    keys = {"merge": "ties", "ties_density": 0.5, "rank_budget": 8, "padding": "skip",
            "aggregator": "fedavg", "max_examples": 3}
    assert dataclasses.asdict(options_for("fedavg", keys)) == {"merge": "ties",
                                                                "ties_density": 0.5}
    assert dataclasses.asdict(options_for("flora", keys)) == {"rank_budget": 8,
                                                               "flora_init": "fresh"}
    assert options_for("flexlora", keys) == NoOptions()


def test_an_options_instance_or_keywords_not_both() -> None:
    flora = aggregator_class("flora")
    given = flora(flora.Options(rank_budget=5), split="balanced")
    assert given.rank_budget == 5 and given.options.rank_budget == 5
    with pytest.raises(TypeError):
        flora(flora.Options(rank_budget=5), rank_budget=6)
    with pytest.raises(TypeError):
        flora(aggregator_class("zeropad").Options())


def test_unknown_names_list_the_available_ones() -> None:
    for ask in (aggregator_class, capabilities_of, lambda n: options_for(n, {})):
        with pytest.raises(ValueError, match="unknown aggregator 'fedprox'; available: fedavg"):
            ask("fedprox")


def test_dp_release_rank_is_the_largest_rank_or_floras_budget() -> None:
    assert get_aggregator("flexlora").dp_release_rank([2, 8, 4]) == 8
    assert get_aggregator("zeropad").dp_release_rank([2, 8, 4]) == 8
    assert get_aggregator("flora", rank_budget=6).dp_release_rank([2, 8, 4]) == 6


def test_capabilities_are_checked() -> None:
    with pytest.raises(ValueError, match="dp_form = 'sparse' is not allowed"):
        Capabilities(dp_form="sparse")
    with pytest.raises(ValueError, match="client_mode = 'fresh' is not allowed"):
        Capabilities(client_mode="fresh")


def test_register_refuses_capabilities_its_options_contradict() -> None:
    """merges / pads / prunes stand for option keys; a class must declare both or neither."""

    class Claims(Aggregator):
        name = "claims-to-merge"
        capabilities = Capabilities(merges=True)

        def aggregate(self, updates, previous):  # pragma: no cover - never built
            raise NotImplementedError

    with pytest.raises(TypeError, match="capabilities.merges = True but its Options lack"):
        register(Claims)
    assert "claims-to-merge" not in available()


def test_config_derives_dp_forms_from_the_registry() -> None:
    from fedtune.config import DP_FORMS

    assert DP_FORMS == {name: expected[5] for name, expected in EXPECTED.items()}


# ---- the scenario layer asks the registry ------------------------------------------------
def test_a_key_only_other_aggregators_read_must_keep_its_default() -> None:
    from fedtune.config import ConfigError, load_scenario

    with pytest.raises(ConfigError, match="rank_budget = 8 is not allowed; expected 64 unless "
                       "aggregator is one of flora, geomedian, multikrum: fedavg does not "
                       r"read it \(its options: merge, ties_density\)"):
        load_scenario("tiny", ["federation.rank_budget=8"])
    with pytest.raises(ConfigError, match="prune_gamma = 0.5 .*unless aggregator is hetlora"):
        load_scenario("tiny", ['federation.aggregator="zeropad"', "federation.prune_gamma=0.5"])
    assert load_scenario("tiny", ['federation.aggregator="flora"', "federation.rank_budget=8"]
                         ).federation.aggregator_options() == {"rank_budget": 8,
                                                               "flora_init": "fresh"}


def test_for_aggregator_resets_the_keys_the_new_one_does_not_read() -> None:
    spec = FederationSpec(aggregator="hetlora", merge="ties", padding="skip", prune_gamma=0.5)
    assert spec.for_aggregator("zeropad") == dataclasses.replace(spec, aggregator="zeropad",
                                                                 prune_gamma=0.0)
    flora = spec.for_aggregator("flora")
    assert (flora.merge, flora.padding, flora.prune_gamma) == ("mean", "zeros", 0.0)
    assert flora.for_aggregator("hetlora").aggregator_options()["merge"] == "mean"
