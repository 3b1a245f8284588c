"""notebooks/hpt_lora_colab.ipynb: committed clean and Colab-ready, and it runs top to bottom in its tiny mode (CI)."""

import json
import os
import re
from pathlib import Path

import nbformat
import pytest
from helpers import project_url

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "hpt_lora_colab.ipynb"


def code_sources(nb):
    return [cell.source for cell in nb.cells if cell.cell_type == "code"]


def test_notebook_is_committed_clean_and_colab_ready():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, "clear the outputs before committing"
    assert nb.metadata["kernelspec"]["name"] == "python3"
    assert nb.metadata["colab"]["gpuType"] == "T4" and nb.metadata["accelerator"] == "GPU"

    parameters = [cell for cell in nb.cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(parameters) == 1, "exactly one cell tagged `parameters` (papermill)"
    namespace = {}
    exec(parameters[0].source, {"os": os, "__builtins__": __builtins__}, namespace)  # noqa: S102
    if os.environ.get("HPT_NOTEBOOK_TINY") != "1":
        assert namespace["TINY"] is False  # Colab runs the real thing by default
    assert namespace["MODEL_ID"] == "Qwen/Qwen2.5-0.5B-Instruct"
    assert namespace["PUSH_TO_HUB"] is False  # "Run all" must not stop at a login prompt

    # one variable says where hpt-trl comes from; the Colab badge opens the notebook from the same repository
    repo = namespace["HPT_TRL_REPO"]
    match = re.fullmatch(r"git\+https://github\.com/([\w.-]+/[\w.-]+)", repo)
    assert match, repo
    badge = f"https://colab.research.google.com/github/{match.group(1)}/blob/main/notebooks/{NOTEBOOK.name}"
    assert f"]({badge})" in nb.cells[0].source, "the badge and HPT_TRL_REPO point to different repositories"
    assert "<org>" not in NOTEBOOK.read_text()
    assert repo == "git+" + project_url(), "HPT_TRL_REPO is not pyproject.toml's [project.urls] Repository"
    assert f"`{repo}`" in nb.cells[0].source, "the first cell says where hpt-trl is installed from"

    code = "\n".join(code_sources(nb))
    assert "%pip install -q {HPT_TRL_REPO}" in code and "if not TINY:" in code  # no install in CI
    # the push goes through the trainer, so the HPT model card is written and uploaded with the adapter
    assert "trainer.push_to_hub(" in code and "model.push_to_hub(" not in code.replace("trainer.push_to_hub(", "")
    assert "load_gsm8k" in code and "peft_config=peft_config" in code and "fp16=not USE_BF16" in code
    assert "from hpt_trl.evaluation import" in code and "plot_run(" in code
    assert "notebook_login" in code and "get_token() is None" in code  # the push is guarded by a login


@pytest.mark.slow
def test_notebook_runs_top_to_bottom_in_tiny_mode(tmp_path, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("HPT_NOTEBOOK_TINY", "1")  # read by the parameters cell; the kernel inherits the environment
    for name, value in {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                        "TOKENIZERS_PARALLELISM": "false", "WANDB_DISABLED": "true"}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    try:
        client.execute()  # raises CellExecutionError on the first failing cell
    finally:
        nbformat.write(nb, tmp_path / "executed.ipynb")  # kept for debugging a failure

    errors = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs if o.output_type == "error"]
    assert not errors
    output = tmp_path / "tiny-hpt-lora"
    # (entropy is plotted only for steps with rollouts in the loss, as entropy_kept_rows.png while skipping is on)
    for name in ("sft_share.png", "reward.png", "performance.png", "completion_length.png", "training_dynamics.png"):
        assert (output / "plots" / name).stat().st_size > 5_000, name
    assert (output / "adapter_config.json").is_file() and (output / "adapter_model.safetensors").is_file()
    for stage in ("before", "after"):
        results = json.loads((output / f"eval-{stage}" / "results.json").read_text())
        assert results["benchmarks"]["toy_test"]["num_problems"] == 25
    text = "".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs)
    assert "TINY=True: 20 steps" in text and "Not pushing" in text
    assert any("image/png" in o.get("data", {}) for cell in nb.cells for o in cell.get("outputs", []))
