import hashlib
import json
import logging
import math
import os
import textwrap
from collections.abc import Callable
from typing import Any

import torch
from accelerate.utils import gather_object
from datasets import IterableDataset
from trl import GRPOTrainer
from trl.data_utils import is_conversational
from trl.trainer.utils import RepeatSampler, get_callable_name, get_config_model_id

from .balance import demonstration_sft_loss, rollout_normalizer
from .demonstrations import (
    demonstration_token_ids,
    end_of_turn_token_id,
    is_missing_demonstration,
    validate_demonstrations,
)
from .gate import (
    ESTIMATORS,
    GateInputs,
    GatePlan,
    GateSettings,
    finite_or_none,
    plan_gate,
    resolve_performance_reward,
    rollout_success,
)
from .gate_log import GATE_LOG_NAME, GateLog, GateLogCallback
from .hpt_config import HPTConfig, check_gamma
from .reward_checks import ScoringWatch, checked_reward_func, warn_if_threshold_unreachable
from .run_guard import (
    RunGuard,
    check_dataset_fills_a_generation_batch,
    data_fingerprint,
    disk_full_explained,
    finished_step,
    settings_of,
)
from .upge import PRESETS, get_preset, srft_advantages, srft_weights

logger = logging.getLogger(__name__)

# Keys HPT adds to TRL's generation batch. Per-row tensors ride along TRL's shuffle and micro-batch split; a
# demonstration is stored on its prompt's first rollout's row.
DEMO_IDS = "hpt_demo_ids"  # (rows, length) demonstration token ids, right-padded
DEMO_MASK = "hpt_demo_mask"  # (rows, length) 1 on demonstration tokens
DEMO_SFT_WEIGHT = "hpt_demo_sft_weight"  # (rows,) beta of the row's demonstration, 0 if none
DEMO_ADVANTAGE = "hpt_demo_advantage"  # (rows,) advantage of the row's demonstration in off-policy RL, 0 if none


def _check_model_path(model: str) -> None:
    """A model given as a local path (absolute, relative or with more than one `/`) must exist: the Hub's "Repo id must
    use alphanumeric chars" 16 frames deep says nothing of a typo."""
    looks_local = model.startswith(("/", "./", "../", "~")) or model.count("/") > 1
    if looks_local and not os.path.exists(os.path.expanduser(model)):
        raise ValueError(
            f"The model path {model!r} does not exist (model_name_or_path). Pass an existing directory or a "
            "Hub model id such as 'Qwen/Qwen2.5-Math-1.5B'."
        )


# Column the trainer adds to the training dataset: each demonstration's token ids, tokenized once
DEMONSTRATION_IDS_COLUMN = "hpt_demonstration_ids"


def _tokenize_demonstration(example, column, processing_class, eos_token_ids, end_of_turn_id, template_kwargs):
    demonstration = example.get(column)
    if is_missing_demonstration(demonstration):
        return {DEMONSTRATION_IDS_COLUMN: []}
    ids = demonstration_token_ids(
        example["prompt"],
        demonstration,
        processing_class,
        eos_token_ids,
        end_of_turn_id=end_of_turn_id,
        **template_kwargs,
    )
    return {DEMONSTRATION_IDS_COLUMN: ids}


def _learned_position_limit(model) -> int | None:
    """The number of positions of a model with a learned position table (GPT-2's `wpe`, OPT's `embed_positions`, ...),
    past which its forward pass fails with an IndexError; `None` for rotary or relative positions (Llama, Qwen, ...)."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding) and name.split(".")[-1] in LEARNED_POSITION_TABLES:
            return module.num_embeddings
    return None


LEARNED_POSITION_TABLES = ("wpe", "embed_positions", "position_embeddings")

# Rollout metrics TRL 1.16 logs in `GRPOTrainer._compute_loss`
ROLLOUT_METRICS = (
    "entropy",
    "kl",
    "clip_ratio/low_mean",
    "clip_ratio/high_mean",
    "clip_ratio/region_mean",
    "clip_ratio/low_min",
    "clip_ratio/high_max",
    "cispo_clip_ratio",
    "vespo/phi_seq_mean",
)


def _prompt_id(prompt: Any) -> str:
    """A short, stable identifier of a prompt (text or messages), for the gate log."""
    return hashlib.sha1(json.dumps(prompt, sort_keys=True, default=str).encode()).hexdigest()[:12]


class _ResumableRepeatSampler(RepeatSampler):
    """TRL's `RepeatSampler`, resumable across epochs: `set_epoch(e)` (called by the Trainer before each epoch) puts the
    generator where an uninterrupted run has it, i.e. after the permutations of epochs 0..e-1. Same order as TRL's."""

    def set_epoch(self, epoch: int) -> None:
        if self.shuffle and self.seed is not None:
            self.generator.manual_seed(self.seed)
            for _ in range(epoch):
                torch.randperm(self.num_samples, generator=self.generator)


class HPTTrainer(GRPOTrainer):
    """
    Trainer for Hybrid Post-Training (HPT).

    HPT ([Towards a Unified View of Large Language Model Post-Training](https://huggingface.co/papers/2509.04419))
    switches, per prompt, between reinforcement learning on the model's own rollouts and supervised fine-tuning on the
    prompt's demonstration. For each prompt it samples `num_generations` rollouts, scores them, and computes the
    performance P (the mean score). The loss is `alpha * L_RL + beta * L_SFT` with `(alpha, beta) = (0, 1)` when
    `P <= gamma` and `(1, 0)` otherwise. `L_RL` is TRL's GRPO loss (Dr. GRPO by default, see [`HPTConfig`]) and
    `L_SFT` the token-level NLL of the demonstration.

    [`HPTTrainer`] is a drop-in replacement for [`~trl.GRPOTrainer`]: same constructor, same datasets (plus a
    demonstration column, `"completion"` by default), same launchers. With `gamma < 0` it trains exactly as
    [`~trl.GRPOTrainer`]. It overrides only the reward gathering (to keep the gathered rewards), the end of
    `_generate_and_score_completions` (to apply the gate) and `compute_loss` (to add the SFT term).

    P is the share of a prompt's rollouts that succeeded: their correctness reward (`performance_reward`) is at least
    `success_threshold`. The gate is global: P is computed from the rewards gathered across all processes, so every
    process agrees on every prompt. The per-prompt decisions are a [`~hpt_trl.gate.GatePlan`] from the pure functions
    of `hpt_trl.gate`; the trainer only applies it. A gated prompt's rollouts are removed from the RL loss through
    TRL's per-token loss mask (`tool_mask`), so TRL's normalizers are left unchanged, and its demonstration is trained
    once, by the process that holds the prompt's first rollout, as one row that weighs as much as one full-length
    rollout with advantage 1 (the authors' balance, see `hpt_trl.balance`). The update does not depend on how the
    batch is split into micro-batches or processes.

    Example:

    ```python
    from hpt_trl import HPTConfig, HPTTrainer
    from hpt_trl.data import load_gsm8k
    from hpt_trl.rewards import math_accuracy_reward

    dataset = load_gsm8k("train", conversational=True)  # prompt, completion (demonstration), solution
    trainer = HPTTrainer(
        model="Qwen/Qwen2.5-Math-1.5B",
        reward_funcs=math_accuracy_reward,
        args=HPTConfig(gamma=0.0, num_generations=8),
        train_dataset=dataset,
    )
    trainer.train()
    ```

    Args:
        model, reward_funcs, train_dataset, eval_dataset, processing_class, **kwargs:
            As in [`~trl.GRPOTrainer`].
        args ([`HPTConfig`], *optional*):
            Configuration. If `None`, a default [`HPTConfig`] is used.
        gate_function (`Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]`, *optional*):
            A custom feedback function for `algorithm="hpt"`: maps P per prompt (NaN where unscored) to
            `(alpha, beta)` per prompt, the weights of the RL and SFT terms. Overrides `args.gate`.

    Metrics (in the usual Trainer logs): `hpt/sft_fraction` (share of prompts gated in the generation batch),
    `hpt/performance_mean` (mean P), `hpt/estimator/{rl,sft,mixed,middle,luffy,srft}` (share of prompts per
    estimator), `hpt/demo_tokens` (SFT demonstration tokens in the generation batch), `hpt/sft_loss` (token-mean NLL
    of the demonstrations) and `hpt/rl_loss` (TRL's loss). Every gate decision is also kept in `trainer.gate_history`
    and written to `output_dir/hpt_gate.jsonl`, crash-safe: a resumed run's log holds exactly the records before its
    checkpoint's step, and a fresh run moves an earlier run's log to `hpt_gate.jsonl.old` (see `hpt_trl.gate_log`).

    Long runs (see `hpt_trl.run_guard` and `docs/reliability.md`): the main process locks `output_dir` while training;
    a fresh run refuses an `output_dir` holding checkpoints (unless `overwrite_output_dir`); `resume_from_checkpoint`
    `True`/"last" takes the newest complete checkpoint; a resume with other settings, data or reward functions, or from
    a checkpoint without optimizer state, is refused; a checkpoint at `max_steps` trains nothing. A reward function
    that returns anything but numbers or `None` stops with its name, and a correctness reward that scores no rollout
    for 5 generation batches in a row stops training (`hpt_trl.reward_checks`).
    """

    _tag_names = ["trl", "hpt"]
    _name = "HPT"
    _paper = {
        "title": "Towards a Unified View of Large Language Model Post-Training",
        "id": "2509.04419",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @article{lv2025towards,
                title        = {{Towards a Unified View of Large Language Model Post-Training}},
                author       = {Xingtai Lv and Yuxin Zuo and Youbang Sun and Hongyi Liu and Yuntian Wei and Zhekai Chen and Lixuan He and Xuekai Zhu and Kaiyan Zhang and Bingning Wang and Ning Ding and Bowen Zhou},
                year         = 2025,
                eprint       = {arXiv:2509.04419},
            }"""),
    }

    def __init__(
        self,
        model,
        reward_funcs=None,
        args: HPTConfig | None = None,
        train_dataset=None,
        gate_function: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
        **kwargs,
    ):
        if args is None:
            model_name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = HPTConfig(f"{model_name.split('/')[-1]}-HPT")
        elif not isinstance(args, HPTConfig):
            raise TypeError(
                f"`args` must be an `HPTConfig`, got {type(args).__name__}. `HPTConfig` accepts every `GRPOConfig` "
                "argument: replace `GRPOConfig(...)` by `HPTConfig(...)`."
            )
        # Reject bad input before the model is loaded
        check_gamma(args.gamma)
        if train_dataset is not None and hasattr(train_dataset, "__len__") and len(train_dataset) == 0:
            raise ValueError("The train dataset is empty: HPT needs prompts to sample rollouts for.")
        if isinstance(model, str):
            _check_model_path(model)
        trains_demonstrations = args.trains_demonstrations or gate_function is not None
        if trains_demonstrations:  # a streaming dataset gets its rows checked as they arrive
            train_dataset = validate_demonstrations(
                train_dataset, args.demonstration_column, allow_missing=args.allow_missing_demonstrations
            )
        if train_dataset is not None and hasattr(train_dataset, "__len__"):  # after the rows' own errors
            check_dataset_fills_a_generation_batch(len(train_dataset), args)
        funcs = reward_funcs if isinstance(reward_funcs, list) else [reward_funcs]
        if reward_funcs is not None and all(callable(f) and not hasattr(f, "config") for f in funcs):
            resolve_performance_reward([get_callable_name(f) for f in funcs], args.performance_reward)

        super().__init__(model, reward_funcs, args=args, train_dataset=train_dataset, **kwargs)

        self._performance_index, reason = resolve_performance_reward(self.reward_func_names, args.performance_reward)
        logger.info(reason)
        # Rewards of a type TRL would misread (a dict's keys) stop with the function's name
        self.reward_funcs = [
            checked_reward_func(func, name) if callable(func) and not isinstance(func, torch.nn.Module) else func
            for func, name in zip(self.reward_funcs, self.reward_func_names)
        ]
        correctness_name = self.reward_func_names[self._performance_index]
        uses_performance = args.algorithm == "srft" or (args.algorithm == "hpt" and args.trains_demonstrations)
        self._scoring_watch = ScoringWatch(correctness_name, args.success_threshold) if uses_performance else None
        if uses_performance:
            warn_if_threshold_unreachable(correctness_name, args.success_threshold)
        # One run per output_dir, resumed only from its own complete checkpoints with its own settings
        self.run_guard = RunGuard(args, is_main_process=self.accelerator.is_main_process)
        self.finished_before_training = False  # set by `train` when the checkpoint was already at max_steps
        self._skip_zero_loss_rows = self._resolve_skip_zero_loss_rows(args)
        self._template_kwargs = dict(self.chat_template_kwargs)
        if self.tools:
            self._template_kwargs["tools"] = self.tools
        if self.chat_template is not None:
            self._template_kwargs["chat_template"] = self.chat_template
        self._end_of_turn_id = None
        if trains_demonstrations and train_dataset is not None and is_conversational(next(iter(train_dataset))):
            self._end_of_turn_id = end_of_turn_token_id(self._tokenizer, self.eos_token_ids, **self._template_kwargs)
        if trains_demonstrations and self.train_dataset is not None:
            self.train_dataset = self._tokenize_demonstrations(self.train_dataset)
        self._gathered_rewards_per_func = None
        self._position_limit = _learned_position_limit(self.model)
        self._gate_settings = GateSettings.from_config(args, gate_function)
        self._demonstration_preset = get_preset("luffy", gamma=args.luffy_shaping_gamma)
        self.gate_history: list[dict] = []
        # hpt_gate.jsonl: started when training begins (a fresh run moves an old log aside, a resume keeps the records
        # before the checkpoint's step), appended one synced line per generation batch
        self.gate_log = GateLog(os.path.join(args.output_dir, GATE_LOG_NAME), enabled=self.accelerator.is_main_process)
        self.add_callback(GateLogCallback(self.gate_log))

    def train(self, resume_from_checkpoint=None, trial=None, **kwargs):
        """`Trainer.train`, guarded by `hpt_trl.run_guard`: the output_dir is locked while training, `True`/"last"
        resumes the newest complete checkpoint of this run, a resume with other settings or without optimizer state is
        refused, and a checkpoint already at `max_steps` trains nothing."""
        fingerprint = data_fingerprint(self.train_dataset, skip_columns=(DEMONSTRATION_IDS_COLUMN,))
        settings = settings_of(self.args, fingerprint, list(self.reward_func_names))
        checkpoint = self.run_guard.start(resume_from_checkpoint, settings)
        try:
            step = finished_step(checkpoint, self.args.max_steps) if checkpoint is not None else None
            if step is not None:
                return self._already_finished(checkpoint, step)
            self.finished_before_training = False
            return super().train(resume_from_checkpoint=checkpoint, trial=trial, **kwargs)
        finally:
            self.run_guard.stop()

    def _already_finished(self, checkpoint: str, step: int):
        """Resuming a checkpoint at `max_steps`: load its weights and state (so that a final save writes them) and
        train nothing."""
        from transformers.trainer_callback import TrainerState
        from transformers.trainer_utils import TrainOutput

        logger.warning(
            f"{checkpoint} is at step {step} and max_steps={self.args.max_steps}: the run is already finished, nothing "
            "to train. Raise max_steps to train further."
        )
        self.finished_before_training = True
        if not (self.is_deepspeed_enabled or self.is_fsdp_enabled):  # those load a checkpoint only once prepared
            self._load_from_checkpoint(checkpoint)
        self.state = TrainerState.load_from_json(os.path.join(checkpoint, "trainer_state.json"))
        return TrainOutput(self.state.global_step, math.nan, {})

    def _save_checkpoint(self, model, trial):
        # The run record goes in first; a save that fails for lack of space says so, with the path
        folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
        with disk_full_explained(folder):
            self.run_guard.record_checkpoint(folder)
            super()._save_checkpoint(model, trial)

    def _resolve_skip_zero_loss_rows(self, args: HPTConfig) -> bool:
        """`skip_zero_loss_rows`: None turns it on wherever the update stays exact (the config's settings and a dense
        model), and says why where it does not."""
        if args.skip_zero_loss_rows and self.aux_loss_enabled:
            raise ValueError(
                "`skip_zero_loss_rows=True` is not exact for a mixture-of-experts model with `output_router_logits`: "
                "the router's auxiliary loss would be computed over the kept rows only. Set skip_zero_loss_rows=False."
            )
        if args.skip_zero_loss_rows is not None:
            return bool(args.skip_zero_loss_rows)
        reasons = args.inexact_skipping_reasons
        if self.aux_loss_enabled:
            reasons = [*reasons, "a mixture-of-experts router loss (output_router_logits)"]
        if reasons:
            logger.info(f"skip_zero_loss_rows is off: skipping zero-loss rows would change the update with {reasons}.")
        return not reasons

    @property
    def gate_function(self) -> Callable | None:
        """The custom feedback function, if any."""
        return self._gate_settings.gate_function

    def _get_train_sampler(self, dataset=None):
        sampler = super()._get_train_sampler(dataset)
        if type(sampler) is RepeatSampler:  # a resumed run must not restart at epoch 0's order (docs/scaling.md)
            sampler.__class__ = _ResumableRepeatSampler
        return sampler

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        if self.is_world_process_zero():  # add the HPT settings to TRL's card
            from .model_card import add_hpt_settings

            add_hpt_settings(os.path.join(self.args.output_dir, "README.md"), self.args, self.reward_func_names)

    def _tokenize_demonstrations(self, dataset):
        """Tokenize every demonstration once, as SFTTrainer tokenizes its dataset: a `datasets.map` that adds the ids
        (untruncated; `[]` for a missing demonstration) as the column `DEMONSTRATION_IDS_COLUMN`. A streaming dataset
        is mapped lazily, row by row."""
        kwargs = {
            "column": self.args.demonstration_column,
            "processing_class": self._tokenizer,
            "eos_token_ids": list(self.eos_token_ids),
            "end_of_turn_id": self._end_of_turn_id,
            "template_kwargs": self._template_kwargs,
        }
        if isinstance(dataset, IterableDataset):
            return dataset.map(_tokenize_demonstration, fn_kwargs=kwargs)
        dataset = dataset.map(_tokenize_demonstration, fn_kwargs=kwargs, desc="Tokenizing demonstrations")
        limit = self.args.max_demonstration_length
        if limit is not None:
            too_long = sum(len(ids) > limit for ids in dataset[DEMONSTRATION_IDS_COLUMN])
            if too_long:
                logger.warning(
                    f"{too_long} of {len(dataset)} demonstrations are longer than max_demonstration_length={limit} "
                    "tokens and will be truncated to it."
                )
        return dataset

    def _demonstration_ids(self, example: dict, max_length: int | None) -> list[int]:
        ids = example[DEMONSTRATION_IDS_COLUMN]
        return ids[:max_length] if max_length is not None else ids

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        # TRL returns the rewards gathered across processes: keep them, the gate needs every rollout of every prompt.
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        infinite = torch.isinf(rewards_per_func)
        if infinite.any():  # would turn the parameters NaN, and only show one step later, inside generate
            rollout, func = infinite.nonzero()[0].tolist()
            raise ValueError(
                f"At step {self.state.global_step}, reward function {self.reward_func_names[func]!r} returned "
                f"{rewards_per_func[rollout, func].item()} for rollout {rollout} of the generation batch. Rewards must "
                "be finite numbers, or None for an unscored rollout."
            )
        self._gathered_rewards_per_func = rewards_per_func
        return rewards_per_func

    def _get_grad_norm(self, model, grad_norm=None):
        # transformers' Trainer computes the (all-reduced) gradient norm right before the optimizer step: a NaN or inf
        # here stops training on every process before the update reaches the weights or a checkpoint
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        if grad_norm is not None and not math.isfinite(float(grad_norm)):
            losses = {
                key: values[-1]
                for key, values in self._metrics["train"].items()
                if key in ("hpt/rl_loss", "hpt/sft_loss") and values
            }
            raise FloatingPointError(
                f"The gradient norm is {float(grad_norm)} at optimizer step {self.state.global_step + 1} (last losses: "
                f"{losses}); training stopped before the update, so the weights and the saved checkpoints are the last "
                "good ones. Check the rewards, the learning rate and sft_loss_coef."
            )
        return grad_norm

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, torch.Tensor | Any]:
        output = super()._generate_and_score_completions(inputs)
        if not self.model.training:  # evaluation reports TRL's loss on all rollouts; the gate is a training rule
            return output
        return self._apply_gate(inputs, output)

    def _combined_rewards(self) -> torch.Tensor:
        """TRL's combined reward per rollout: the weighted sum of the reward functions, NaN where all returned None."""
        rewards_per_func = self._gathered_rewards_per_func
        unscorable = torch.isnan(rewards_per_func).all(dim=1)
        rewards = (rewards_per_func * self.reward_weights.to(rewards_per_func.device)).nansum(dim=1)
        return rewards.masked_fill(unscorable, torch.nan)

    def _apply_gate(self, inputs: list[dict[str, Any]], output: dict[str, Any]) -> dict[str, Any]:
        device, n = self.accelerator.device, self.num_generations
        success = rollout_success(self._gathered_rewards_per_func, self._performance_index, self.args.success_threshold)
        batch = GateInputs(
            success=success.view(-1, n).cpu(),
            rewards=self._combined_rewards().view(-1, n).cpu(),
            has_demonstration=self._has_demonstration(inputs, success.numel() // n),
        )
        plan = plan_gate(self.args.algorithm, batch, self._gate_settings)  # the same on every process
        if self._scoring_watch is not None:
            correctness = self._gathered_rewards_per_func[:, self._performance_index].cpu()
            self._scoring_watch.observe(correctness, success.cpu(), self.state.global_step)

        # Rows of this process, as indices into the gathered generation batch (prompt g owns rows g*n ... g*n+n-1)
        start = self.accelerator.process_index * len(inputs)
        global_rows = torch.arange(start, start + len(inputs))
        prompt_of_row, position_in_group = global_rows // n, global_rows % n
        owns_demonstration = plan.trains_demonstration[prompt_of_row] & (position_in_group == 0)

        self._record_gate(inputs, global_rows, plan)
        metrics = self._metrics["train"]
        metrics["hpt/sft_fraction"].append(plan.gated.float().mean().item())
        metrics["hpt/performance_mean"].append(torch.nanmean(plan.performance).item())
        if self.args.allow_missing_demonstrations:
            metrics["hpt/missing_demonstration_fraction"].append(1.0 - batch.has_demonstration.float().mean().item())
        for estimator in ESTIMATORS:
            metrics[f"hpt/estimator/{estimator}"].append(plan.labels.count(estimator) / len(plan.labels))

        # alpha: weight of each rollout in TRL's RL loss, through its per-token loss mask (normalizers unchanged)
        row_weights = plan.rollout_weights.reshape(-1)[global_rows]
        if (row_weights != 1).any():
            loss_mask = output.get("tool_mask")
            loss_mask = torch.ones_like(output["completion_mask"]) if loss_mask is None else loss_mask
            output["tool_mask"] = loss_mask * row_weights.unsqueeze(1).to(device)
        if plan.rollout_advantages is not None:
            override = plan.rollout_advantages.reshape(-1)[global_rows].to(device)
            output["advantages"] = torch.where(torch.isnan(override), output["advantages"], override)
        if self.args.algorithm == "srft":
            output["advantages"] = self._srft_rollout_advantages(output, success[global_rows].to(device))

        if not plan.trains_demonstration.any():
            metrics["hpt/demo_tokens"].append(0.0)
            return output

        # Demonstrations: one per prompt that trains one, stored on its first rollout's row so that TRL's shuffle and
        # split carry it into the right micro-batch
        owners = owns_demonstration.nonzero().squeeze(1).tolist()
        demo_ids, demo_mask = self._pad_demonstrations(inputs, owners, output["prompt_mask"].sum(dim=1).tolist())
        sft_weights = plan.sft_weights[prompt_of_row] * owns_demonstration
        sft_tokens = (demo_mask.sum(dim=1) * (sft_weights > 0)).sum()
        metrics["hpt/demo_tokens"].append(self.accelerator.reduce(sft_tokens.to(device), reduction="sum").item())
        output[DEMO_IDS], output[DEMO_MASK] = demo_ids.to(device), demo_mask.to(device)
        output[DEMO_SFT_WEIGHT] = sft_weights.to(device)
        output[DEMO_ADVANTAGE] = (plan.demonstration_advantages[prompt_of_row] * owns_demonstration).to(device)
        return output

    def _has_demonstration(self, inputs: list[dict[str, Any]], num_prompts: int) -> torch.Tensor:
        """Per prompt of the generation batch, whether it has a demonstration (all do, unless
        `allow_missing_demonstrations`); read on the process holding the prompt's first rollout, then gathered."""
        if not self.args.allow_missing_demonstrations:
            return torch.ones(num_prompts, dtype=torch.bool)
        start, column = self.accelerator.process_index * len(inputs), self.args.demonstration_column
        local = [
            not is_missing_demonstration(example.get(column))
            for row, example in enumerate(inputs, start)
            if row % self.num_generations == 0
        ]
        return torch.tensor(gather_object(local) if self.accelerator.num_processes > 1 else local, dtype=torch.bool)

    def _pad_demonstrations(
        self, inputs: list[dict[str, Any]], owners: list[int], prompt_lengths: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ids and mask of the demonstrations of rows `owners`, all padding elsewhere (at least one column,
        for the placeholder row). Built from one list per tensor: this runs every step."""
        demonstrations = {
            row: self._demonstration_ids(inputs[row], self.args.max_demonstration_length) for row in owners
        }
        limit = self._position_limit
        for row, ids in demonstrations.items():
            if limit is not None and prompt_lengths[row] + len(ids) > limit:
                raise ValueError(
                    f"A demonstration of {len(ids)} tokens after a prompt of {prompt_lengths[row]} tokens exceeds the "
                    f"model's {limit} learned positions; prompt: {str(inputs[row]['prompt'])[:80]!r}. Set "
                    "`max_demonstration_length` to truncate demonstrations."
                )
        width = max((len(ids) for ids in demonstrations.values()), default=1)
        rows = [demonstrations.get(row, []) for row in range(len(inputs))]
        pad_id = self._tokenizer.pad_token_id
        demo_ids = torch.tensor([ids + [pad_id] * (width - len(ids)) for ids in rows], dtype=torch.long)
        demo_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in rows], dtype=torch.long)
        return demo_ids, demo_mask

    @torch.no_grad()
    def _srft_rollout_advantages(self, output: dict[str, Any], success: torch.Tensor) -> torch.Tensor:
        """SRFT's RL weights: `0.1*exp(H)` for successful rollouts, `-1` for failed ones, 0 for unscored ones (H: the
        sequence's entropy)."""
        input_ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        attention_mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        _, entropies, _ = self._get_per_token_logps_and_entropies(
            self.model,
            input_ids,
            attention_mask,
            output["completion_ids"].size(1),
            batch_size=self.args.per_device_train_batch_size,
            compute_entropy=True,
        )
        is_demo = torch.zeros_like(success, dtype=torch.bool)
        advantages = srft_advantages(entropies, is_demo, success == 1, output["completion_mask"])
        return advantages.masked_fill(torch.isnan(success), 0.0)

    def _record_gate(self, inputs, global_rows, plan: GatePlan) -> None:
        first_rollouts = (global_rows % self.num_generations == 0).tolist()
        prompts = [_prompt_id(example["prompt"]) for example, first in zip(inputs, first_rollouts) if first]
        prompts = gather_object(prompts) if self.accelerator.num_processes > 1 else prompts
        record = {
            "step": self.state.global_step,
            "prompt_ids": prompts,
            "performance": [finite_or_none(p) for p in plan.performance.tolist()],
            "gated": plan.gated.tolist(),
            "estimator": list(plan.labels),
        }
        self.gate_history.append(record)
        self.gate_log.append(record)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        metrics = self._metrics[mode]
        logged = {key: len(metrics[key]) for key in ROLLOUT_METRICS if key in metrics}
        skipping = self._skip_zero_loss_rows and mode == "train"
        if skipping:
            loss, loss_tokens = self._rl_loss_without_zero_rows(model, inputs)
            if loss is None:  # no rollout row was run: TRL logged nothing, the entropy of no rollout is missing
                metrics["hpt/kept_rows/entropy"].append(math.nan)
        else:
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            loss_tokens = self._loss_mask(inputs).sum()
        self._relabel_rollout_metrics(metrics, logged, loss_tokens, kept_rows_only=skipping)
        scale = self.current_gradient_accumulation_steps if mode == "train" else 1.0  # TRL's loss is scaled for GA
        rl_value = loss.detach() * scale if loss is not None else torch.zeros((), device=self.accelerator.device)
        metrics["hpt/rl_loss"].append(self.accelerator.gather(rl_value).mean().item())
        if DEMO_IDS in inputs:
            demonstration_loss = self._demonstration_loss(model, inputs)
            if demonstration_loss is not None:
                loss = demonstration_loss if loss is None else loss + demonstration_loss
        return loss if loss is not None else self._zero_loss(model)

    @property
    def _processes_run_in_step(self) -> bool:
        """Whether every process must run the same forward passes: several processes (DDP's gradient all-reduce, TRL's
        gathered metrics), DeepSpeed or FSDP (which gather sharded parameters in every forward pass). Otherwise a
        micro-batch with nothing to train runs no forward pass at all."""
        return self.accelerator.num_processes > 1 or self.is_deepspeed_enabled or self.is_fsdp_enabled

    @staticmethod
    def _zero_loss(model) -> torch.Tensor:
        """A zero loss that gives every trainable parameter a zero gradient, as TRL's loss on zero-loss rows does (a
        parameter without a gradient would be left out of the optimizer step, e.g. AdamW's momentum update)."""
        return torch.stack([p.sum() for p in model.parameters() if p.requires_grad]).sum() * 0.0

    @staticmethod
    def _loss_mask(inputs: dict[str, Any]) -> torch.Tensor:
        mask = inputs["completion_mask"]
        return mask if inputs.get("tool_mask") is None else mask * inputs["tool_mask"]

    def _relabel_rollout_metrics(self, metrics, logged: dict[str, int], loss_tokens, kept_rows_only: bool) -> None:
        """Keep TRL's rollout metrics of this micro-batch from meaning something else: where no rollout token is in the
        loss on any process (every prompt on SFT), they are missing (NaN, which TRL's `log` leaves out), not TRL's 0;
        while zero-loss rows are skipped they describe the rows that were run, so they move to `hpt/kept_rows/*`."""
        empty = (
            self.accelerator.reduce(
                torch.as_tensor(loss_tokens, dtype=torch.float32).to(self.accelerator.device), reduction="sum"
            )
            == 0
        )
        if not empty and not kept_rows_only:
            return
        for key in ROLLOUT_METRICS:
            values = metrics.get(key)
            if values is None or len(values) == logged.get(key, 0):
                continue
            new = values[logged.get(key, 0) :]
            del values[logged.get(key, 0) :]
            new = [math.nan] * len(new) if empty else new
            if kept_rows_only:
                metrics[f"hpt/kept_rows/{key}"].extend(new)
                if not values:
                    del metrics[key]
            else:
                values.extend(new)

    # Loss types whose normalizer counts the micro-batch's rows: a row subset's loss is rescaled by kept rows / rows
    MEAN_OVER_ROWS_LOSS_TYPES = ("grpo", "dr_grpo", "sapo", "luspo")
    ROW_KEYS = (
        "prompt_ids",
        "prompt_mask",
        "completion_ids",
        "completion_mask",
        "advantages",
        "tool_mask",
        "old_per_token_logps",
        "ref_per_token_logps",
        "sampling_per_token_logps",
        "importance_sampling_ratio",
    )

    def _rl_loss_without_zero_rows(self, model, inputs: dict[str, Any]) -> tuple[torch.Tensor | None, torch.Tensor]:
        """TRL's loss on the rows whose loss can be non-zero only (`skip_zero_loss_rows`), with the same value and
        gradient as on the whole micro-batch (`None` when no row is run); and the number of loss tokens in the kept
        rows. Where the processes run in step, each runs the largest kept-row count of any process (at least one row),
        topped up with zero-loss rows, so that their passes and TRL's gathered per-row metrics have equal sizes."""
        mask = self._loss_mask(inputs)
        if any(key in inputs for key in ("pixel_values", "num_images", "token_type_ids", "mm_token_type_ids")):
            return super().compute_loss(model, inputs), mask.sum()  # multimodal fields are not row-aligned
        advantages = inputs["advantages"]
        advantage_nonzero = advantages != 0 if advantages.dim() == 1 else (advantages != 0).any(dim=1)
        kept = advantage_nonzero & (mask.sum(dim=1) > 0)
        rows = kept.nonzero().squeeze(1)
        loss_tokens = mask[rows].sum()
        num_rows = mask.size(0)
        if self._processes_run_in_step:
            count = torch.tensor([rows.numel()], device=mask.device)
            count = max(int(self.accelerator.gather(count).max()), 1)
            rows = torch.cat([rows, (~kept).nonzero().squeeze(1)[: count - rows.numel()]])
        self._metrics["train"]["hpt/skipped_rows_fraction"].append(1.0 - rows.numel() / num_rows)
        if rows.numel() == num_rows:
            return super().compute_loss(model, inputs), mask.sum()
        if rows.numel() == 0:
            return None, loss_tokens
        subset = {
            key: value[rows] if key in self.ROW_KEYS and value is not None else value for key, value in inputs.items()
        }
        loss = super().compute_loss(model, subset)
        if self.loss_type in self.MEAN_OVER_ROWS_LOSS_TYPES:
            loss = loss * rows.numel() / num_rows
        return loss, loss_tokens

    def _demonstration_loss(self, model, inputs: dict[str, Any]) -> torch.Tensor | None:
        """The demonstrations' UPGE terms in this micro-batch: SFT (`sft` preset, times `sft_loss_coef`) and off-policy
        RL (`luffy` preset: LUFFY and the middle band), each demonstration weighed as one full-length rollout. `None`
        when the micro-batch has no demonstration and no process has to run a placeholder pass."""
        demo_mask = inputs[DEMO_MASK]
        rows = demo_mask.any(dim=1).nonzero().squeeze(1)
        if rows.numel() == 0:
            if not self._processes_run_in_step:
                return None
            # A zero-weight placeholder row: every process must run the same forward passes (ZeRO-3 gathers the
            # sharded parameters in each one)
            rows = torch.zeros(1, dtype=torch.long, device=demo_mask.device)
        width = max(int(demo_mask[rows].sum(dim=1).max()), 1)  # this micro-batch's longest demonstration
        demo_ids, demo_mask = inputs[DEMO_IDS][rows, :width], demo_mask[rows, :width].float()
        input_ids = torch.cat([inputs["prompt_ids"][rows], demo_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"][rows], demo_mask.long()], dim=1)
        srft = self.args.algorithm == "srft"
        logps, entropies, _ = self._get_per_token_logps_and_entropies(
            model,
            input_ids,
            attention_mask,
            demo_ids.size(1),
            batch_size=self.args.per_device_train_batch_size,
            compute_entropy=srft,
        )
        normalizer = rollout_normalizer(
            self.loss_type,
            max_completion_length=self.max_completion_length,
            per_device_batch_size=self.args.per_device_train_batch_size,
            gradient_accumulation_steps=self.current_gradient_accumulation_steps,
            steps_per_generation=self.args.steps_per_generation,
            num_processes=self.accelerator.num_processes,
            num_items_in_batch=inputs.get("num_items_in_batch"),
        )

        sft_weight = inputs[DEMO_SFT_WEIGHT][rows]
        if srft:
            sft_weight = sft_weight * srft_weights(entropies, demo_mask)[0]
        nll = PRESETS["sft"].per_token_loss(logps) * demo_mask
        loss = self.args.sft_loss_coef * demonstration_sft_loss(
            nll, demo_mask, sft_weight, self.max_completion_length, normalizer
        )
        advantages = inputs[DEMO_ADVANTAGE][rows]
        if advantages.any():
            per_token = self._demonstration_preset.per_token_loss(logps, advantages=advantages)
            loss = loss + (per_token * demo_mask).sum() / normalizer

        trained = demo_mask * (sft_weight > 0).unsqueeze(1)
        totals = self.accelerator.reduce(torch.stack([nll.detach().mul(trained).sum(), trained.sum()]), reduction="sum")
        if totals[1] > 0:
            self._metrics["train"]["hpt/sft_loss"].append((totals[0] / totals[1]).item())
        return loss
