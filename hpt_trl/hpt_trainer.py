import hashlib
import json
import logging
import os
import textwrap
from typing import Any

import torch
from accelerate.utils import gather_object
from trl import GRPOTrainer
from trl.trainer.utils import get_config_model_id, pad

from .demonstrations import demonstration_token_ids, validate_demonstrations
from .gate import performance_per_prompt, sft_gate
from .hpt_config import HPTConfig, check_gamma

logger = logging.getLogger(__name__)


def _prompt_id(prompt: Any) -> str:
    """A short, stable identifier of a prompt (text or messages), for the gate log."""
    return hashlib.sha1(json.dumps(prompt, sort_keys=True, default=str).encode()).hexdigest()[:12]


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
    from datasets import load_dataset
    from trl.rewards import accuracy_reward

    from hpt_trl import HPTConfig, HPTTrainer

    dataset = load_dataset("trl-lib/DeepMath-103K", split="train")  # prompt, completion (demonstration), solution
    trainer = HPTTrainer(
        model="Qwen/Qwen2.5-Math-1.5B",
        reward_funcs=accuracy_reward,
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

    def __init__(self, model, reward_funcs=None, args: HPTConfig | None = None, train_dataset=None, **kwargs):
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
        self.gate_history: list[dict] = []

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

    def _apply_gate(self, inputs: list[dict[str, Any]], output: dict[str, Any]) -> dict[str, Any]:
        device = self.accelerator.device
        num_generations = self.num_generations
        performance = performance_per_prompt(
            self._gathered_rewards_per_func, self.reward_weights, num_generations, self._performance_index
        )
        gated = sft_gate(performance, self.args.gamma)  # one decision per prompt, the same on every process

        # Rows of this process, as indices into the gathered generation batch (prompt g owns rows g*n ... g*n+n-1)
        start = self.accelerator.process_index * len(inputs)
        global_rows = torch.arange(start, start + len(inputs), device=device)
        row_gated = gated.to(device)[global_rows // num_generations]
        owns_demonstration = row_gated & (global_rows % num_generations == 0)  # the prompt's first rollout

        self._record_gate(inputs, global_rows, performance, gated)
        metrics = self._metrics["train"]
        metrics["hpt/sft_fraction"].append(gated.float().mean().item())
        metrics["hpt/performance_mean"].append(torch.nanmean(performance).item())
        if not gated.any():
            metrics["hpt/demo_tokens"].append(0.0)
            return output

        # alpha = 0: drop the gated prompts' rollouts from TRL's RL loss through its per-token loss mask
        loss_mask = output.get("tool_mask")
        loss_mask = torch.ones_like(output["completion_mask"]) if loss_mask is None else loss_mask
        output["tool_mask"] = loss_mask * (~row_gated).unsqueeze(1).to(loss_mask.dtype)

        # beta = 1: one demonstration per gated prompt, stored on its first rollout's row so that TRL's shuffle and
        # split carry it into the right micro-batch
        max_length = self.args.max_demonstration_length
        demonstrations = [
            torch.tensor(self._demonstration_ids(inputs[i], max_length)) if owns else torch.tensor([], dtype=torch.long)
            for i, owns in enumerate(owns_demonstration.tolist())
        ]
        demo_mask = pad([torch.ones_like(ids) for ids in demonstrations], padding_value=0, padding_side="right")
        demo_ids = pad(demonstrations, padding_value=self._tokenizer.pad_token_id, padding_side="right")
        if demo_ids.size(1) == 0:  # no demonstration on this process: keep one column for the placeholder row
            demo_ids = torch.full((len(inputs), 1), self._tokenizer.pad_token_id, dtype=torch.long)
            demo_mask = torch.zeros_like(demo_ids)
        demo_tokens = self.accelerator.reduce(demo_mask.sum().to(device), reduction="sum")
        metrics["hpt/demo_tokens"].append(demo_tokens.item())
        output["demo_ids"] = demo_ids.to(device)
        output["demo_mask"] = demo_mask.to(device)
        output["demo_tokens_in_batch"] = demo_tokens  # 0-dim: TRL's shuffle and split leave it whole
        return output

    def _record_gate(self, inputs, global_rows, performance, gated) -> None:
        first_rollouts = (global_rows % self.num_generations == 0).tolist()
        prompts = [_prompt_id(example["prompt"]) for example, first in zip(inputs, first_rollouts) if first]
        prompts = gather_object(prompts) if self.accelerator.num_processes > 1 else prompts
        record = {
            "step": self.state.global_step,
            "prompt_ids": prompts,
            "performance": [None if p != p else round(p, 6) for p in performance.tolist()],
            "gated": gated.tolist(),
        }
        self.gate_history.append(record)
        if self.accelerator.is_main_process:
            os.makedirs(self.args.output_dir, exist_ok=True)
            with open(os.path.join(self.args.output_dir, "hpt_gate.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        scale = self.current_gradient_accumulation_steps if mode == "train" else 1.0  # TRL's loss is scaled for GA
        self._metrics[mode]["hpt/rl_loss"].append(self.accelerator.gather(loss.detach() * scale).mean().item())
        if "demo_ids" in inputs:
            loss = loss + self.args.sft_loss_coef * self._demonstration_loss(model, inputs)
        return loss

    def _demonstration_loss(self, model, inputs: dict[str, Any]) -> torch.Tensor:
        """Sum of the demonstrations' token NLL in this micro-batch, normalized like TRL's `"dapo"` loss."""
        demo_mask = inputs["demo_mask"]
        rows = demo_mask.any(dim=1).nonzero().squeeze(1)
        if rows.numel() == 0:
            # A zero-weight placeholder row: every process must run the same forward passes (ZeRO-3 gathers the
            # sharded parameters in each one)
            rows = torch.zeros(1, dtype=torch.long, device=demo_mask.device)
        demo_ids, demo_mask = inputs["demo_ids"][rows], demo_mask[rows]
        input_ids = torch.cat([inputs["prompt_ids"][rows], demo_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"][rows], demo_mask], dim=1)
        logps, _, _ = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, demo_ids.size(1), batch_size=self.args.per_device_train_batch_size
        )
        nll_sum = -(logps * demo_mask).sum()

        # Token mean over the whole generation batch; DDP averages over processes, and one optimizer step spans
        # gradient_accumulation_steps of the generation batch's steps_per_generation micro-batches.
        normalizer = inputs["demo_tokens_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation

        totals = self.accelerator.reduce(torch.stack([nll_sum.detach(), demo_mask.sum().float()]), reduction="sum")
        if totals[1] > 0:
            self._metrics["train"]["hpt/sft_loss"].append((totals[0] / totals[1]).item())
        return nll_sum / normalizer
