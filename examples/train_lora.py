"""HPT with a LoRA adapter: `examples/train_hpt.py` plus a `peft_config`, exactly as with TRL's `GRPOTrainer`.

    python examples/train_lora.py           # Qwen2.5-0.5B-Instruct + LoRA on GSM8K (both from the Hub)
    python examples/train_lora.py --tiny    # CI: tiny local Llama + LoRA, bundled toy task, 5 CPU steps, offline

Only the adapter is trained and saved (`OUTPUT_DIR/adapter_model.safetensors`); load it with
`peft.AutoPeftModelForCausalLM.from_pretrained(OUTPUT_DIR)`, or merge it with `model.merge_and_unload()`.
LoRA usually wants about 10x the learning rate of full fine-tuning (GRPOConfig's default is 1e-6).
"""

import sys

from peft import LoraConfig
from trl.rewards import accuracy_reward

from hpt_trl import HPTConfig, HPTTrainer
from hpt_trl.data import load_gsm8k

if "--tiny" not in sys.argv:
    model, output_dir = "Qwen/Qwen2.5-0.5B-Instruct", "Qwen2.5-0.5B-HPT-LoRA"
    dataset = load_gsm8k("train", conversational=True)  # columns: prompt, completion (demonstration), solution
    reward_funcs, options = accuracy_reward, dict(learning_rate=1e-5)
else:  # CI: a tiny Llama built locally, the bundled toy task (sums of three numbers), 5 CPU steps; nothing downloaded
    import tempfile

    from hpt_trl.tiny import save_tiny_model
    from hpt_trl.toy_task import build_toy_math_dataset, toy_answer_reward

    model, output_dir = save_tiny_model(tempfile.mkdtemp(prefix="tiny-llama-")), "tiny-hpt-lora"
    dataset = build_toy_math_dataset(conversational=True)["train"]
    reward_funcs = toy_answer_reward
    options = dict(max_steps=5, per_device_train_batch_size=8, num_generations=4, max_completion_length=24,
                   learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to="none",
                   use_cpu=True, bf16=False)  # fmt: skip

training_args = HPTConfig(output_dir=output_dir, **options)
trainer = HPTTrainer(
    model=model,
    reward_funcs=reward_funcs,
    args=training_args,
    train_dataset=dataset,
    peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"),
)
trainer.train()
trainer.save_model()  # the adapter only
trainer.save_state()  # trainer_state.json, for `hpt-trl plot OUTPUT_DIR`
