"""The two-stage baseline HPT is compared with: SFT on the demonstrations, then GRPO from the SFT model.

    python examples/sft_then_grpo.py           # Qwen2.5-0.5B-Instruct on GSM8K (both from the Hub)
    python examples/sft_then_grpo.py --tiny    # CI: tiny local Llama, bundled toy task, 5 + 5 CPU steps, offline

Stage 1 trains `trl.SFTTrainer` on the prompt-completion dataset (the loss is on the completion only); stage 2 trains
`trl.GRPOTrainer` from the stage-1 weights on the same prompts, with the RL settings of HPT's RL term (Dr. GRPO, no
std scaling, no KL), so that the two runs differ only in how SFT and RL are combined. `HPTTrainer` does both in one
stage, per prompt; `HPTTrainer` with `gamma=-1` is exactly stage 2.
"""

import os
import sys

from trl import GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer
from trl.rewards import accuracy_reward

from hpt_trl.data import load_gsm8k

if "--tiny" not in sys.argv:
    model, output_dir = "Qwen/Qwen2.5-0.5B-Instruct", "Qwen2.5-0.5B-SFT-GRPO"
    dataset = load_gsm8k("train", conversational=True)  # columns: prompt, completion (demonstration), solution
    reward_funcs, sft_options, grpo_options = accuracy_reward, dict(num_train_epochs=1), {}
else:  # CI: a tiny Llama built locally, the bundled toy task (sums of three numbers), few CPU steps; nothing downloaded
    import tempfile

    from hpt_trl.tiny import save_tiny_model
    from hpt_trl.toy_task import build_toy_math_dataset, toy_answer_reward

    model, output_dir = save_tiny_model(tempfile.mkdtemp(prefix="tiny-llama-")), "tiny-sft-grpo"
    dataset = build_toy_math_dataset(conversational=True)["train"]
    reward_funcs = toy_answer_reward
    cpu = dict(max_steps=5, per_device_train_batch_size=8, learning_rate=3e-3, logging_steps=1, save_strategy="no",
               report_to="none", use_cpu=True, bf16=False)  # fmt: skip
    sft_options, grpo_options = cpu, dict(cpu, num_generations=4, max_completion_length=24)

# Stage 1: SFT on the demonstrations
sft_dir = os.path.join(output_dir, "sft")
sft_trainer = SFTTrainer(model=model, args=SFTConfig(output_dir=sft_dir, **sft_options), train_dataset=dataset)
sft_trainer.train()
sft_trainer.save_model()  # weights and tokenizer, for stage 2

# Stage 2: GRPO (Dr. GRPO, as HPT's RL term) from the SFT weights
grpo_dir = os.path.join(output_dir, "grpo")
grpo_args = GRPOConfig(output_dir=grpo_dir, loss_type="dr_grpo", scale_rewards="none", beta=0.0, **grpo_options)
grpo_trainer = GRPOTrainer(model=sft_dir, reward_funcs=reward_funcs, args=grpo_args, train_dataset=dataset)
grpo_trainer.train()
grpo_trainer.save_model()
grpo_trainer.save_state()  # trainer_state.json, for `hpt-trl plot OUTPUT_DIR/grpo`
