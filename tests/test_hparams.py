"""Hyperparameter settings, spaces and duplicate-free sampling through Optuna."""

from __future__ import annotations

import optuna
import pytest

from cellsearch.config import ConfigError
from cellsearch.hparams import HyperParameterSpace, HyperParams, make_sampler, sample_settings, setting_key

optuna.logging.set_verbosity(optuna.logging.WARNING)

TINY = HyperParameterSpace(
    init_scale=(0.3, 1.0), learning_rate=(0.5, 1.0, 2.0), max_grad_norm=(5.0,), num_layers=(1, 2),
    parameter_budget=(1000,), dropout=(0.0,),
)


def _study(kind: str = "random", seed: int = 0):
    return optuna.create_study(direction="maximize", sampler=make_sampler(kind, seed))


def test_default_space_is_the_papers():
    space = HyperParameterSpace()
    assert space.init_scale == (0.3, 0.7, 1.0, 1.4, 2.0, 2.8)
    assert space.learning_rate == (0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)
    assert space.max_grad_norm == (1.0, 2.5, 5.0, 10.0, 20.0)
    assert space.num_layers == (1, 2, 3, 4)
    assert space.size == 6 * 7 * 5 * 4


def test_hyperparams_round_trip_and_validation():
    params = HyperParams(init_scale=0.7, learning_rate=2.0, num_layers=3, parameter_budget=5000)
    assert HyperParams.from_dict(params.to_dict()) == params
    assert params.replace(learning_rate=5) == HyperParams(**{**params.to_dict(), "learning_rate": 5.0})
    with pytest.raises(ConfigError, match="unknown key momentum"):
        HyperParams.from_dict({"momentum": 0.9})
    with pytest.raises(ConfigError, match="learning_rate"):
        HyperParams.from_dict({"learning_rate": -1})
    with pytest.raises(ConfigError, match="dropout"):
        HyperParams.from_dict({"dropout": 1.0})
    with pytest.raises(ConfigError, match="num_layers"):
        HyperParams.from_dict({"num_layers": 1.5})


def test_space_rejects_bad_lists_and_overrides():
    with pytest.raises(ConfigError, match="learning_rate"):
        HyperParameterSpace.from_dict({"learning_rate": []})
    with pytest.raises(ConfigError, match="learning_rate"):
        HyperParameterSpace.from_dict({"learning_rate": [1.0, 1.0]})
    with pytest.raises(ConfigError, match="init_scale"):
        HyperParameterSpace.from_dict({"init_scale": [0.0]})
    narrowed = HyperParameterSpace().override({"num_layers": [1]})
    assert narrowed.num_layers == (1,) and narrowed.learning_rate == HyperParameterSpace().learning_rate
    assert len(list(TINY.settings())) == TINY.size == 12
    assert all(s in TINY for s in TINY.settings())
    assert HyperParams(num_layers=4) not in TINY


def test_from_params_checks_the_space():
    assert TINY.from_params({**HyperParams(init_scale=0.3, learning_rate=2.0, parameter_budget=1000).to_dict()}) in TINY
    with pytest.raises(ConfigError, match="outside the space"):
        TINY.from_params(HyperParams(learning_rate=5.0, parameter_budget=1000).to_dict())
    with pytest.raises(ConfigError, match="lack"):
        TINY.from_params({"learning_rate": 1.0})


@pytest.mark.parametrize("kind", ["random", "tpe"])
def test_sampling_never_repeats_and_stops_when_the_space_is_used_up(kind):
    study = _study(kind, seed=3)
    first = sample_settings(study, TINY, 5)
    for trial, setting in first:
        study.tell(trial, setting.learning_rate)
    rest = sample_settings(study, TINY, 100)
    keys = [setting_key(s) for _, s in first + rest]
    assert len(keys) == TINY.size == len(set(keys))
    assert sample_settings(study, TINY, 3) == []


def test_duplicates_are_recorded_as_failed_trials_not_returned():
    study = _study("random", seed=1)
    chosen = sample_settings(study, TINY, TINY.size)
    returned = {t.number for t, _ in chosen}
    others = [t for t in study.get_trials(deepcopy=False) if t.number not in returned]
    assert all(t.state == optuna.trial.TrialState.FAIL for t in others)
    assert all(t.user_attrs.get("duplicate_of_earlier_setting") for t in others)


def test_sampling_is_seeded():
    def draw(seed):
        return [s for _, s in sample_settings(_study("random", seed), HyperParameterSpace(), 6)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_setting_key_treats_ints_and_floats_alike():
    assert setting_key({**HyperParams().to_dict(), "learning_rate": 1}) == setting_key(HyperParams(learning_rate=1.0))


def test_unknown_sampler_is_rejected():
    with pytest.raises(ConfigError, match="sampler"):
        make_sampler("grid", 0)
