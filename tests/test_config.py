import pytest

from smallgpt.config import PRESETS, ModelConfig, get_preset, parse_overrides, with_overrides
from smallgpt.errors import SmallGPTError
from smallgpt.model import GPT


def test_seed_preset_has_about_10_7m_non_embedding_parameters():
    gpt = GPT(get_preset("smallgpt-10m"))
    assert 10.6e6 < gpt.num_params() < 10.8e6


def test_modern_presets_keep_their_seed_twins_shape_and_size():
    for seed, modern in (("tiny", "tiny-modern"), ("smallgpt-10m", "smallgpt-10m-modern")):
        a, b = get_preset(seed), get_preset(modern)
        assert (a.arch, b.arch) == ("gpt2", "qwen3")
        assert (a.n_layer, a.n_embd, a.n_head, a.block_size) == (b.n_layer, b.n_embd, b.n_head, b.block_size)
    # Non-embedding parameters (the untied head counts as a vocabulary matrix): within 10% of the seed's.
    assert abs(GPT(get_preset("smallgpt-10m-modern")).num_params() / 10.7e6 - 1) < 0.1


def test_presets_build_and_gpt2_small_has_124m_parameters():
    assert set(PRESETS) == {
        "tiny", "tiny-modern", "smallgpt-10m", "smallgpt-10m-modern", "smallgpt-26m", "gpt2-124m"
    }  # fmt: skip
    cfg = get_preset("gpt2-124m")
    # GPT-2 small: 124,439,808 parameters with the unpadded 50,257-row embedding.
    gpt = GPT(with_overrides(cfg, {"vocab_multiple": "1"}))
    assert gpt.num_params(non_embedding=False) == 124_439_808
    assert 20e6 < GPT(get_preset("smallgpt-26m")).num_params() < 27e6


def test_vocab_padding_rounds_up():
    assert ModelConfig().padded_vocab_size == 50304
    assert ModelConfig(vocab_multiple=1).padded_vocab_size == 50257


def test_overrides_are_typed():
    cfg = with_overrides(ModelConfig(), parse_overrides(["n_layer=8", "dropout=0", "bias=false"]))
    assert (cfg.n_layer, cfg.dropout, cfg.bias) == (8, 0.0, False)


@pytest.mark.parametrize(
    "pairs, message",
    [
        (["n_layer=-1"], "n_layer must be at least 1"),
        (["n_head=5"], "does not divide"),
        (["n_layers=2"], "unknown config field 'n_layers'"),
        (["n_layer=two"], "not int"),
        (["bias=maybe"], "not a boolean"),
        (["n_layer"], "expected key=value"),
        (["dropout=1.5"], "dropout"),
        (["block_size=99999999999999999999"], "block_size and vocab_multiple must be at most 2,147,483,648"),
        (["n_layer=5000"], "n_layer must be at most 4,096"),
        (["n_embd=2000000", "n_head=1"], "n_embd must be at most 1,048,576"),
        (["n_layer=2.0"], "'2.0' is not int"),
        (["dropout=nan"], "dropout: nan is not a finite number"),
    ],
)
def test_bad_overrides_are_refused(pairs, message):
    with pytest.raises(SmallGPTError, match=message):
        with_overrides(ModelConfig(), parse_overrides(pairs))


def test_unknown_preset():
    with pytest.raises(SmallGPTError, match="unknown preset 'huge'"):
        get_preset("huge")


def test_from_dict_round_trip_and_unknown_fields():
    cfg = get_preset("tiny")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(SmallGPTError, match="unknown model config field"):
        ModelConfig.from_dict({**cfg.to_dict(), "rope": True})


@pytest.mark.parametrize(
    "values, message",
    [
        ({"micro_batch_size": 0}, "micro_batch_size must be at least 1"),
        ({"seed": -1}, r"seed must be in \[0, 2\*\*63\), not -1"),
        ({"seed": 2**63}, "seed must be in"),
        ({"max_iters": 2.5}, "max_iters: 2.5 is float, not int"),
        ({"compile": "yes please"}, "'yes please' is not a boolean"),
        ({"keep_last": True}, "keep_last: True is bool, not int"),
        ({"learning_rate": float("inf")}, "learning_rate: inf is not a finite number"),
        ({"sampling": "sequential"}, "sampling must be one of random, epochs"),
    ],
)
def test_bad_training_values_are_refused_from_any_source(values, message):
    from smallgpt.recipe import TrainConfig

    with pytest.raises(SmallGPTError, match=message):
        with_overrides(TrainConfig(), values)
    assert with_overrides(TrainConfig(), {"seed": 2**63 - 1, "learning_rate": 1}).learning_rate == 1.0
