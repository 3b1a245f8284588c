"""The model card `push_to_hub` uploads: TRL's card with the `hpt` tag, the paper's citation and the HPT settings.

No network: the Hub client is replaced by a fake that records the uploaded folder.
"""

import os

import pytest
import transformers.trainer
from helpers import addition_dataset, half_solved_reward, tiny_args
from huggingface_hub import ModelCard

from hpt_trl import HPTTrainer
from hpt_trl.model_card import SECTION_TITLE, add_hpt_settings, hpt_settings
from hpt_trl.tiny import build_tiny_model, build_tiny_tokenizer


def make_trainer(output_dir, **overrides):
    tokenizer = build_tiny_tokenizer()
    return HPTTrainer(
        model=build_tiny_model(tokenizer),
        reward_funcs=half_solved_reward,
        args=tiny_args(output_dir, max_steps=1, **overrides),
        train_dataset=addition_dataset(),
        processing_class=tokenizer,
    )


class FakeHubApi:
    """Stands in for `huggingface_hub.HfApi`: records what would be uploaded, sends nothing."""

    def __init__(self):
        self.uploads = []

    def create_repo(self, repo_id, **kwargs):
        raise AssertionError("the test must not create a repository")

    def upload_folder(self, repo_id, folder_path, **kwargs):
        files = {}
        for name in os.listdir(folder_path):
            if name.endswith(".md"):
                with open(os.path.join(folder_path, name), encoding="utf-8") as f:
                    files[name] = f.read()
        self.uploads.append({"repo_id": repo_id, "files": files, "ignore_patterns": kwargs.get("ignore_patterns")})
        return "https://huggingface.co/fake/commit"


@pytest.fixture
def pushed_card(tmp_path, monkeypatch):
    fake = FakeHubApi()
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: fake)
    trainer = make_trainer(tmp_path, gamma=0.25, sft_loss_coef=0.3, num_generations=2, entropy_coef=0.001)
    trainer.train()

    def init_hf_repo(token=None, private=None):  # what Trainer does after creating the repository
        trainer.hub_model_id = "hpt-user/tiny-hpt"

    monkeypatch.setattr(trainer, "init_hf_repo", init_hf_repo)
    trainer.hub_model_id = None
    trainer.push_to_hub(dataset_name="Elliott/Openr1-Math-46k-8192")
    assert len(fake.uploads) == 1 and fake.uploads[0]["repo_id"] == "hpt-user/tiny-hpt"
    return trainer, fake.uploads[0]["files"]["README.md"]


def test_card_has_hpt_tag_and_citation(pushed_card):
    _, text = pushed_card
    card = ModelCard(text)
    assert {"hpt", "trl", "generated_from_trainer"} <= set(card.data.tags)
    assert card.data.datasets in ("Elliott/Openr1-Math-46k-8192", ["Elliott/Openr1-Math-46k-8192"])
    assert (
        "This model was trained with HPT, a method introduced in [Towards a Unified View of Large Language Model "
        "Post-Training](https://huggingface.co/papers/2509.04419)" in text
    )
    assert "@article{lv2025towards," in text and "arXiv:2509.04419" in text
    assert "hpt-user/tiny-hpt" in text  # TRL's quick start points at the pushed model


def test_card_lists_the_hpt_settings(pushed_card):
    trainer, text = pushed_card
    assert text.count(SECTION_TITLE) == 1
    # before TRL's framework versions, inside the training procedure
    assert text.index("## Training procedure") < text.index(SECTION_TITLE) < text.index("### Framework versions")
    for row in (
        "| `gamma` | `0.25` |",
        "| `sft_loss_coef` | `0.3` |",
        "| `num_generations` | `2` |",
        "| `loss_type` | `dr_grpo` |",
        "| `scale_rewards` | `none` |",
        "| `beta` | `0.0` |",
        "| `entropy_coef` | `0.001` |",
        "| `performance_reward` | `None` |",
        "| `algorithm` | `hpt` |",
        "| `reward_funcs` | `['half_solved_reward']` |",
        "| `learning_rate` | `0.01` |",
        "| `lr_scheduler_type` | `linear` |",
        "| `use_vllm` | `False` |",
    ):
        assert row in text, row
    assert set(hpt_settings(trainer.args)) >= {"gamma", "sft_loss_coef", "performance_reward", "loss_type"}


def test_section_is_replaced_not_repeated(tmp_path):
    trainer = make_trainer(tmp_path)
    trainer.create_model_card(model_name="tiny-hpt")
    trainer.args.gamma = 0.5
    trainer.create_model_card(model_name="tiny-hpt")
    text = (tmp_path / "README.md").read_text()
    assert text.count(SECTION_TITLE) == 1 and "| `gamma` | `0.5` |" in text and "| `gamma` | `0.0` |" not in text
    add_hpt_settings(tmp_path / "README.md", trainer.args)  # without reward names: the row is left out
    assert (tmp_path / "README.md").read_text().count(SECTION_TITLE) == 1


def test_checkpoints_carry_the_card(tmp_path):
    trainer = make_trainer(tmp_path, save_strategy="steps", save_steps=1)
    trainer.train()
    text = (tmp_path / "README.md").read_text()  # TRL writes the card at each checkpoint save
    assert SECTION_TITLE in text and "hpt" in ModelCard(text).data.tags
