import sys
from pathlib import Path

# --import-mode=importlib does not put test dirs on sys.path; the tests import seam_synthetic.
sys.path.insert(0, str(Path(__file__).parent))


import jax  # noqa: E402
import pytest  # noqa: E402
from seam_synthetic import SyntheticSEAM  # noqa: E402

from jaxdefense.models import init_params, named_config  # noqa: E402


@pytest.fixture(scope="module")
def params():
    """The tiny random model's params (key 0), shared by the method tests."""
    return init_params(named_config("tiny"), jax.random.key(0))


@pytest.fixture(scope="module")
def data():
    """SEAM-shaped synthetic streams (adversarial / alignment / benign) for the tiny vocabulary."""
    return SyntheticSEAM(vocab=named_config("tiny").vocab_size, seq_len=32, batch_size=8)
