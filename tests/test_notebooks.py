"""Re-execute the committed notebooks (nbclient, cwd = repo root) and check what they report.

A notebook's last code cell prints its results as one JSON object; the checks below read it.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

from jaxdefense.data import data_root_available  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CELL_TIMEOUT_S = 300


def execute_notebook(name: str):
    """The executed notebook; nbclient raises CellExecutionError on the first failing cell."""
    nb = nbformat.read(REPO / "notebooks" / name, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", record_timing=False,
        resources={"metadata": {"path": str(REPO)}},
    )
    client.execute()
    return nb


def code_outputs(nb):
    return [output for cell in nb.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]


def final_json(nb) -> dict:
    last = [cell for cell in nb.cells if cell.cell_type == "code"][-1]
    text = "".join(o["text"] for o in last.outputs if o.output_type == "stream" and o.name == "stdout")
    return json.loads(text)


@pytest.mark.slow
@pytest.mark.skipif(not data_root_available(), reason="no data root (../shared/data or $JAXDEFENSE_DATA_DIR)")
def test_gradient_geometry_notebook():
    nb = execute_notebook("gradient_geometry.ipynb")
    assert not [o for o in code_outputs(nb) if o.output_type == "error"]
    assert sum(1 for o in code_outputs(nb) if "image/png" in o.get("data", {})) == 3
    r = final_json(nb)
    eps = r["epsilons"]
    at = {e: i for i, e in enumerate(eps)}
    fwd32, ctr32 = r["errors"]["float32"]["forward"], r["errors"]["float32"]["central"]
    fwd64, ctr64 = r["errors"]["float64"]["forward"], r["errors"]["float64"]["central"]

    # SEAM's estimator at its default ε is usable in float32, and truncation dominates above it
    assert fwd32[at[1e-3]] < 1e-1
    assert fwd32[at[1e-1]] > fwd32[at[1e-2]] > fwd32[at[1e-3]]
    # float64 shows pure truncation: forward error ∝ ε, central ∝ ε² (slopes on the log-log plot)
    slope_fwd = np.polyfit(np.log10(eps[1:]), np.log10(fwd64[1:]), 1)[0]
    slope_ctr = np.polyfit(np.log10(eps[1:4]), np.log10(ctr64[1:4]), 1)[0]
    assert abs(slope_fwd - 1) < 0.1 and abs(slope_ctr - 2) < 0.2, (fwd64, ctr64)
    # float32 rounding: the smallest ε is worse than the best one, for both estimators
    assert fwd32[-1] > 10 * min(fwd32) and ctr32[-1] > 10 * min(ctr32)
    assert r["best_eps"]["float32_forward"] in (1e-3, 1e-4) and r["best_eps"]["float32_central"] in (1e-2, 1e-3)
    assert r["exact_float32_error"] < 1e-4

    assert -1 <= r["cos_exact_float64"] <= 1
    assert math.isclose(r["cos_exact_float32"], r["cos_exact_float64"], abs_tol=1e-5)
    assert all(-1 <= c <= 1 for c in r["cos_table"].values())
    assert 0 < r["pca_explained"][1] <= r["pca_explained"][0] < 1
    for stream, eigs in r["hessian_top_eigs"].items():
        assert all(math.isfinite(x) for x in eigs) and eigs == sorted(eigs, reverse=True), stream
        assert eigs[0] > 0, stream
    assert r["sft_loss"][1] < r["sft_loss"][0]
