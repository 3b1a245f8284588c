"""HPT with TRL: TRL's GRPO quick start, with three lines changed (marked `# HPT`).

    python examples/train_hpt.py           # Qwen2.5-0.5B-Instruct on GSM8K (both from the Hub), GRPOConfig defaults
    python examples/train_hpt.py --tiny    # CI: tiny local Llama, bundled toy task, 5 CPU steps, offline
    accelerate launch --config_file examples/accelerate_configs/ddp.yaml examples/train_hpt.py   # multi-GPU

The GRPO script it comes from differs only in the three `# HPT` lines:

    from trl import GRPOConfig, GRPOTrainer
    training_args = GRPOConfig(output_dir=output_dir, **options)
    trainer = GRPOTrainer(

HPT also trains on each prompt's demonstration, so the dataset needs one: a `completion` column next to `prompt` (TRL's
prompt-completion format, the same dataset `SFTTrainer` takes), plus `solution` for the reward. TRL's own example uses
`trl-lib/DeepMath-103K`, which has no demonstrations; GSM8K has them (`hpt_trl.data.load_gsm8k`).
"""

import sys

from trl.rewards import accuracy_reward

from hpt_trl import HPTConfig, HPTTrainer  # HPT (was: from trl import GRPOConfig, GRPOTrainer)
from hpt_trl.data import load_gsm8k

if "--tiny" not in sys.argv:
    model, output_dir = "Qwen/Qwen2.5-0.5B-Instruct", "Qwen2.5-0.5B-HPT"
    dataset = load_gsm8k("train", conversational=True)  # columns: prompt, completion (demonstration), solution
    reward_funcs, options = accuracy_reward, {}
else:  # CI: a tiny Llama built locally, the bundled toy task (sums of three numbers), 5 CPU steps; nothing downloaded
    import tempfile

    from hpt_trl.tiny import save_tiny_model
    from hpt_trl.toy_task import build_toy_math_dataset, toy_answer_reward

    model, output_dir = save_tiny_model(tempfile.mkdtemp(prefix="tiny-llama-")), "tiny-hpt"
    dataset = build_toy_math_dataset(conversational=True)["train"]
    reward_funcs = toy_answer_reward
    options = dict(max_steps=5, per_device_train_batch_size=8, num_generations=4, max_completion_length=24,
                   learning_rate=3e-3, logging_steps=1, save_strategy="no", report_to="none",
                   use_cpu=True, bf16=False)  # fmt: skip

training_args = HPTConfig(output_dir=output_dir, **options)  # HPT (was: GRPOConfig)
trainer = HPTTrainer(  # HPT (was: GRPOTrainer)
    model=model,
    reward_funcs=reward_funcs,
    args=training_args,
    train_dataset=dataset,
)
trainer.train()
trainer.save_model()
trainer.save_state()  # trainer_state.json, for `hpt-trl plot OUTPUT_DIR`
