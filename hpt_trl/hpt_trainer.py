import hashlib
import json
import logging
import os
import textwrap
from collections.abc import Callable
from typing import Any

import torch
from accelerate.utils import gather_object
from trl import GRPOTrainer
from trl.trainer.utils import RepeatSampler, get_config_model_id

from .demonstrations import demonstration_token_ids, validate_demonstrations
from .gate import (
    ESTIMATORS,
    GATE_TOLERANCE,
    linear_gate,
    mixed_group_advantages,
    performance_per_prompt,
    rollout_scores,
    switch_gate,
)
from .hpt_config import HPTConfig, check_gamma
from .upge import PRESETS, get_preset, srft_advantages, srft_weights

logger = logging.getLogger(__name__)


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

    The gate is global: P is computed from the rewards gathered across all processes, so every process agrees on every
    prompt. A gated prompt's rollouts are removed from the RL loss through TRL's per-token loss mask (`tool_mask`), so
    TRL's normalizers are left unchanged, and its demonstration is trained once, by the process that holds the prompt's
    first rollout. The SFT term is normalized by the number of demonstration tokens in the whole generation batch, and
    scaled for gradient accumulation as TRL scales its `"dapo"` loss, so the update does not depend on how the batch is
    split into micro-batches or processes.

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
    `hpt/performance_mean` (mean P), `hpt/demo_tokens` (demonstration tokens in the generation batch), `hpt/sft_loss`
    (token-mean NLL of the demonstrations) and `hpt/rl_loss` (TRL's loss). Every gate decision is also appended to
    `output_dir/hpt_gate.jsonl` and kept in `trainer.gate_history`.
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
        validate_demonstrations(train_dataset, args.demonstration_column)

        super().__init__(model, reward_funcs, args=args, train_dataset=train_dataset, **kwargs)

        self._performance_index = self._resolve_performance_reward(args.performance_reward)
        self._template_kwargs = dict(self.chat_template_kwargs)
        if self.tools:
            self._template_kwargs["tools"] = self.tools
        if self.chat_template is not None:
            self._template_kwargs["chat_template"] = self.chat_template
        if args.max_demonstration_length is not None:
            self._warn_about_long_demonstrations(train_dataset)
        self._gathered_rewards_per_func = None
        self.gate_function = gate_function
        self._demonstration_presets = {
            "offline": PRESETS["offline"],
            "luffy": get_preset("luffy", gamma=args.luffy_shaping_gamma),
        }
        self.gate_history: list[dict] = []

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

    def _resolve_performance_reward(self, name: str | None) -> int | None:
        if name is None:
            return None
        if name not in self.reward_func_names:
            raise ValueError(
                f"`performance_reward={name!r}` is not one of the reward functions: {self.reward_func_names}. Set it "
                "to the name of the reward that scores correctness (0/1), or to None to use the weighted sum of all."
            )
        return self.reward_func_names.index(name)

    def _demonstration_ids(self, example: dict, max_length: int | None) -> list[int]:
        return demonstration_token_ids(
            example["prompt"],
            example[self.args.demonstration_column],
            self._tokenizer,
            self.eos_token_ids,
            max_length=max_length,
            **self._template_kwargs,
        )

    def _warn_about_long_demonstrations(self, dataset) -> None:
        if dataset is None or not hasattr(dataset, "__len__"):
            return
        limit = self.args.max_demonstration_length
        too_long = sum(len(self._demonstration_ids(example, None)) > limit for example in dataset)
        if too_long:
            logger.warning(
                f"{too_long} of {len(dataset)} demonstrations are longer than max_demonstration_length={limit} tokens "
                "and will be truncated to it."
            )

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        # TRL returns the rewards gathered across processes: keep them, the gate needs every rollout of every prompt.
        self._gathered_rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        return self._gathered_rewards_per_func

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, torch.Tensor | Any]:
        output = super()._generate_and_score_completions(inputs)
        if not self.model.training:  # evaluation reports TRL's loss on all rollouts; the gate is a training rule
            return output
        return self._apply_gate(inputs, output)

    def _plan(self, performance: torch.Tensor, scores: torch.Tensor) -> dict[str, Any]:
        """Per-prompt UPGE plan: rollout weights, demonstration weights and advantages, estimator labels."""
        args, num_prompts, n = self.args, performance.numel(), self.num_generations
        ones, zeros = torch.ones(num_prompts), torch.zeros(num_prompts)
        plan = {
            "alpha": ones,
            "sft": zeros,
            "offline": zeros,
            "luffy": zeros,
            "rollout_advantages": None,
            "drop_last_rollout": False,
            "labels": ["rl"] * num_prompts,
        }
        performance, grouped_scores = performance.cpu(), scores.view(-1, n).cpu()
        if args.algorithm == "sft":
            plan.update(alpha=zeros, sft=ones, labels=["sft"] * num_prompts)
        elif args.algorithm == "srft":
            plan.update(sft=ones, labels=["srft"] * num_prompts)
        elif args.algorithm == "luffy":
            keep = torch.ones(num_prompts, n, dtype=torch.bool)
            keep[:, -1] = False  # the demonstration takes the last rollout's place
            rollout_advantages, demo_advantages = mixed_group_advantages(
                grouped_scores, args.demonstration_reward, args.scale_rewards == "group", keep
            )
            plan.update(
                luffy=demo_advantages,
                rollout_advantages=rollout_advantages,
                drop_last_rollout=True,
                labels=["luffy"] * num_prompts,
            )
        elif args.algorithm == "hpt":
            if self.gate_function is not None:
                alpha, beta = self.gate_function(performance)
            elif args.gate == "linear":
                alpha, beta = linear_gate(performance, args.gamma, args.gate_linear_upper)
            else:
                alpha, beta = switch_gate(performance, args.gamma)
            alpha, beta = torch.as_tensor(alpha, dtype=torch.float32), torch.as_tensor(beta, dtype=torch.float32)
            pairs = zip(alpha.tolist(), beta.tolist())
            labels = ["sft" if b == 1 and a == 0 else "rl" if b == 0 else "mixed" for a, b in pairs]
            plan.update(alpha=alpha, sft=beta, labels=labels)
            if args.gamma_off is not None:
                band = (beta == 0) & (performance > args.gamma) & (performance <= args.gamma_off + GATE_TOLERANCE)
                rollout_advantages, demo_advantages = mixed_group_advantages(
                    grouped_scores, args.demonstration_reward, args.scale_rewards == "group"
                )
                plan["offline"] = torch.where(band, demo_advantages, zeros)
                plan["rollout_advantages"] = torch.where(band.unsqueeze(1), rollout_advantages, torch.nan)
                plan["labels"] = ["offline" if in_band else label for in_band, label in zip(band, labels)]
        return plan

    def _apply_gate(self, inputs: list[dict[str, Any]], output: dict[str, Any]) -> dict[str, Any]:
        device, n = self.accelerator.device, self.num_generations
        scores = rollout_scores(self._gathered_rewards_per_func, self.reward_weights, self._performance_index)
        performance = performance_per_prompt(scores, n)
        plan = self._plan(performance, scores)  # one plan per prompt, the same on every process

        # Rows of this process, as indices into the gathered generation batch (prompt g owns rows g*n ... g*n+n-1)
        start = self.accelerator.process_index * len(inputs)
        global_rows = torch.arange(start, start + len(inputs))
        prompt_of_row, position_in_group = global_rows // n, global_rows % n
        row_alpha = plan["alpha"][prompt_of_row]
        if plan["drop_last_rollout"]:
            row_alpha = row_alpha * (position_in_group != n - 1)
        demo_weights = {key: plan[key][prompt_of_row] for key in ("sft", "offline", "luffy")}
        has_demonstration = (plan["sft"] != 0) | (plan["offline"] != 0) | (plan["luffy"] != 0)
        owns_demonstration = has_demonstration[prompt_of_row] & (position_in_group == 0)  # the first rollout's row

        self._record_gate(inputs, global_rows, performance, plan)
        metrics = self._metrics["train"]
        metrics["hpt/sft_fraction"].append((plan["sft"] > 0).float().mean().item())
        metrics["hpt/performance_mean"].append(torch.nanmean(performance).item())
        for estimator in ESTIMATORS:
            metrics[f"hpt/estimator/{estimator}"].append(plan["labels"].count(estimator) / len(plan["labels"]))

        # alpha: weight of each rollout in TRL's RL loss, through its per-token loss mask (normalizers unchanged)
        if (row_alpha != 1).any():
            loss_mask = output.get("tool_mask")
            loss_mask = torch.ones_like(output["completion_mask"]) if loss_mask is None else loss_mask
            output["tool_mask"] = loss_mask * row_alpha.unsqueeze(1).to(device)
        if plan["rollout_advantages"] is not None:
            override = plan["rollout_advantages"].reshape(-1)[global_rows].to(device)
            output["advantages"] = torch.where(torch.isnan(override), output["advantages"], override)
        if self.args.algorithm == "srft":
            output["advantages"] = self._srft_rollout_advantages(output, scores[global_rows].to(device))

        if not has_demonstration.any():
            metrics["hpt/demo_tokens"].append(0.0)
            return output

        # Demonstrations: one per prompt that trains one, stored on its first rollout's row so that TRL's shuffle and
        # split carry it into the right micro-batch
        demo_ids, demo_mask = self._pad_demonstrations(inputs, owns_demonstration.nonzero().squeeze(1).tolist())
        sft_tokens = (demo_mask.sum(dim=1) * (owns_demonstration & (demo_weights["sft"] > 0))).sum()
        demo_tokens = self.accelerator.reduce(sft_tokens.to(device), reduction="sum")
        metrics["hpt/demo_tokens"].append(demo_tokens.item())
        output["demo_ids"], output["demo_mask"] = demo_ids.to(device), demo_mask.to(device)
        for key, weight in demo_weights.items():
            output[f"demo_{key}_weight"] = (weight * owns_demonstration).to(device)
        output["demo_tokens_in_batch"] = demo_tokens  # 0-dim: TRL's shuffle and split leave it whole
        return output

    def _pad_demonstrations(self, inputs: list[dict[str, Any]], owners: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ids and mask of the demonstrations of rows `owners`, all padding elsewhere (at least one column,
        for the placeholder row). Built from one list per tensor: this runs every step."""
        demonstrations = {
            row: self._demonstration_ids(inputs[row], self.args.max_demonstration_length) for row in owners
        }
        width = max((len(ids) for ids in demonstrations.values()), default=1)
        rows = [demonstrations.get(row, []) for row in range(len(inputs))]
        pad_id = self._tokenizer.pad_token_id
        demo_ids = torch.tensor([ids + [pad_id] * (width - len(ids)) for ids in rows], dtype=torch.long)
        demo_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in rows], dtype=torch.long)
        return demo_ids, demo_mask

    @torch.no_grad()
    def _srft_rollout_advantages(self, output: dict[str, Any], scores: torch.Tensor) -> torch.Tensor:
        """SRFT's RL weights: `0.1*exp(H)` for correct rollouts, `-1` for the others (H: the sequence's entropy)."""
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
        is_demo = torch.zeros_like(scores, dtype=torch.bool)
        return srft_advantages(entropies, is_demo, scores > 0, output["completion_mask"])

    def _record_gate(self, inputs, global_rows, performance, plan) -> None:
        first_rollouts = (global_rows % self.num_generations == 0).tolist()
        prompts = [_prompt_id(example["prompt"]) for example, first in zip(inputs, first_rollouts) if first]
        prompts = gather_object(prompts) if self.accelerator.num_processes > 1 else prompts
        record = {
            "step": self.state.global_step,
            "prompt_ids": prompts,
            "performance": [None if p != p else round(p, 6) for p in performance.tolist()],
            "gated": (plan["sft"] > 0).tolist(),
            "estimator": plan["labels"],
        }
        self.gate_history.append(record)
        if self.accelerator.is_main_process:
            os.makedirs(self.args.output_dir, exist_ok=True)
            with open(os.path.join(self.args.output_dir, "hpt_gate.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        if self.args.skip_zero_loss_rows and mode == "train":
            loss = self._rl_loss_without_zero_rows(model, inputs)
        else:
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        scale = self.current_gradient_accumulation_steps if mode == "train" else 1.0  # TRL's loss is scaled for GA
        self._metrics[mode]["hpt/rl_loss"].append(self.accelerator.gather(loss.detach() * scale).mean().item())
        if "demo_ids" in inputs:
            loss = loss + self.args.sft_loss_coef * self._demonstration_loss(model, inputs)
        return loss

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

    def _rl_loss_without_zero_rows(self, model, inputs: dict[str, Any]) -> torch.Tensor:
        """TRL's loss on the rows whose loss can be non-zero only (`skip_zero_loss_rows`), with the same value and
        gradient as on the whole micro-batch."""
        if any(key in inputs for key in ("pixel_values", "num_images", "token_type_ids", "mm_token_type_ids")):
            return super().compute_loss(model, inputs)  # multimodal fields are not row-aligned: no skipping
        advantages, mask = inputs["advantages"], inputs["completion_mask"]
        mask = mask if "tool_mask" not in inputs else mask * inputs["tool_mask"]
        advantage_nonzero = advantages != 0 if advantages.dim() == 1 else (advantages != 0).any(dim=1)
        rows = (advantage_nonzero & (mask.sum(dim=1) > 0)).nonzero().squeeze(1)
        num_rows = mask.size(0)
        if rows.numel() == num_rows:
            return super().compute_loss(model, inputs)
        if rows.numel() == 0:  # keep one (zero-loss) row: every process must run the same forward passes
            rows = rows.new_zeros(1)
        subset = {
            key: value[rows] if key in self.ROW_KEYS and value is not None else value for key, value in inputs.items()
        }
        loss = super().compute_loss(model, subset)
        self._metrics["train"]["hpt/skipped_rows_fraction"].append(1.0 - rows.numel() / num_rows)
        if self.loss_type in self.MEAN_OVER_ROWS_LOSS_TYPES:
            loss = loss * rows.numel() / num_rows
        return loss

    def _demonstration_loss(self, model, inputs: dict[str, Any]) -> torch.Tensor:
        """The demonstrations' UPGE terms in this micro-batch: SFT (`sft` preset) and off-policy RL (`offline`,
        `luffy` presets)."""
        demo_mask = inputs["demo_mask"]
        rows = demo_mask.any(dim=1).nonzero().squeeze(1)
        if rows.numel() == 0:
            # A zero-weight placeholder row: every process must run the same forward passes (ZeRO-3 gathers the
            # sharded parameters in each one)
            rows = torch.zeros(1, dtype=torch.long, device=demo_mask.device)
        width = max(int(demo_mask[rows].sum(dim=1).max()), 1)  # this micro-batch's longest demonstration
        demo_ids, demo_mask = inputs["demo_ids"][rows, :width], demo_mask[rows, :width].float()
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

        # SFT: token NLL, normalized by the demonstration tokens of the whole generation batch; DDP averages over
        # processes, and one optimizer step spans gradient_accumulation_steps of its steps_per_generation micro-batches
        # (TRL's "dapo" normalizer)
        sft_weight = inputs["demo_sft_weight"][rows]
        if srft:
            sft_weight = sft_weight * srft_weights(entropies, demo_mask)[0]
        nll = PRESETS["sft"].per_token_loss(logps) * demo_mask
        normalizer = inputs["demo_tokens_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        loss = (nll.sum(dim=1) * sft_weight).sum() / normalizer

        # Off-policy RL on demonstrations, normalized as one more rollout under Dr. GRPO's constant normalizer
        for preset in ("offline", "luffy"):
            advantages = inputs[f"demo_{preset}_weight"][rows]
            if advantages.any():
                per_token = self._demonstration_presets[preset].per_token_loss(logps, advantages=advantages)
                rollout_normalizer = self.args.per_device_train_batch_size * self.args.max_completion_length
                loss = loss + (per_token * demo_mask).sum() / (
                    rollout_normalizer * self.current_gradient_accumulation_steps
                )

        trained = demo_mask * (sft_weight > 0).unsqueeze(1)
        totals = self.accelerator.reduce(torch.stack([nll.detach().mul(trained).sum(), trained.sum()]), reduction="sum")
        if totals[1] > 0:
            self._metrics["train"]["hpt/sft_loss"].append((totals[0] / totals[1]).item())
        return loss
