import copy
import math
import numbers
import os
from dataclasses import dataclass, field

from trl import GRPOConfig

from .balance import check_loss_type
from .redaction import redacted_arguments, without_secret_kwargs


def check_gamma(gamma: float) -> None:
    """Raise a `ValueError` unless `gamma` is a real number (NaN would silently disable the gate)."""
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real) or math.isnan(gamma):
        raise ValueError(
            f"`gamma` must be a real number, got {gamma!r}. A prompt whose performance P satisfies P <= gamma is "
            "trained with SFT on its demonstration; use gamma < 0 to never gate and gamma >= 1 to always gate."
        )


# Integer settings that a YAML recipe may spell as floats (`num_generations: 2.0`): a whole float is taken as the integer,
# a fractional one is refused before anything loads
INTEGER_FIELDS = (
    "max_steps",
    "num_generations",
    "max_demonstration_length",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "max_completion_length",
    "max_prompt_length",
    "generation_batch_size",
    "steps_per_generation",
    "num_iterations",
    "seed",
)


def _check_integer_fields(config) -> None:
    for name in INTEGER_FIELDS:
        value = getattr(config, name, None)
        if value is None or isinstance(value, bool) or isinstance(value, numbers.Integral):
            continue
        if isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer():
            setattr(config, name, int(value))
        else:
            raise ValueError(f"`{name}` must be an integer, got {value!r}.")


def _check_finite(name: str, value, minimum: float | None = None, strictly: bool = False) -> None:
    """Raise a `ValueError` naming `name` unless `value` is a finite real number (above `minimum`, if given)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok and minimum is not None:
        ok = value > minimum if strictly else value >= minimum
    if not ok:
        bound = "" if minimum is None else f" {'>' if strictly else '>='} {minimum}"
        raise ValueError(f"`{name}` must be a finite number{bound}, got {value!r}.")


ALGORITHMS = ("hpt", "sft", "grpo", "luffy", "srft")
PACKING_RULES = {
    "sft_weighting": ("per_demonstration", "authors_packing"),
    "entropy_weighting": ("trl", "authors_packing"),
}
GATES = ("switch", "linear")


@dataclass
class HPTConfig(GRPOConfig):
    r"""
    Configuration class for the [`HPTTrainer`].

    [`HPTConfig`] inherits every parameter from [`~trl.GRPOConfig`] and only changes three defaults to the settings of
    the HPT paper ([Towards a Unified View of Large Language Model Post-Training](https://huggingface.co/papers/2509.04419)):
    the RL term is Dr. GRPO, i.e. `loss_type="dr_grpo"` (constant length normalizer) with `scale_rewards="none"` (no
    std scaling of the advantages), and no KL penalty (`beta=0.0`).

    For each prompt, HPT samples `num_generations` rollouts, scores them, and computes the prompt's performance P, the
    share of its rollouts that succeeded. A prompt with `P <= gamma` is trained with SFT on its demonstration (alpha=0,
    beta=1 in the paper's Algorithm 1): its rollouts leave the RL loss and its demonstration enters as one row that
    weighs as much as one full-length rollout with advantage 1, as in the authors' code. Every other prompt is trained
    with the RL loss (alpha=1, beta=0).

    Parameters:
        gamma (`float`, *optional*, defaults to `0.0`):
            Gate threshold. A prompt with performance `P <= gamma` is trained with SFT on its demonstration, otherwise
            with RL. With 0/1 rewards, `0.0` means "SFT only when every rollout failed" (the paper's Qwen setting) and
            `0.25` with 8 rollouts means "at most 2 correct" (its LLaMA setting). `gamma < 0` never gates (pure
            GRPO), `gamma >= 1` always gates (pure SFT). P is compared with a tolerance of `1e-6`.
        sft_loss_coef (`float`, *optional*, defaults to `1.0`):
            Coefficient of the SFT term, with the authors' meaning: a gated prompt's demonstration (its token-mean
            NLL) weighs `sft_loss_coef` times one full-length rollout with advantage 1 under the RL term's normalizer.
            The authors use 1.0, and 0.3 for Qwen2.5-Math-1.5B.
        demonstration_column (`str`, *optional*, defaults to `"completion"`):
            Dataset column holding each prompt's demonstration: a string, or a conversational list of messages such as
            `[{"role": "assistant", "content": "..."}]`. The default follows TRL's prompt-completion convention, so
            the same dataset serves [`~trl.SFTTrainer`] and [`HPTTrainer`].
        performance_reward (`str` or `None`, *optional*, defaults to `None`):
            Name of the correctness reward, the reward function that defines success (see `reward_func_names` on the
            trainer, e.g. `"math_accuracy_reward"`). With one reward function, it is that one. With several and
            `None`, the trainer picks the one known verifier among them (`math_accuracy_reward`, `accuracy_reward`,
            `reasoning_accuracy_reward`) and logs it; without exactly one, it stops at construction with the list of
            names where training reads P (see `uses_performance`), and does not compute P elsewhere. Other reward
            functions (format bonuses, ...) still shape the RL advantages but never P.
        success_threshold (`float` or `None`, *optional*, defaults to `None`):
            A rollout succeeded when its correctness reward is `>= success_threshold`. P is the share of a prompt's
            scored rollouts that succeeded (a `None` reward leaves a rollout unscored); a prompt with no scored
            rollout has P = NaN and is not gated, unless `gamma >= 1`. The same rule splits SRFT's positive and
            negative rollouts. `None` means `1.0` for a reward function (a 0/1 or -1/+1 verifier); a reward model as
            the correctness reward scores arbitrary reals, so where P is read (see `uses_performance`) it needs an
            explicit value, or the trainer stops before loading the model.
        max_demonstration_length (`int` or `None`, *optional*, defaults to `None`):
            Maximum number of demonstration tokens (the prompt is not counted). Longer demonstrations are truncated,
            with a one-time warning at construction that says how many. `None` keeps them whole.

        allow_missing_demonstrations (`bool`, *optional*, defaults to `False`):
            Accept rows whose demonstration is missing (`None`, an empty string or list): such a prompt is never
            gated (its rollouts stay on RL whatever P) and trains no demonstration; `hpt/missing_demonstration_fraction`
            counts them. Without it, a missing demonstration is an error at construction naming the row.

        > Baselines and feedback functions (see `docs/upge.md`)

        algorithm (`str`, *optional*, defaults to `"hpt"`):
            Post-training algorithm, all on the same data pipeline so that the paper's comparison is one flag:
            - `"hpt"`: the gate below;
            - `"sft"`: SFT on every demonstration (rollouts are still sampled and scored, for the reward metric);
            - `"grpo"`: RL only (TRL's loss, no demonstration);
            - `"luffy"`: each prompt's demonstration replaces one of its rollouts as an off-policy member of the group
              (advantage over the `n-1` rollouts plus the demonstration), trained with LUFFY's policy shaping
              `pi/(pi+luffy_shaping_gamma)` and no clip;
            - `"srft"`: SFT on every demonstration weighted by `0.5*exp(-H)` and RL on the rollouts with advantage
              `0.1*exp(H)` for correct ones and `-1` for the others (SRFT's entropy-aware weighting, H the policy's
              mean token entropy on the sequence).
        gate (`str`, *optional*, defaults to `"switch"`):
            Feedback function `(alpha, beta) = (f(P), g(P))` of `algorithm="hpt"`: `"switch"` (the paper: `(0, 1)` if
            `P <= gamma`, else `(1, 0)`) or `"linear"` (`beta` falls linearly from 1 at `P <= gamma` to 0 at
            `P >= gate_linear_upper`, `alpha = 1 - beta`). A callable can be passed to the trainer as
            `gate_function`.
        gate_linear_upper (`float`, *optional*, defaults to `0.5`):
            Upper threshold of the `"linear"` gate.
        gamma_off (`float` or `None`, *optional*, defaults to `None`):
            The authors' middle band (`switch_gate_off`): a prompt with `gamma < P <= gamma_off` drops all its
            rollouts, and its demonstration, alone in its group, is trained with off-policy RL: advantage
            `demonstration_reward` (veRL gives a one-member group its score), LUFFY's shaping
            `p/(p+luffy_shaping_gamma)`, no clip, weighed as one rollout. `None` disables the band (the authors'
            scripts use `switch_gate_off=0`, i.e. no band).
        demonstration_reward (`float`, *optional*, defaults to `1.0`):
            Reward of a demonstration (its verifier score): its advantage in the middle band, and its combined reward
            as a member of a LUFFY group.
        luffy_shaping_gamma (`float`, *optional*, defaults to `0.1`):
            LUFFY's policy-shaping constant.

        overwrite_output_dir (`bool`, *optional*, defaults to `False`):
            Let a fresh run (no `resume_from_checkpoint`) start in an `output_dir` that holds checkpoints of an earlier
            run: they are deleted first. Without it, such a run stops with an error, so that a later
            `resume_from_checkpoint: last` never picks up another run's checkpoint (see `docs/reliability.md`).

        > Speed

        skip_zero_loss_rows (`bool` or `None`, *optional*, defaults to `None`):
            Skip the forward and backward pass over rollouts whose RL loss is exactly zero: zero advantage (e.g. a
            group that scored all 0 or all 1) or removed by the gate. The update is unchanged (TRL's normalizers are
            kept). It is exact only with `beta=0.0`, no entropy bonus, `top_entropy_quantile=1.0`, a `loss_type` whose
            normalizer does not count the skipped rows (not `"bnpo"`; `"vespo"` is not verified) and a dense model
            (not a mixture-of-experts router loss, `output_router_logits`). On one process (without DeepSpeed or
            FSDP) a micro-batch with nothing to train runs no forward pass at all; on several processes each runs the
            largest kept-row count of any process, topped up with zero-loss rows, so that their passes stay in step.
            `None` (default): on wherever it applies, off elsewhere with one info line that says why; `True`: on, and
            an error where it is not exact; `False`: off. While it is on, TRL's rollout metrics computed in the loss
            (`entropy`, `clip_ratio/*`, ...) describe the rows that were run, so they are logged as
            `hpt/kept_rows/<name>` instead (entropy missing where no row was run).

        > Reproducing the authors' runs (see `docs/reproducing.md`)

        sft_weighting (`str`, *optional*, defaults to `"per_demonstration"`):
            How much a gated prompt's demonstration weighs. `"per_demonstration"`: each weighs `sft_loss_coef`
            full-length rollouts with advantage 1, whatever the batching (split-invariant). `"authors_packing"`: the
            authors' weight under their packing, where the SFT term is a token mean over the demonstrations of one
            micro-batch, so demonstrations that share a micro-batch share one unit of weight; which share one is
            replayed from the generation batch's lengths with their token-balanced partitions over
            `authors_num_gpus` GPUs and `authors_max_tokens_per_gpu` tokens per micro-batch (`hpt_trl.balance`).
            Only with `algorithm="hpt"`.
        entropy_weighting (`str`, *optional*, defaults to `"trl"`):
            `"trl"`: TRL's entropy bonus (`entropy_coef` times a token mean over the micro-batch's rollout tokens in the
            loss). `"authors_packing"`: the authors' bonus, `entropy_coef` times a token mean over all response tokens
            of each of their micro-batches (kept rollouts and demonstrations, replayed as for `sft_weighting`), in the
            RL term's scale (a micro-batch's mean weighs as one full-length rollout). Only with `algorithm="hpt"`.
        authors_num_gpus (`int`, *optional*, defaults to `8`):
            Data-parallel size of the authors' run that `"authors_packing"` replays.
        authors_max_tokens_per_gpu (`int`, *optional*, defaults to `32768`):
            Their `ppo_max_token_len_per_gpu` (tokens per micro-batch with `use_dynamic_bsz`).
        skip_update_above_grad_norm (`float` or `None`, *optional*, defaults to `None`):
            Skip an optimizer step (no parameter, moment or weight-decay update) when the gradient norm before
            clipping is above this value, as the authors' Qwen2.5-Math-7B run does (`max_grad_norm=80` there, in their
            gradient scale). `None` or `inf` (`--skip_update_above_grad_norm inf` on the command line): never skip.
            Not with DeepSpeed (it clips and steps itself).
        chat_template_path (`str` or `None`, *optional*, defaults to `None`):
            A Jinja chat template file that replaces the tokenizer's: conversational prompts (and the end-of-turn token
            of demonstrations) are rendered with it. The LLaMA recipe uses it for the authors' scaffold
            `Question:\n{problem}\nPlease reason step by step...\nAnswer:\nLet's think step by step.` without a BOS
            token (their prompts are tokenized without special tokens). `None`: the tokenizer's template.
    """

    # Paper defaults for the RL term (Dr. GRPO, no KL)
    loss_type: str = field(
        default="dr_grpo",
        metadata={"help": "Loss of the RL term. HPT uses Dr. GRPO ('dr_grpo'); any GRPOConfig loss type works."},
    )
    scale_rewards: str = field(
        default="none",
        metadata={"help": "Advantage scaling. HPT (Dr. GRPO) uses 'none': no std scaling."},
    )
    beta: float = field(default=0.0, metadata={"help": "KL coefficient. HPT uses 0.0."})

    # HPT parameters
    gamma: float = field(
        default=0.0,
        metadata={
            "help": "Gate threshold: a prompt with performance P <= gamma is trained with SFT on its demonstration, "
            "otherwise with RL. gamma < 0 never gates, gamma >= 1 always gates."
        },
    )
    sft_loss_coef: float = field(
        default=1.0,
        metadata={"help": "Coefficient of the SFT term: a demonstration weighs this many full-length rollouts."},
    )
    demonstration_column: str = field(
        default="completion",
        metadata={"help": "Dataset column holding each prompt's demonstration (text or assistant messages)."},
    )
    performance_reward: str | None = field(
        default=None,
        metadata={
            "help": "Name of the correctness reward that defines success. Default: the only reward function, or the "
            "one known verifier among several."
        },
    )
    success_threshold: float | None = field(
        default=None,
        metadata={
            "help": "A rollout succeeded when its correctness reward is >= this value. Default: 1.0 for a reward "
            "function; a reward model needs an explicit value."
        },
    )
    max_demonstration_length: int | None = field(
        default=None,
        metadata={"help": "Truncate demonstrations to this many tokens (with a one-time warning). None: no limit."},
    )

    algorithm: str = field(
        default="hpt", metadata={"help": "One of 'hpt', 'sft', 'grpo', 'luffy', 'srft'.", "choices": ALGORITHMS}
    )
    gate: str = field(
        default="switch", metadata={"help": "HPT feedback function: 'switch' or 'linear'.", "choices": GATES}
    )
    gate_linear_upper: float = field(default=0.5, metadata={"help": "Upper threshold of the 'linear' gate."})
    gamma_off: float | None = field(
        default=None,
        metadata={
            "help": "Middle band: gamma < P <= gamma_off drops the rollouts and trains the demonstration off-policy."
        },
    )
    demonstration_reward: float = field(default=1.0, metadata={"help": "Reward of a demonstration in a group."})
    luffy_shaping_gamma: float = field(default=0.1, metadata={"help": "LUFFY's policy-shaping constant."})
    allow_missing_demonstrations: bool = field(
        default=False,
        metadata={"help": "Accept prompts without a demonstration (None or empty): they are never gated."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start a fresh run in an output_dir that holds checkpoints of an earlier run, deleting them. "
            "Without it, such a run stops with an error."
        },
    )
    skip_zero_loss_rows: bool | None = field(
        default=None,
        metadata={
            "help": "Skip forward/backward over rollouts whose RL loss is exactly zero (same update). Default: on "
            "wherever exact."
        },
    )

    # Reproducing the authors' runs (docs/reproducing.md); kept as one block
    sft_weighting: str = field(
        default="per_demonstration",
        metadata={
            "help": "'per_demonstration' (each demonstration weighs sft_loss_coef full-length rollouts) or "
            "'authors_packing' (the authors' token mean over the demonstrations of each of their micro-batches).",
            "choices": PACKING_RULES["sft_weighting"],
        },
    )
    entropy_weighting: str = field(
        default="trl",
        metadata={
            "help": "'trl' (TRL's entropy bonus) or 'authors_packing' (entropy_coef times a token mean over all "
            "response tokens, demonstrations included, of each of the authors' micro-batches).",
            "choices": PACKING_RULES["entropy_weighting"],
        },
    )
    authors_num_gpus: int = field(
        default=8, metadata={"help": "GPUs of the authors' run replayed by 'authors_packing'."}
    )
    authors_max_tokens_per_gpu: int = field(
        default=32768, metadata={"help": "Tokens per micro-batch of the authors' run (ppo_max_token_len_per_gpu)."}
    )
    skip_update_above_grad_norm: float | None = field(
        default=None,
        metadata={"help": "Skip the optimizer step when the gradient norm before clipping is above this. None: never."},
    )
    chat_template_path: str | None = field(
        default=None,
        metadata={"help": "Jinja chat template file that replaces the tokenizer's for prompts and demonstrations."},
    )

    def __post_init__(self):
        _check_integer_fields(self)  # before GRPOConfig does arithmetic with them
        if self.max_steps == 0:
            raise ValueError(
                "`max_steps=0` would train nothing (transformers then falls back on num_train_epochs). Set max_steps > 0, "
                "or -1 to train for num_train_epochs."
            )
        super().__post_init__()
        self._check_reproduction_options()
        check_gamma(self.gamma)
        # NaN, inf or negative values here train silently wrong (a negative SFT coefficient is gradient ascent)
        _check_finite("sft_loss_coef", self.sft_loss_coef, minimum=0.0)
        _check_finite("gate_linear_upper", self.gate_linear_upper)
        _check_finite("demonstration_reward", self.demonstration_reward)
        _check_finite("luffy_shaping_gamma", self.luffy_shaping_gamma, minimum=0.0, strictly=True)
        # TRL divides the logits by it and samples with it: 0 or less fails inside `generate`
        _check_finite("temperature", self.temperature, minimum=0.0, strictly=True)
        if self.gamma_off is not None:
            _check_finite("gamma_off", self.gamma_off)
            if self.gamma < 0:
                raise ValueError(
                    f"`gamma_off={self.gamma_off}` with `gamma={self.gamma}` is contradictory: gamma < 0 means never "
                    "gate, but the middle band gamma < P <= gamma_off would train demonstrations. Set gamma >= 0 or "
                    "gamma_off=None."
                )
        for index, weight in enumerate(self.reward_weights or []):
            _check_finite(f"reward_weights[{index}]", weight)
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"`algorithm` must be one of {ALGORITHMS}, got {self.algorithm!r}.")
        if self.gate not in GATES:
            raise ValueError(
                f"`gate` must be one of {GATES} (or pass `gate_function` to the trainer), got {self.gate!r}."
            )
        if self.gate == "linear" and not self.gate_linear_upper > self.gamma:
            raise ValueError(
                f"`gate_linear_upper` ({self.gate_linear_upper}) must be greater than `gamma` ({self.gamma})."
            )
        if self.skip_zero_loss_rows and self.inexact_skipping_reasons:
            raise ValueError(
                "`skip_zero_loss_rows=True` keeps the update exact only when a zero-advantage row contributes nothing, "
                f"which is not the case with {self.inexact_skipping_reasons}. Leave it at None to skip only where exact."
            )
        if self.gamma_off is not None and not self.gamma_off > self.gamma:
            raise ValueError(f"`gamma_off` ({self.gamma_off}) must be greater than `gamma` ({self.gamma}).")
        if self.success_threshold is not None and not math.isfinite(self.success_threshold):
            raise ValueError(f"`success_threshold` must be a finite number, got {self.success_threshold!r}.")
        check_loss_type(self.loss_type, self.trains_demonstrations)
        if self.algorithm == "luffy" and self.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError(
                "algorithm='luffy' computes the advantages of a group of rollouts plus the demonstration as TRL does "
                "with multi_objective_aggregation='sum_then_normalize'; with 'normalize_then_sum' a demonstration would "
                "need a score from every reward function, which it does not have."
            )
        if self.max_demonstration_length is not None and self.max_demonstration_length < 1:
            raise ValueError(
                f"`max_demonstration_length` must be positive or None, got {self.max_demonstration_length}."
            )

    # Tokens (`hub_token`) stay usable in the running process but are never written: transformers' Trainer pickles the
    # arguments into `training_args.bin` (`Trainer._save`, `_push_from_checkpoint`, 5.25), in output_dir, every
    # checkpoint and the Hub. A copy keeps them; a pickle drops them; `repr` shows transformers' redacted form.
    def __getstate__(self):
        return redacted_arguments(self.__dict__)

    def __copy__(self):
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        return clone

    def __deepcopy__(self, memo):
        clone = object.__new__(type(self))
        memo[id(self)] = clone
        clone.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return clone

    def to_dict(self):  # transformers already writes `<HUB_TOKEN>` for the `_token` fields
        return without_secret_kwargs(super().to_dict())

    def __repr__(self):  # the dataclass `repr` would print every field, tokens included
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in sorted(self.to_dict().items()))})"

    __str__ = __repr__

    def _check_reproduction_options(self) -> None:
        """The options of `docs/reproducing.md` (one block, apart from the other checks)."""
        for name, allowed in PACKING_RULES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"`{name}` must be one of {allowed}, got {getattr(self, name)!r}.")
            if getattr(self, name) == "authors_packing" and self.algorithm != "hpt":
                raise ValueError(
                    f"`{name}='authors_packing'` replays the authors' HPT batching; it needs algorithm='hpt', got "
                    f"{self.algorithm!r}."
                )
        for name in ("authors_num_gpus", "authors_max_tokens_per_gpu"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        threshold = self.skip_update_above_grad_norm
        if threshold is not None and threshold != math.inf:  # inf: never skip (how the command line turns it off)
            _check_finite("skip_update_above_grad_norm", threshold, minimum=0.0, strictly=True)
        if self.chat_template_path is not None and not os.path.isfile(self.chat_template_path):
            raise ValueError(f"`chat_template_path` {self.chat_template_path!r} is not a file.")

    @property
    def trains_demonstrations(self) -> bool:
        """Whether this configuration can put demonstrations in the loss."""
        never_gated = self.algorithm == "hpt" and self.gamma < 0 and self.gate == "switch" and self.gamma_off is None
        return self.algorithm != "grpo" and not never_gated

    @property
    def uses_performance(self) -> bool:
        """Whether training reads P, so that a correctness reward (and its success threshold) must be known. Pure RL
        (`algorithm="grpo"`, or the switch with `gamma < 0`), pure SFT (`algorithm="sft"`, or the switch with
        `gamma >= 1`) and LUFFY (which uses the combined reward) never do; a trainer's `gate_function` always does."""
        if self.algorithm == "srft":
            return True
        if self.algorithm != "hpt":
            return False
        return self.gate != "switch" or 0 <= self.gamma < 1

    @property
    def inexact_skipping_reasons(self) -> list[str]:
        """The settings under which skipping zero-loss rows would change the update (the model is checked by the
        trainer)."""
        conflicts = {
            "beta != 0": self.beta != 0.0,
            "an entropy bonus": self.entropy_coef != 0.0 or self.use_adaptive_entropy,
            "top_entropy_quantile < 1": self.top_entropy_quantile < 1.0,
            "loss_type='bnpo'": self.loss_type == "bnpo",
            "loss_type='vespo' (not verified)": self.loss_type == "vespo",
        }
        return [name for name, bad in conflicts.items() if bad]
