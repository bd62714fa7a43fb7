"""The quickstart notebook runs end to end on CPU, shortened through its parameters cell (as
papermill would: a cell of overrides after the one tagged "parameters"); any failing cell,
including the notebook's own checks (speculative == greedy, transformers' logits == ours),
fails the test."""

import json
import os

import nbformat
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "quickstart.ipynb")
TRAIN_STEPS = 8


def test_quickstart_notebook_runs_end_to_end(tmp_path, monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "the notebook needs exactly one cell tagged 'parameters'"
    workdir = tmp_path / "run"
    overrides = nbformat.v4.new_code_cell(
        f"TRAIN_STEPS = {TRAIN_STEPS}\nWORKDIR = {str(workdir)!r}\nMAX_NEW_TOKENS = 16")
    overrides.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(tagged[0] + 1, overrides)

    # The checkout, installed or not; the kernel and the trainer it starts run on the CPU.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [
        REPO, os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    client = NotebookClient(nb, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError naming the failing cell

    with open(workdir / "metrics.jsonl") as f:
        steps = [json.loads(line)["step"] for line in f]
    assert max(steps) == TRAIN_STEPS
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 2  # the live loss plot and the expert-load heatmap
    text = "".join(o.get("text", "") for o in outputs)
    assert "identical to greedy: True" in text
    assert "max |ours - transformers| / max |transformers|" in text
    assert os.path.isfile(f"{workdir}-hf/config.json")
