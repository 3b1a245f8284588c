"""The README's usage example runs as written on CPU (a tiny local model in place of the Hub model), and the README
speaks to users: the project's URL, no internal issue numbers or commit hashes, every number with its provenance."""

import re
from pathlib import Path

from helpers import project_url

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
HUB_MODEL = '"HuggingFaceTB/SmolLM2-135M-Instruct"'


def section(title: str) -> str:
    text = README.read_text()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", text, flags=re.MULTILINE | re.DOTALL)
    assert match, f"README.md has no '## {title}' section"
    return match.group(1)


def usage_example() -> str:
    blocks = re.findall(r"^```python\n(.*?)^```$", section("Usage"), flags=re.MULTILINE | re.DOTALL)
    assert len(blocks) == 1, "the Usage section has one Python example"
    return blocks[0]


def test_the_readme_usage_example_runs_on_cpu(tmp_path, monkeypatch):
    from hpt_trl.tiny import save_tiny_model

    code = usage_example()
    assert code.count(HUB_MODEL) == 1, f"the example trains {HUB_MODEL}: update this test with it"
    code = code.replace(HUB_MODEL, repr(save_tiny_model(str(tmp_path / "tiny-model"))))
    monkeypatch.chdir(tmp_path)  # the example writes its output_dir in the current directory
    namespace = {"__name__": "__main__"}
    exec(compile(code, "README.md (Usage)", "exec"), namespace)  # noqa: S102

    trainer = namespace["trainer"]
    assert trainer.args.output_dir == "hpt-smollm2" and (tmp_path / "hpt-smollm2").is_dir()
    assert trainer.model.device.type == "cpu" and not trainer.args.bf16
    assert trainer.state.global_step == 3  # 2 prompts per step, 3 epochs (TrainingArguments' default)
    logged = [entry for entry in trainer.state.log_history if "hpt/sft_fraction" in entry]
    assert logged and all(0.0 <= entry["hpt/sft_fraction"] <= 1.0 for entry in logged)


def test_the_readme_speaks_to_users():
    text = README.read_text()
    assert project_url() in text.split("## ", 1)[0], "the README says the project's URL before its first section"
    assert not re.search(r"\bissues? \d+", text, flags=re.IGNORECASE), "internal issue numbers"
    assert not re.search(r"(commit|on) `[0-9a-f]{7,40}`", text), "commit hashes belong in benchmarks/results"
    for label, path in re.findall(r"\[([^\]]*)\]\((benchmarks/results/[^)#]+)\)", text):
        assert (ROOT / path).is_file(), f"README links to {path}, which does not exist"
        body = (ROOT / path).read_text()
        recorded = {float(x) for x in re.findall(r"-?\d+\.\d+", body)}
        for number in re.findall(r"\d+\.\d+", label):  # in the file as written, or as a fraction (51.2% = 0.5116...)
            as_fraction = path.endswith(".json") and any(abs(100 * x - float(number)) < 0.05 for x in recorded)
            assert number in body or as_fraction, f"README: {number} ({label!r}) is not in {path}"
    first_screen = "\n".join(text.splitlines()[:40])
    for term in ("rollouts", "performance P", "gamma", "Dr. GRPO", "gates"):
        assert term in first_screen, f"the first screen defines {term!r}"


def test_every_number_in_the_evidence_table_links_to_its_provenance():
    table = [line for line in section("Evidence").splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(table) >= 4
    for row in table:
        cells = row.strip("|").split("|")[1:]  # the results, not the benchmark's description
        unlinked = re.sub(r"\[[^\]]*\]\([^)]*\)", "", "|".join(cells))
        assert not re.search(r"\d+(\.\d+)?(%|x)", unlinked), f"a number without its provenance file: {row}"
