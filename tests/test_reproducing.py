"""The paper's runs step for step (docs/reproducing.md): the authors' packing of demonstrations and entropy, checked
against an oracle written from their code (tests/authors_oracle.py), the gradient-norm skip, and the paper recipes."""

import copy
import json
import random
from pathlib import Path

import authors_oracle
import pytest
import torch
import trl
from helpers import addition_dataset, mixed_reward, tiny_args
from test_modes import run_and_capture
from test_trainer import logged, make_trainer
from trl import ModelConfig

from hpt_trl import HPTConfig, HPTTrainer
from hpt_trl.balance import authors_packing, balanced_partitions, demonstration_sft_loss, rollout_normalizer
from hpt_trl.hpt_trainer import DEMO_IDS, DEMO_MASK, DEMO_SFT_WEIGHT, DEMONSTRATION_IDS_COLUMN
from hpt_trl.tiny import build_tiny_model, build_tiny_tokenizer
from hpt_trl.train import load_datasets, parse_args


@pytest.mark.parametrize("equal_size", [True, False])
def test_balanced_partitions_are_the_authors(equal_size):
    rng = random.Random(equal_size)
    for k in (2, 3, 8):
        lengths = [rng.choice([rng.randint(1, 50), 7, 7, 12]) for _ in range(8 * k)]  # ties on purpose
        expected = authors_oracle.get_seqlen_balanced_partitions(lengths, k, equal_size)
        assert balanced_partitions(lengths, k, equal_size) == expected


def _paper_batch(rng, num_gated, prompts=128, n=8, short=False):
    """Lengths of a generation batch of the paper's shape: prompt + response tokens per rollout, prompt order."""
    top = 1200 if short else 8192
    prompt_lengths = [rng.randint(40, 300) for _ in range(prompts)]
    responses = [rng.randint(20, top) for _ in range(prompts * n)]
    demos = [rng.randint(top // 4, top) for _ in range(num_gated)]
    gated = set(rng.sample(range(prompts), num_gated))
    return prompt_lengths, responses, demos, sorted(gated)


def _replay(prompt_lengths, responses, demos, gated, n, num_gpus, rows_per_mini_batch, max_tokens):
    rollout_lengths = [prompt_lengths[row // n] + r for row, r in enumerate(responses)]
    kept = [row // n not in gated for row in range(len(responses))]
    demo_lengths = [prompt_lengths[p] + d for p, d in zip(gated, demos)]
    ours = authors_packing(
        rollout_lengths,
        responses,
        kept,
        demo_lengths,
        demos,
        [True] * len(demos),
        num_gpus=num_gpus,
        rows_per_mini_batch=rows_per_mini_batch,
        max_tokens_per_gpu=max_tokens,
    )
    # the oracle: their order (kept rollouts, then the demonstrations), rows named by (kind, index)
    rows = [(("rollout", row), length) for row, length in enumerate(rollout_lengths) if kept[row]]
    rows += [(("demo", j), length) for j, length in enumerate(demo_lengths)]
    steps = authors_oracle.micro_batches(rows, num_gpus, rows_per_mini_batch, max_tokens)
    return ours, steps


@pytest.mark.parametrize("num_gated", [8, 32, 64])
def test_authors_packing_weights_match_the_oracle_at_the_papers_batch(num_gated):
    # 128 prompts x 8 rollouts on 8 GPUs, 64 rows per GPU per optimizer step, 32768 tokens per micro-batch
    rng = random.Random(num_gated)
    batch = _paper_batch(rng, num_gated)
    ours, steps = _replay(*batch, n=8, num_gpus=8, rows_per_mini_batch=64, max_tokens=32768)
    theirs = [micro for step in steps for gpu in step for micro in gpu]
    num_rollouts = len(batch[1])

    def name(row):
        return ("rollout", row) if row < num_rollouts else ("demo", row - num_rollouts)

    assert sorted(sorted(map(name, micro)) for micro in ours.micro_batches) == sorted(map(sorted, theirs))
    demos = batch[2]
    for micro in theirs:
        in_micro = [j for kind, j in micro if kind == "demo"]
        for j in in_micro:  # a demonstration's share of its micro-batch's SFT token mean
            assert ours.sft_weights[j] == pytest.approx(demos[j] / sum(demos[i] for i in in_micro))
    total = sum(ours.sft_weights)
    assert total <= num_gated  # demonstrations sharing a micro-batch share one unit of weight
    if num_gated >= 32:
        assert total < num_gated


@pytest.mark.parametrize("num_gated", [0, 5, 20])
def test_authors_loss_is_ours_times_rows_per_step_over_gpus(num_gated):
    # The authors' whole loss (SFT token mean per micro-batch, RL sum / max_response_length, entropy token mean per
    # micro-batch, averaged over the GPUs) on random per-token values equals, times R / G, our loss with the replayed
    # weights (R = rollouts per optimizer step in TRL, G = their GPUs), which is what makes max_grad_norm / 64 theirs
    rng = random.Random(num_gated)
    torch.manual_seed(num_gated)
    n, prompts, gpus, rows_per_mini_batch = 8, 32, 4, 32  # R = 2 steps x 128 rollouts, G = 4
    L, coef, sft_coef = 1200, 0.01, 0.3
    prompt_lengths, responses, demos, gated = _paper_batch(rng, num_gated, prompts=prompts, short=True)
    ours, steps = _replay(prompt_lengths, responses, demos, gated, n, gpus, rows_per_mini_batch, max_tokens=4096)

    def values(length):
        mask = torch.zeros(L, dtype=torch.float64)
        mask[:length] = 1
        return {
            "logp": -torch.rand(L, dtype=torch.float64),
            "pg": torch.randn(L, dtype=torch.float64),
            "entropy": torch.rand(L, dtype=torch.float64),
            "mask": mask,
        }

    rows = {("rollout", row): dict(values(r), sft=False) for row, r in enumerate(responses)}
    rows.update({("demo", j): dict(values(d), sft=True) for j, d in enumerate(demos)})
    oracle = authors_oracle.actor_loss(steps, rows, sft_coef, coef, L, gpus)

    R = gpus * rows_per_mini_batch  # our rollouts per optimizer step (one process: B * GA = R)
    N = rollout_normalizer(
        "dr_grpo",
        max_completion_length=L,
        per_device_batch_size=R,
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_processes=1,
    )
    kept = [row for row in range(len(responses)) if row // n not in gated]
    rl = sum((rows[("rollout", row)]["pg"] * rows[("rollout", row)]["mask"]).sum() for row in kept) / N
    entropy = sum(
        (rows[("rollout", row)]["entropy"] * rows[("rollout", row)]["mask"]).sum()
        / ours.rollout_micro_batch_tokens[row]
        for row in kept
    ) + sum(
        (rows[("demo", j)]["entropy"] * rows[("demo", j)]["mask"]).sum() / ours.demonstration_micro_batch_tokens[j]
        for j in range(len(demos))
    )
    total = rl - coef * entropy * L / N
    if demos:
        nll = torch.stack([-rows[("demo", j)]["logp"] for j in range(len(demos))])
        mask = torch.stack([rows[("demo", j)]["mask"] for j in range(len(demos))])
        weights = torch.tensor(ours.sft_weights, dtype=torch.float64)
        total = total + sft_coef * demonstration_sft_loss(nll * mask, mask, weights, L, N)
    assert (total * R / gpus).item() == pytest.approx(oracle.item(), rel=1e-9)


def _authors_gradient(trainer, model, output, steps, sft_coef, entropy_coeff, num_gpus):
    """The gradient of the oracle's loss on the trainer's own generation batch (rows named by their TRL index)."""
    L = trainer.args.max_completion_length
    ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
    mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
    logps, entropies, _ = trainer._get_per_token_logps_and_entropies(
        model, ids, mask, output["completion_ids"].size(1), compute_entropy=True
    )
    rows = {}
    for row in range(ids.size(0)):
        pg = -output["advantages"][row] * torch.exp(logps[row] - logps[row].detach())
        rows[("rollout", row)] = {
            "pg": pg,
            "logp": logps[row],
            "entropy": entropies[row],
            "mask": output["completion_mask"][row].double(),
            "sft": False,
        }
    for row in output[DEMO_MASK].any(dim=1).nonzero().squeeze(1).tolist():
        demo_ids, demo_mask = output[DEMO_IDS][row : row + 1], output[DEMO_MASK][row : row + 1]
        logp, entropy, _ = trainer._get_per_token_logps_and_entropies(
            model,
            torch.cat([output["prompt_ids"][row : row + 1], demo_ids], dim=1),
            torch.cat([output["prompt_mask"][row : row + 1], demo_mask], dim=1),
            demo_ids.size(1),
            compute_entropy=True,
        )
        rows[("demo", row)] = {"logp": logp[0], "entropy": entropy[0], "mask": demo_mask[0].double(), "sft": True}
    loss = authors_oracle.actor_loss(steps, rows, sft_coef, entropy_coeff, L, num_gpus)
    model.zero_grad()
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_trainer_update_is_the_authors_under_their_packing(tmp_path):
    # 6 prompts x 2 rollouts, the 3 odd ones never solved (gated); the authors' batch is the 6 kept rollouts and 3
    # demonstrations on 1 GPU, cut into 2 micro-batches of at most 60 tokens, so two demonstrations share one. One SGD
    # step of the trainer must be the authors' gradient over R / G = 12 / 1, SFT, RL and entropy together.
    sft_coef, entropy_coef, max_tokens = 0.7, 0.05, 60
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer).double()
    args = tiny_args(
        tmp_path,
        gamma=0.0,
        max_steps=1,
        per_device_train_batch_size=12,
        optim="sgd",
        learning_rate=1.0,
        max_grad_norm=0.0,
        num_generations=2,
        sft_loss_coef=sft_coef,
        entropy_coef=entropy_coef,
        sft_weighting="authors_packing",
        entropy_weighting="authors_packing",
        authors_num_gpus=1,
        authors_max_tokens_per_gpu=max_tokens,
    )
    trainer = HPTTrainer(
        model=model,
        reward_funcs=mixed_reward,
        args=args,
        train_dataset=addition_dataset(size=6),
        processing_class=tokenizer,
    )
    initial = copy.deepcopy(trainer.model)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    ((_, output),) = run_and_capture(trainer)
    update = torch.cat([(b - p.detach()).flatten() for p, b in zip(trainer.model.parameters(), before)])

    kept = output["tool_mask"].amax(dim=1) > 0
    demo_rows = output[DEMO_MASK].any(dim=1).nonzero().squeeze(1).tolist()
    lengths = (output["prompt_mask"].sum(1) + output["completion_mask"].sum(1)).tolist()
    rows = [(("rollout", r), lengths[r]) for r in range(len(lengths)) if kept[r]]
    rows += [(("demo", r), int(output["prompt_mask"][r].sum() + output[DEMO_MASK][r].sum())) for r in demo_rows]
    steps = authors_oracle.micro_batches(rows, 1, 12, max_tokens)
    micro = [m for step in steps for gpu in step for m in gpu]
    assert len(demo_rows) == 3 and len(micro) == 2
    assert output[DEMO_SFT_WEIGHT][demo_rows].sum().item() == pytest.approx(2.0)  # one unit per micro-batch

    oracle = _authors_gradient(trainer, initial, output, steps, sft_coef, entropy_coef, num_gpus=1)
    # TRL computes log-probabilities and entropies in float32 whatever the model dtype: float32 tolerances
    torch.testing.assert_close(update, oracle / 12, atol=1e-6 * oracle.abs().max().item(), rtol=1e-4)


def test_skip_update_above_grad_norm(tmp_path):
    def run(threshold, path):
        trainer = make_trainer(path, gamma=0.0, max_steps=2, skip_update_above_grad_norm=threshold, weight_decay=0.1)
        before = [p.detach().clone() for p in trainer.model.parameters()]
        trainer.train()
        changed = any(not torch.equal(p, b) for p, b in zip(trainer.model.parameters(), before))
        return changed, logged(trainer, "hpt/skipped_update"), logged(trainer, "grad_norm")

    changed, skipped, norms = run(1e-12, tmp_path / "skip")  # every update skipped: nothing moves, not even decay
    assert not changed and skipped == [1.0, 1.0] and min(norms) > 1e-12
    changed, skipped, _ = run(1e12, tmp_path / "keep")
    assert changed and skipped == [0.0, 0.0]
    changed, skipped, _ = run(float("inf"), tmp_path / "off")  # how the command line turns a recipe's skip off
    assert changed and skipped == []


@pytest.mark.parametrize(
    "options, message",
    [
        ({"sft_weighting": "authors"}, "sft_weighting"),
        ({"entropy_weighting": "authors_packing", "algorithm": "luffy"}, "algorithm='hpt'"),
        ({"authors_num_gpus": 0}, "authors_num_gpus"),
        ({"skip_update_above_grad_norm": -1.0}, "skip_update_above_grad_norm"),
    ],
)
def test_reproduction_options_are_checked(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        HPTConfig(output_dir=str(tmp_path), use_cpu=True, **options)


# The paper recipes, loaded through the CLI's parser, against the authors' run scripts (exp_scripts/train.sh for Qwen,
# train_llama.sh for LLaMA). The table of docs/reproducing.md lists these settings and names these tests.

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
AUTHORS_GPUS = 8
# name: (model, gamma, sft_loss_coef, their skip threshold MAX_GRAD_NORM or None)
PAPER_RUNS = {
    "qwen2.5-math-7b.yaml": ("Qwen/Qwen2.5-Math-7B", 0.0, 1.0, 80.0),
    "qwen2.5-math-1.5b.yaml": ("Qwen/Qwen2.5-Math-1.5B", 0.0, 0.3, 80.0),
    "llama-3.1-8b.yaml": ("meta-llama/Llama-3.1-8B", 0.25, 1.0, None),
}


def paper_recipe(name):
    # the GPU recipes ask for bf16, which this CPU machine lacks
    return parse_args(["--config", str(RECIPES / name), "--bf16", "false", "--use_cpu", "true"])


@pytest.mark.parametrize("name", sorted(PAPER_RUNS))
def test_paper_recipe_batching_is_two_optimizer_steps_per_generation_batch(name):
    _, args, _ = paper_recipe(name)
    n, processes = args.num_generations, AUTHORS_GPUS
    # train_batch_size=128 prompts x rollout.n=8 per generation batch, ppo_mini_batch_size=64 prompts per Adam step
    assert n == 8
    assert args.per_device_train_batch_size * args.steps_per_generation * processes == 128 * n
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps * processes == 64 * n
    assert args.num_iterations == 1  # ppo_epochs=1
    # trainer.total_training_steps=500 generation batches, save_freq=50
    assert args.max_steps == 500 * 2 and args.save_steps == 50 * 2


@pytest.mark.parametrize("name", sorted(PAPER_RUNS))
def test_paper_recipe_loss_gate_and_coefficients(name):
    script_args, args, model_args = paper_recipe(name)
    model, gamma, sft_loss_coef, _ = PAPER_RUNS[name]
    assert model_args.model_name_or_path == model and script_args.dataset_name == "openr1_math_46k"
    # switch gate on the number of solved rollouts (switch_gate=0 or 2 of 8), no middle band (switch_gate_off=gate)
    assert (args.algorithm, args.gate, args.gamma, args.gamma_off) == ("hpt", "switch", gamma, None)
    assert (args.success_threshold, args.sft_loss_coef, args.performance_reward) == (
        1.0,
        sft_loss_coef,
        "math_accuracy_reward",
    )
    # Dr. GRPO (grpo_use_std=False, loss_remove_token_mean=True), no KL, no clipping (loss_remove_clip=True): the ratio
    # is never clamped, since clamp(r, 1 - 1, 1 + 1e9) = r
    assert (args.loss_type, args.scale_rewards, args.beta, args.epsilon) == ("dr_grpo", "none", 0.0, 1.0)
    assert args.epsilon_high >= 1e9
    # entropy_coeff=0.001 and their SFT token mean, over their micro-batches (8 GPUs, 32768 tokens per micro-batch)
    assert (args.entropy_coef, args.entropy_weighting, args.sft_weighting) == (
        0.001,
        "authors_packing",
        "authors_packing",
    )
    assert (args.authors_num_gpus, args.authors_max_tokens_per_gpu) == (AUTHORS_GPUS, 32768)
    assert (args.max_completion_length, args.max_demonstration_length, args.temperature) == (8192, 8192, 1.0)
    # AdamW lr 5e-6 constant without warmup, weight decay 0.01 (veRL's default); no vLLM sampling correction
    assert (args.learning_rate, args.lr_scheduler_type.value, args.warmup_steps) == (5e-6, "constant", 0)
    assert args.optim.value.startswith("adamw_torch")  # torch AdamW (fused where available)
    assert (args.weight_decay, args.adam_beta1, args.adam_beta2) == (0.01, 0.9, 0.999)
    assert args.vllm_importance_sampling_correction is False


@pytest.mark.parametrize("name", sorted(PAPER_RUNS))
def test_paper_recipe_clipping_is_theirs_in_our_gradient_scale(name):
    # Their gradient of an optimizer step is R / G times ours (test_authors_loss_is_ours_times_rows_per_step_over_gpus):
    # R = rollouts per optimizer step here (TRL averages them), G = their GPUs (FSDP averages them)
    _, args, _ = paper_recipe(name)
    scale = args.per_device_train_batch_size * args.gradient_accumulation_steps * AUTHORS_GPUS / args.authors_num_gpus
    assert scale == 64
    assert args.max_grad_norm * scale == pytest.approx(1.0)  # grad_clip=1.0
    assert args.adam_epsilon * scale == pytest.approx(1e-8)  # torch AdamW's eps, so that Adam sees their gradient
    skip = PAPER_RUNS[name][3]
    assert args.skip_update_above_grad_norm == (None if skip is None else pytest.approx(skip / scale))
    # under DeepSpeed, which cannot skip, the command line turns it off
    _, args, _ = parse_args(
        ["--config", str(RECIPES / name), "--use_cpu", "true", "--skip_update_above_grad_norm", "inf"]
    )
    assert args.skip_update_above_grad_norm == float("inf")


def _fixture_row():
    return json.loads((FIXTURES / "openr1_math_46k.jsonl").read_text().splitlines()[0])


def _prompt_trainer(tmp_path, name, tokenizer):
    """A tiny trainer with the recipe's data and prompt settings, and the recipe's first fixture row's prompt."""
    script_args, args, _ = paper_recipe(name)
    script_args.dataset_name, script_args.data_files = None, str(FIXTURES / "openr1_math_46k.jsonl")
    dataset, _ = load_datasets(script_args, ModelConfig(model_name_or_path="tiny"))
    # one prompt per generation batch: the fixture file has 3 rows, fewer than tiny_args' 4-prompt batch
    config = tiny_args(
        tmp_path, gamma=args.gamma, chat_template_path=args.chat_template_path, per_device_train_batch_size=2
    )
    trainer = HPTTrainer(
        model=build_tiny_model(tokenizer),
        reward_funcs=mixed_reward,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    return trainer, dataset[0]


@pytest.mark.parametrize("name", ["qwen2.5-math-7b.yaml", "qwen2.5-math-1.5b.yaml"])
def test_qwen_recipe_prompts_are_the_authors_token_for_token(tmp_path, name):
    # Their prompt: the dataset's messages without the system one (data/prepare_train.py), the model's chat template
    # with the generation prompt, tokenized without special tokens (rl_dataset_with_target.py). TRL's Qwen2.5
    # template file stands in for the model's (Qwen2.5-Math's differs only in its default system text).
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = (Path(trl.__file__).parent / "chat_templates" / "qwen2_5.jinja").read_text()
    trainer, row = _prompt_trainer(tmp_path, name, tokenizer)
    raw = _fixture_row()
    assert raw["prompt"][0]["role"] == "system" and row["prompt"] == raw["prompt"][1:]
    text = tokenizer.apply_chat_template(raw["prompt"][1:], add_generation_prompt=True, tokenize=False)
    theirs = tokenizer(text, add_special_tokens=False)["input_ids"]
    ours = trainer._tokenize_prompts([row["prompt"]])[0][0]
    assert list(ours) == theirs
    assert "Your task is to follow" not in tokenizer.decode(ours)  # LUFFY's system prompt is gone


def test_llama_recipe_prompts_and_demonstrations_are_the_authors_token_for_token(tmp_path):
    # Their prompt: data.zero_temp.format(prompt=problem + data.suffix_prompt), tokenized without special tokens, so
    # without the BOS a LLaMA tokenizer adds; their demonstration: its tokens, then the EOS token
    from tokenizers.processors import TemplateProcessing

    tokenizer = build_tiny_tokenizer()
    tokenizer._tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.bos_token_id)]
    )
    assert tokenizer("x")["input_ids"][0] == tokenizer.bos_token_id  # as LLaMA-3.1's tokenizer does
    trainer, row = _prompt_trainer(tmp_path, "llama-3.1-8b.yaml", tokenizer)
    raw = _fixture_row()
    suffix = "\nPlease reason step by step, and put your final answer within \\boxed{}."
    text = "Question:\n{prompt}\nAnswer:\nLet's think step by step.".format(
        prompt=raw["prompt"][-1]["content"] + suffix
    )
    ours = trainer._tokenize_prompts([row["prompt"]])[0][0]
    assert list(ours) == tokenizer(text, add_special_tokens=False)["input_ids"]
    demonstration = trainer.train_dataset[0][DEMONSTRATION_IDS_COLUMN]
    content = raw["target"][0]["content"]
    assert demonstration == tokenizer(content, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def test_authors_packing_with_two_optimizer_steps_per_generation(tmp_path):
    # The recipes' layout in small: one generation batch of 4 prompts x 2 rollouts, 2 optimizer steps of 4 rollouts;
    # the replay cuts each of the authors' GPUs' rows into mini-batches of R / G = 4 / 2 = 2 rows
    trainer = make_trainer(
        tmp_path,
        gamma=0.0,
        max_steps=2,
        per_device_train_batch_size=4,
        steps_per_generation=2,
        gradient_accumulation_steps=1,
        entropy_coef=0.01,
        sft_weighting="authors_packing",
        entropy_weighting="authors_packing",
        authors_num_gpus=2,
        authors_max_tokens_per_gpu=1000,
    )
    assert trainer._authors_rows_per_mini_batch == 2
    ((_, output),) = run_and_capture(trainer)
    assert trainer.state.global_step == 2
    # 2 demonstrations and the 4 kept rollouts, padded to 8 rows and spread over 2 GPUs: each GPU's 3 rows make 2
    # mini-batches of one micro-batch each (1000 tokens); the oracle says which demonstrations share one
    kept = output["tool_mask"].amax(dim=1) > 0
    demo_rows = output[DEMO_MASK].any(dim=1).nonzero().squeeze(1).tolist()
    lengths = (output["prompt_mask"].sum(1) + output["completion_mask"].sum(1)).tolist()
    rows = [(("rollout", r), lengths[r]) for r in range(len(lengths)) if kept[r]]  # prompt order (before TRL's shuffle)
    rows += [(("demo", r), int(output["prompt_mask"][r].sum() + output[DEMO_MASK][r].sum())) for r in demo_rows]
    micro = [m for step in authors_oracle.micro_batches(rows, 2, 2, 1000) for gpu in step for m in gpu]
    assert len(demo_rows) == 2 and len(micro) == 4
    for m in micro:
        demos = [r for kind, r in m if kind == "demo"]
        tokens = sum(output[DEMO_MASK][r].sum().item() for r in demos)
        for r in demos:
            assert output[DEMO_SFT_WEIGHT][r].item() == pytest.approx(output[DEMO_MASK][r].sum().item() / tokens)
    total = output[DEMO_SFT_WEIGHT][demo_rows].sum().item()
    assert logged(trainer, "hpt/authors_sft_weight") == [pytest.approx(total)]


@pytest.mark.slow
def test_authors_packing_and_skip_under_two_ddp_processes(tmp_path):
    # The replay gathers the lengths of every process's rows; under 2 DDP processes (gloo) training must finish, both
    # processes taking the same decisions, with the packing replayed for 2 GPUs of 8 rows per optimizer step
    from test_distributed import run as run_worker

    options = [
        "--sft_weighting",
        "authors_packing",
        "--entropy_weighting",
        "authors_packing",
        "--entropy_coef",
        "0.01",
        "--authors_num_gpus",
        "2",
        "--authors_max_tokens_per_gpu",
        "64",
        "--skip_update_above_grad_norm",
        "1e6",
    ]
    results = run_worker(tmp_path, "ddp", *options)
    assert [r["num_processes"] for r in results] == [2, 2] and all(r["global_step"] == 3 for r in results)
    assert results[0]["gate_history"] == results[1]["gate_history"]
    logs = (tmp_path / "launch.log").read_text()  # the Trainer's printed logs
    assert logs.count("'hpt/authors_sft_weight'") == 3 and logs.count("'hpt/skipped_update': '0'") == 3
