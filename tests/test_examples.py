"""Every script in examples/ runs in its tiny configuration (`--tiny`: tiny local model, toy task, CPU, offline)."""

import difflib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hpt_trl.plotting import plot_run

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run(args, cwd, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", WANDB_DISABLED="true")  # fmt: skip
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (
        f"{' '.join(map(str, args))} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    )
    return result


def test_train_hpt(tmp_path):
    run([sys.executable, EXAMPLES / "train_hpt.py", "--tiny"], tmp_path)
    output = tmp_path / "tiny-hpt"
    assert (output / "model.safetensors").is_file() and (output / "tokenizer_config.json").is_file()
    assert (output / "hpt_gate.jsonl").read_text().count("\n") >= 5  # gate decisions of the 5 steps
    names = [Path(p).name for p in plot_run(output)]  # the script saves trainer_state.json for `hpt-trl plot`
    assert "sft_share.png" in names and "reward.png" in names


def test_train_hpt_is_trls_grpo_example_with_three_lines_changed(tmp_path):
    """Undo the three `# HPT` lines: the result is a GRPO script that runs."""
    hpt = (EXAMPLES / "train_hpt.py").read_text()
    grpo = (
        hpt.replace("from hpt_trl import HPTConfig, HPTTrainer", "from trl import GRPOConfig, GRPOTrainer")
        .replace("HPTConfig(output_dir", "GRPOConfig(output_dir")
        .replace("trainer = HPTTrainer(", "trainer = GRPOTrainer(")
    )
    changed = [line for line in difflib.ndiff(grpo.splitlines(), hpt.splitlines()) if line.startswith("+ ")]
    assert len(changed) == 3 and all("# HPT" in line for line in changed), changed
    assert "HPTConfig(" not in grpo and "HPTTrainer(" not in grpo and "import HPT" not in grpo
    (tmp_path / "train_grpo.py").write_text(grpo)
    run([sys.executable, tmp_path / "train_grpo.py", "--tiny"], tmp_path)
    assert (tmp_path / "tiny-hpt" / "model.safetensors").is_file()
    assert not (tmp_path / "tiny-hpt" / "hpt_gate.jsonl").exists()  # GRPOTrainer: no HPT gate


def test_train_lora(tmp_path):
    run([sys.executable, EXAMPLES / "train_lora.py", "--tiny"], tmp_path)
    output = tmp_path / "tiny-hpt-lora"
    assert (output / "adapter_config.json").is_file() and (output / "adapter_model.safetensors").is_file()
    assert not (output / "model.safetensors").exists()  # only the adapter is saved


def test_sft_then_grpo(tmp_path):
    run([sys.executable, EXAMPLES / "sft_then_grpo.py", "--tiny"], tmp_path)
    for stage in ("sft", "grpo"):
        assert (tmp_path / "tiny-sft-grpo" / stage / "model.safetensors").is_file(), stage
    names = [Path(p).name for p in plot_run(tmp_path / "tiny-sft-grpo" / "grpo", overview=False)]
    assert names == ["reward.png", "entropy.png", "completion_length.png"]  # GRPO logs no hpt/* metrics


@pytest.mark.slow
def test_multi_process_launch_command_from_the_readme(tmp_path):
    """The CPU form of the README's DDP launch: 2 processes (gloo), `examples/accelerate_configs/ddp.yaml`."""
    readme = (EXAMPLES / "README.md").read_text()
    assert "--num_processes 2 --mixed_precision no \\\n  examples/train_hpt.py --tiny" in readme
    config = EXAMPLES / "accelerate_configs" / "ddp.yaml"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config,
              "--num_processes", "2", "--mixed_precision", "no"]  # fmt: skip
    result = run([*launch, EXAMPLES / "train_hpt.py", "--tiny"], tmp_path, timeout=600)
    assert (tmp_path / "tiny-hpt" / "model.safetensors").is_file()
    assert "'train_runtime'" in result.stdout + result.stderr


@pytest.mark.parametrize("name", ["fsdp1", "fsdp2"])
def test_fsdp_configs_are_trls(name):
    """examples/accelerate_configs/fsdp{1,2}.yaml are TRL's own (commented); tests/test_distributed.py launches them."""
    import trl

    ours = yaml.safe_load((EXAMPLES / "accelerate_configs" / f"{name}.yaml").read_text())
    trls = yaml.safe_load((Path(trl.__file__).parent / "accelerate_configs" / f"{name}.yaml").read_text())
    assert ours == trls
    assert ours["distributed_type"] == "FSDP" and ours["fsdp_config"]["fsdp_version"] == int(name[-1])
