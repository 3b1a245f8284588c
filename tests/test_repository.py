"""What a newcomer meets in the repository itself: one project URL used everywhere, and a clean `git status` after
running the quickstart, the examples and the notebook."""

import fnmatch
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def ignored_folders() -> list[str]:
    lines = (ROOT / ".gitignore").read_text().splitlines()
    return [line.rstrip("/") for line in lines if line.endswith("/") and not line.startswith("#")]


def test_gitignore_covers_every_output_folder_the_examples_write():
    examples = [*(ROOT / "examples").glob("*.py"), ROOT / "hpt_trl" / "quickstart.py"]
    # output folders: `model, output_dir = ..., "NAME"` in the examples, the quickstart's --output-dir default
    names = {name for path in examples for name in re.findall(r'output_dir = .*?, "([\w.-]+)"', path.read_text())}
    names |= set(re.findall(r'"--output-dir", default="([\w.-]+)"', (ROOT / "hpt_trl" / "quickstart.py").read_text()))
    names |= set(re.findall(r'output_dir="([\w.-]+)"', (ROOT / "README.md").read_text()))  # the usage example
    assert {"tiny-hpt", "tiny-hpt-lora", "tiny-sft-grpo", "hpt-quickstart", "hpt-smollm2"} <= names, names
    patterns = ignored_folders()
    for name in sorted(names):
        assert any(fnmatch.fnmatch(name, pattern) for pattern in patterns), f".gitignore does not cover {name}/"
