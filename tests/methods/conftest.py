import sys
from pathlib import Path

# --import-mode=importlib does not put test dirs on sys.path; the tests import seam_synthetic.
sys.path.insert(0, str(Path(__file__).parent))
