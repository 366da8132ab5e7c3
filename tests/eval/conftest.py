"""Shared fixtures for the eval tests: a tiny tokenizer/model, the labelled judge data, a trained judge."""

import random

import jax
import pytest

from jaxdefense.data import data_root_available

_WORDS = ("the a model refuses harmful request sorry cannot help with that here is how to make bake cook write "
          "poem story about cat dog lock pick weather question answer please thanks Question Answer : ? . ,").split()


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    from jaxdefense.data import train_bpe_tokenizer

    rng = random.Random(0)
    texts = [" ".join(rng.choice(_WORDS) for _ in range(12)) for _ in range(300)]
    return train_bpe_tokenizer(texts, 400, tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def tiny_model():
    """named_config("tiny") with weights scaled ×4 so logits differ clearly between tokens."""
    from jaxdefense.models import init_params, named_config

    cfg = named_config("tiny")
    params = init_params(cfg, jax.random.key(0))
    params = jax.tree.map(lambda x: x * 4.0 if x.ndim >= 2 else x, params)
    return cfg, params


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_model, tiny_tokenizer):
    from jaxdefense.models import save_hf

    path = tmp_path_factory.mktemp("tiny_model")
    save_hf(*tiny_model, path, tokenizer=tiny_tokenizer)
    return path


@pytest.fixture(scope="session")
def labelled():
    if not data_root_available():
        pytest.skip("no data root")
    from jaxdefense.eval.labelled import load_labelled_responses

    return load_labelled_responses()


@pytest.fixture(scope="session")
def trained_judge(labelled):
    from jaxdefense.eval.judge import HarmJudge

    return HarmJudge.train(examples=labelled)
