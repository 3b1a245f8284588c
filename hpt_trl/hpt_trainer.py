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
from datasets import Dataset, IterableDataset
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOTrainer
from trl.data_utils import is_conversational
from trl.trainer.utils import RepeatSampler, get_callable_name, get_config_model_id

from .balance import authors_packing, demonstration_sft_loss, rollout_normalizer
from .dataset_checks import check_training_data
from .demonstrations import (
    check_demonstration_tokens,
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
    resolve_success_threshold,
    rollout_success,
)
from .gate_log import GATE_LOG_NAME, GateLog, GateLogCallback
from .generation_buffer import load_generation_buffer, save_generation_buffer
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
# demonstration is stored on its prompt's first rollout's row, and trained in the micro-batch (optimizer step) that
# row lands in.
DEMO_IDS = "hpt_demo_ids"  # (rows, length) demonstration token ids, right-padded
DEMO_MASK = "hpt_demo_mask"  # (rows, length) 1 on demonstration tokens
DEMO_SFT_WEIGHT = "hpt_demo_sft_weight"  # (rows,) beta of the row's demonstration, 0 if none
DEMO_ADVANTAGE = "hpt_demo_advantage"  # (rows,) advantage of the row's demonstration in off-policy RL, 0 if none
# entropy_weighting="authors_packing": 1 / response tokens of the row's (or its demonstration's) authors' micro-batch
ROLLOUT_ENTROPY_WEIGHT = "hpt_rollout_entropy_weight"  # (rows,)
DEMO_ENTROPY_WEIGHT = "hpt_demo_entropy_weight"  # (rows,)


def _reward_func_name(reward_func) -> str:
    """The name `GRPOTrainer.__init__` (TRL 1.16) gives a reward function, known before a reward model loads."""
    if isinstance(reward_func, str):
        return reward_func.split("/")[-1]
    if isinstance(reward_func, torch.nn.Module):
        return get_config_model_id(reward_func.config).split("/")[-1]
    return get_callable_name(reward_func)


def _resolve_correctness_reward(names, reward_funcs, args, uses_performance: bool, log: bool = False):
    """The index of the correctness reward and its success threshold (`None, None` where P is not computed)."""
    index, reason = resolve_performance_reward(names, args.performance_reward, required=uses_performance)
    threshold = None
    if index is not None:
        is_reward_model = isinstance(reward_funcs[index], (str, torch.nn.Module))
        if uses_performance or args.success_threshold is not None or not is_reward_model:
            threshold = resolve_success_threshold(args.success_threshold, is_reward_model, names[index])
        else:  # P of a reward model without a threshold means nothing, and training does not read it
            reason = f"P is not computed: training does not read it here, and `{names[index]}` is a reward model."
            index = None
    if log:
        logger.info(reason)
    return index, threshold


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


def _tokenize_demonstration(example, row, column, processing_class, eos_token_ids, end_of_turn_id, template_kwargs):
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
    check_demonstration_tokens(ids, demonstration, row, column)
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
    batch is split into micro-batches or processes. With several optimizer steps per generation batch
    (`steps_per_generation > gradient_accumulation_steps`, or `num_iterations > 1`) the gate is decided once per
    batch, a demonstration is trained in the optimizer step that TRL's row shuffle gives its prompt's first rollout,
    with the same weight, once per pass; a checkpoint written inside a batch keeps the batch, so resuming is exact
    (docs/scaling.md).

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
    of the demonstrations) and `hpt/rl_loss` (TRL's loss); with either `"authors_packing"` option,
    `hpt/authors_sft_weight` (total SFT weight of the generation batch, in demonstrations), and with
    `skip_update_above_grad_norm`, `hpt/skipped_update` (1 for a skipped optimizer step). Every gate decision is also kept in `trainer.gate_history`
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
        train_dataset = check_training_data(train_dataset, reward_funcs)  # prompts, and the columns rewards read
        if isinstance(kwargs.get("eval_dataset"), (Dataset, IterableDataset)):
            kwargs["eval_dataset"] = check_training_data(kwargs["eval_dataset"], reward_funcs, split="eval")
        trains_demonstrations = args.trains_demonstrations or gate_function is not None
        if trains_demonstrations:  # a streaming dataset gets its rows checked as they arrive
            train_dataset = validate_demonstrations(
                train_dataset, args.demonstration_column, allow_missing=args.allow_missing_demonstrations
            )
        if train_dataset is not None and hasattr(train_dataset, "__len__"):  # after the rows' own errors
            check_dataset_fills_a_generation_batch(len(train_dataset), args)
        uses_performance = args.uses_performance or gate_function is not None
        if reward_funcs is not None:
            funcs = reward_funcs if isinstance(reward_funcs, list) else [reward_funcs]
            _resolve_correctness_reward([_reward_func_name(f) for f in funcs], funcs, args, uses_performance)

        super().__init__(model, reward_funcs, args=args, train_dataset=train_dataset, **kwargs)
        if args.chat_template_path is not None:  # before anything renders a prompt or a demonstration
            with open(args.chat_template_path, encoding="utf-8") as file:
                self._tokenizer.chat_template = self.processing_class.chat_template = file.read()

        self._performance_index, self._success_threshold = _resolve_correctness_reward(
            self.reward_func_names, self.reward_funcs, args, uses_performance, log=True
        )
        # Rewards of a type TRL would misread (a dict's keys) stop with the function's name
        self.reward_funcs = [
            checked_reward_func(func, name) if callable(func) and not isinstance(func, torch.nn.Module) else func
            for func, name in zip(self.reward_funcs, self.reward_func_names)
        ]
        self._scoring_watch = None
        if uses_performance and self._performance_index is not None:
            correctness_name = self.reward_func_names[self._performance_index]
            self._scoring_watch = ScoringWatch(correctness_name, self._success_threshold)
            warn_if_threshold_unreachable(correctness_name, self._success_threshold)
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
        self._setup_reproduction_options(args)

    def _setup_reproduction_options(self, args: HPTConfig) -> None:
        """`sft_weighting`/`entropy_weighting="authors_packing"` and `skip_update_above_grad_norm`
        (`docs/reproducing.md`)."""
        self._replays_authors_packing = "authors_packing" in (args.sft_weighting, args.entropy_weighting)
        rows_per_step = (
            args.per_device_train_batch_size * args.gradient_accumulation_steps * self.accelerator.num_processes
        )
        if self._replays_authors_packing and rows_per_step % args.authors_num_gpus:
            raise ValueError(
                f"'authors_packing' splits each optimizer step's {rows_per_step} rollouts over authors_num_gpus="
                f"{args.authors_num_gpus} GPUs; make per_device_train_batch_size * gradient_accumulation_steps * "
                "processes a multiple of it."
            )
        self._authors_rows_per_mini_batch = rows_per_step // args.authors_num_gpus
        # The authors' entropy bonus replaces TRL's (TRL 1.16 `GRPOTrainer._compute_loss` adds it when this is set)
        self._authors_entropy_coef = args.entropy_coef if args.entropy_weighting == "authors_packing" else 0.0
        if self._authors_entropy_coef:
            self._entropy_bonus_enabled = False
        self._captured_entropies: list | None = None
        threshold = args.skip_update_above_grad_norm
        self._skip_threshold = threshold if threshold is not None and math.isfinite(threshold) else None
        if self._skip_threshold is not None and self.is_deepspeed_enabled:
            raise ValueError(
                "`skip_update_above_grad_norm` cannot be used with DeepSpeed, which clips and steps the optimizer inside "
                "its engine: launch with FSDP or DDP, or turn it off with `--skip_update_above_grad_norm inf`."
            )

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
            return dataset.map(_tokenize_demonstration, fn_kwargs=kwargs, with_indices=True)
        dataset = dataset.map(
            _tokenize_demonstration, fn_kwargs=kwargs, with_indices=True, desc="Tokenizing demonstrations"
        )
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
        threshold = self._skip_threshold
        if threshold is not None and grad_norm is not None and math.isfinite(float(grad_norm)):
            skipped = float(grad_norm) > threshold
            if skipped:  # AdamW leaves parameters without a gradient untouched: no step, no moments, no weight decay
                self.optimizer.zero_grad(set_to_none=True)
            self._metrics["train"]["hpt/skipped_update"].append(float(skipped))
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

    @property
    def _generate_every(self) -> int:
        """Micro-steps per generation batch, as in TRL 1.16's `GRPOTrainer._prepare_inputs`."""
        return self.args.steps_per_generation * self.num_iterations

    def _save_checkpoint(self, model, trial):
        # Before the Trainer's files (its trainer_state.json is written last, and marks a complete checkpoint): the run
        # record (hpt_trl.run_guard) and, where a generation batch spans several micro-steps, each process's TRL
        # micro-step counter and generation buffer, so that a resume inside the batch trains on the same rollouts
        # (hpt_trl.generation_buffer). A save that fails for lack of space says so, with the path.
        checkpoint_dir = os.path.join(
            self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        )
        with disk_full_explained(checkpoint_dir):
            self.run_guard.record_checkpoint(checkpoint_dir)
            if self._generate_every > 1 and not self.args.save_only_model:
                save_generation_buffer(
                    checkpoint_dir,
                    self.accelerator.process_index,
                    self.accelerator.num_processes,
                    self._step,
                    self._generate_every,
                    self._buffered_inputs,
                )
            super()._save_checkpoint(model, trial)

    def _load_optimizer_and_scheduler(self, checkpoint):
        # Called by `Trainer.train` when it resumes, as TRL 1.16 restores its entropy controller here
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        restored = load_generation_buffer(
            checkpoint,
            self.accelerator.process_index,
            self.accelerator.num_processes,
            self._generate_every,
            self.accelerator.device,
        )
        if restored is not None:
            self._step, self._buffered_inputs = restored

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
        rewards_per_func = self._gathered_rewards_per_func
        if self._performance_index is None:  # training does not read P here (HPTConfig.uses_performance)
            success = torch.full(rewards_per_func.shape[:1], torch.nan, device=rewards_per_func.device)
        else:
            success = rollout_success(rewards_per_func, self._performance_index, self._success_threshold)
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
        if self._performance_index is not None:
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
        packing_sft, demo_entropy = None, None
        if self._replays_authors_packing:
            packing_sft, rollout_entropy, demo_entropy = self._replay_authors_packing(inputs, output, plan, global_rows)
            output[ROLLOUT_ENTROPY_WEIGHT] = rollout_entropy[global_rows].to(device)
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
        if self.args.sft_weighting == "authors_packing":
            sft_weights = sft_weights * packing_sft[prompt_of_row]
        sft_tokens = (demo_mask.sum(dim=1) * (sft_weights > 0)).sum()
        metrics["hpt/demo_tokens"].append(self.accelerator.reduce(sft_tokens.to(device), reduction="sum").item())
        output[DEMO_IDS], output[DEMO_MASK] = demo_ids.to(device), demo_mask.to(device)
        output[DEMO_SFT_WEIGHT] = sft_weights.to(device)
        output[DEMO_ADVANTAGE] = (plan.demonstration_advantages[prompt_of_row] * owns_demonstration).to(device)
        if demo_entropy is not None:
            output[DEMO_ENTROPY_WEIGHT] = (demo_entropy[prompt_of_row] * owns_demonstration).to(device)
        return output

    def _replay_authors_packing(self, inputs, output, plan: GatePlan, global_rows: torch.Tensor):
        """The authors' micro-batches of this generation batch (`hpt_trl.balance.authors_packing`), from the lengths
        gathered over the processes. Returns, on the CPU: per prompt, the SFT weight of its demonstration (1 where it
        trains none); per global row, 1 / response tokens of its micro-batch (0 for a removed rollout); per prompt, the
        same for its demonstration."""
        n = self.num_generations
        prompt_tokens = output["prompt_mask"].sum(dim=1).cpu()
        response_tokens = output["completion_mask"].sum(dim=1).cpu()
        first = (global_rows % n == 0) & plan.trains_demonstration[global_rows // n]
        demo_tokens = torch.tensor(
            [
                len(self._demonstration_ids(example, self.args.max_demonstration_length)) if owner else 0
                for example, owner in zip(inputs, first.tolist())
            ]
        )
        local = torch.stack([prompt_tokens, response_tokens, demo_tokens], dim=1).to(self.accelerator.device)
        prompt_tokens, response_tokens, demo_tokens = self.accelerator.gather(local).cpu().T
        prompts = plan.trains_demonstration.nonzero().squeeze(1)
        owners = prompts * n
        packing = authors_packing(
            (prompt_tokens + response_tokens).tolist(),
            response_tokens.tolist(),
            (plan.rollout_weights.reshape(-1) != 0).tolist(),
            (prompt_tokens[owners] + demo_tokens[owners]).tolist(),
            demo_tokens[owners].tolist(),
            plan.gated[prompts].tolist(),
            num_gpus=self.args.authors_num_gpus,
            rows_per_mini_batch=self._authors_rows_per_mini_batch,
            max_tokens_per_gpu=self.args.authors_max_tokens_per_gpu,
        )

        def inverse(tokens):
            tokens = torch.tensor(tokens, dtype=torch.float32)
            return torch.where(tokens > 0, 1.0 / tokens.clamp(min=1.0), torch.zeros_like(tokens))

        sft = torch.ones(len(plan.labels))
        sft[prompts] = torch.tensor(packing.sft_weights, dtype=torch.float32)
        demo_entropy = torch.zeros(len(plan.labels))
        demo_entropy[prompts] = inverse(packing.demonstration_micro_batch_tokens)
        self._metrics["train"]["hpt/authors_sft_weight"].append(float(sum(packing.sft_weights)))
        return sft, inverse(packing.rollout_micro_batch_tokens), demo_entropy

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
            authors_entropy = self._authors_entropy_coef and ROLLOUT_ENTROPY_WEIGHT in inputs
            self._captured_entropies = [] if authors_entropy else None
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            loss_tokens = self._loss_mask(inputs).sum()
            if authors_entropy:
                weights = inputs["completion_mask"] * inputs[ROLLOUT_ENTROPY_WEIGHT].unsqueeze(1)
                loss = loss - self._authors_entropy_bonus(self._captured_entropies[-1], weights, inputs)
            self._captured_entropies = None
        self._relabel_rollout_metrics(metrics, logged, loss_tokens, kept_rows_only=skipping)
        scale = self.current_gradient_accumulation_steps if mode == "train" else 1.0  # TRL's loss is scaled for GA
        rl_value = loss.detach() * scale if loss is not None else torch.zeros((), device=self.accelerator.device)
        metrics["hpt/rl_loss"].append(self.accelerator.gather(rl_value).mean().item())
        if DEMO_IDS in inputs:
            demonstration_loss = self._demonstration_loss(model, inputs)
            if demonstration_loss is not None:
                loss = demonstration_loss if loss is None else loss + demonstration_loss
        return loss if loss is not None else self._zero_loss(model)

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        result = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        if self._captured_entropies is not None:  # the rollouts' entropies, for entropy_weighting="authors_packing"
            self._captured_entropies.append(result[1])
        return result

    def _authors_entropy_bonus(self, entropies: torch.Tensor, weights: torch.Tensor, inputs) -> torch.Tensor:
        """The authors' entropy bonus of these rows: `entropy_coef` times each token's entropy over the response tokens
        of its authors' micro-batch (`weights`), one micro-batch's mean weighing as one full-length rollout."""
        return (
            self._authors_entropy_coef
            * (entropies * weights).sum()
            * self.max_completion_length
            / (self._rollout_normalizer(inputs))
        )

    def _rollout_normalizer(self, inputs):
        return rollout_normalizer(
            self.loss_type,
            max_completion_length=self.max_completion_length,
            per_device_batch_size=self.args.per_device_train_batch_size,
            gradient_accumulation_steps=self.current_gradient_accumulation_steps,
            steps_per_generation=self.args.steps_per_generation,
            num_processes=self.accelerator.num_processes,
            num_items_in_batch=inputs.get("num_items_in_batch"),
        )

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
        authors_entropy = bool(self._authors_entropy_coef) and DEMO_ENTROPY_WEIGHT in inputs
        logps, entropies, _ = self._get_per_token_logps_and_entropies(
            model,
            input_ids,
            attention_mask,
            demo_ids.size(1),
            batch_size=self.args.per_device_train_batch_size,
            compute_entropy=srft or authors_entropy,
        )
        normalizer = self._rollout_normalizer(inputs)

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
        if authors_entropy:
            weights = demo_mask * inputs[DEMO_ENTROPY_WEIGHT][rows].unsqueeze(1)
            loss = loss - self._authors_entropy_bonus(entropies, weights, inputs)

        trained = demo_mask * (sft_weight > 0).unsqueeze(1)
        totals = self.accelerator.reduce(torch.stack([nll.detach().mul(trained).sum(), trained.sum()]), reduction="sum")
        if totals[1] > 0:
            self._metrics["train"]["hpt/sft_loss"].append((totals[0] / totals[1]).item())
        return loss
