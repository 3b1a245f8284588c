"""Run `hpt-trl train` with vLLM generation (or without) and write what tests/test_vllm.py checks, one JSON per process.

    python tests/vllm_worker.py --model_name_or_path MODEL --output_dir OUT --use_vllm true --vllm_mode colocate ...
    accelerate launch --config_file examples/accelerate_configs/ddp.yaml --num_processes 2 tests/vllm_worker.py ...

Runs in its own process: an in-process vLLM sets torch to one thread for the rest of the process. With `--use_vllm
true` it first applies the test-only CPU stand-ins of `tests/vllm_cpu_stand_ins.py`. Writes `OUT/worker_rank{RANK}.json`
with the per-step `hpt/sft_fraction`, the gate history, the logged metrics, and, with vLLM:

- `vllm_generate_calls`, `transformers_generate_calls`: how often each generated (the gate must run on vLLM's output);
- `completions_match`: per generation batch, whether the completion ids the trainer scored and trained on are vLLM's;
- `weight_syncs`: after every weight sync, the step and the largest difference between a parameter vLLM generates
  with and the trainer's (vLLM fuses q/k/v and gate/up projections: compared with the trainer's, concatenated).
"""

import json
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's default reserves most of the host's memory
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: ~5 s start instead of ~50

import torch  # noqa: E402

torch.set_num_threads(1)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hpt_trl import train  # noqa: E402
from hpt_trl.hpt_trainer import HPTTrainer  # noqa: E402

RECORD = {"vllm_generate_calls": 0, "transformers_generate_calls": 0, "completions_match": [], "weight_syncs": []}
VLLM_COMPLETIONS: list[list[list[int]]] = []

# vLLM's fused parameters: name part in vLLM -> the trainer's parameters it concatenates (along dim 0)
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def max_difference_to_vllm(trainer) -> tuple[float, int]:
    """The largest |vLLM parameter - trainer parameter| over vLLM's parameters, and how many were compared."""
    vllm_model = trainer.vllm_generation.llm.llm_engine.model_executor.driver_worker.model_runner.model
    ours = {name: p.detach() for name, p in trainer.accelerator.unwrap_model(trainer.model).named_parameters()}
    largest, compared = 0.0, 0
    for name, parameter in vllm_model.named_parameters():
        fused = next((part for part in FUSED if f".{part}." in name), None)
        if fused is None:
            expected = ours[name]
        else:
            expected = torch.cat([ours[name.replace(fused, part)] for part in FUSED[fused]])
        parameter = parameter.detach()[: expected.size(0)]  # vLLM pads the vocabulary rows of the embedding
        assert parameter.shape == expected.shape, (name, parameter.shape, expected.shape)
        largest = max(largest, (parameter.float() - expected.float()).abs().max().item())
        compared += 1
    return largest, compared


def install_spies() -> None:
    from transformers import GenerationMixin
    from trl.generation.vllm_generation import VLLMGeneration

    original_generate, original_sync = VLLMGeneration.generate, VLLMGeneration.sync_weights
    original_hf_generate = GenerationMixin.generate
    original_score = HPTTrainer._generate_and_score_completions

    def generate(self, *args, **kwargs):
        RECORD["vllm_generate_calls"] += 1
        result = original_generate(self, *args, **kwargs)
        VLLM_COMPLETIONS.append(result[1])
        return result

    def hf_generate(self, *args, **kwargs):
        RECORD["transformers_generate_calls"] += 1
        return original_hf_generate(self, *args, **kwargs)

    def score(self, inputs):
        output = original_score(self, inputs)
        if self.use_vllm and self.model.training:
            generated = VLLM_COMPLETIONS[-1]
            trained = [ids[mask.bool()].tolist() for ids, mask in zip(output["completion_ids"], output["completion_mask"])]
            RECORD["completions_match"].append(
                len(generated) == len(trained) and all(t == g[: len(t)] for t, g in zip(trained, generated))
            )
        return output

    def sync_weights(self):
        original_sync(self)
        if self.mode != "colocate":
            return
        trainer = TRAINER[0]
        largest, compared = max_difference_to_vllm(trainer)
        RECORD["weight_syncs"].append({"step": trainer.state.global_step, "max_abs_diff": largest, "compared": compared})

    VLLMGeneration.generate, VLLMGeneration.sync_weights = generate, sync_weights
    GenerationMixin.generate = hf_generate
    HPTTrainer._generate_and_score_completions = score


TRAINER: list = []


def main(argv=None):
    script_args, training_args, model_args = train.parse_args(argv)
    if training_args.use_vllm:
        import vllm_cpu_stand_ins

        vllm_cpu_stand_ins.apply()
        if training_args.vllm_mode == "server":
            vllm_cpu_stand_ins.apply_server_mode()
    install_spies()
    original_init = HPTTrainer.__init__

    def init(self, *args, **kwargs):
        TRAINER.append(self)
        original_init(self, *args, **kwargs)

    HPTTrainer.__init__ = init
    trainer = train.run(script_args, training_args, model_args)
    accelerator = trainer.accelerator
    history = trainer.state.log_history
    result = dict(
        RECORD,
        num_processes=accelerator.num_processes,
        backend=torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
        global_step=trainer.state.global_step,
        sft_fraction=[e["hpt/sft_fraction"] for e in history if "hpt/sft_fraction" in e],
        gate_history=trainer.gate_history,
        log_history=history,
    )
    with open(os.path.join(training_args.output_dir, f"worker_rank{accelerator.process_index}.json"), "w") as f:
        json.dump(result, f)
    train.finish(trainer)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
