import sys
from pathlib import Path

# --import-mode=importlib does not put test dirs on sys.path; the tests import train_helpers.
sys.path.insert(0, str(Path(__file__).parent))
