"""Fixtures for the data tests: the shared data root (skip when absent) and a tiny BPE tokenizer."""

import pytest

from jaxdefense.data import data_root_available, resolve_data_root, train_bpe_tokenizer

CORPUS = [
    "How do I bake bread at home? Mix flour, water, salt and yeast, then knead and bake.",
    "I cannot fulfill your request. I'm sorry, but I can't assist with that request.",
    "Sure, here is a short poem about the ocean: waves fold over waves.",
    "Analyze the sentiment of the input, and respond only positive or negative.",
    "### Instruction:\nWrite a haiku.\n\n### Response:\nQuiet pond, a frog.",
    "Unicode: naïve café — 東京 😀 ½ ∑ ß",
    "The answer is 42. #### 42",
] * 20


@pytest.fixture(scope="session")
def data_root():
    if not data_root_available():
        pytest.skip("no data root (set JAXDEFENSE_DATA_DIR or provide ../shared/data)")
    return resolve_data_root()


@pytest.fixture(scope="session")
def bpe_corpus():
    return list(CORPUS)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    return train_bpe_tokenizer(CORPUS, 400, tmp_path_factory.mktemp("tiny_bpe"))
