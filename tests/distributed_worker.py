"""Run `hpt-trl train` with the given options and write what the distributed tests check, one JSON file per process.

    accelerate launch --config_file examples/accelerate_configs/zero3.yaml --num_processes 2 --mixed_precision no \
        tests/distributed_worker.py --config recipes/tiny_cpu.yaml --output_dir OUT [--key value ...]

Writes `OUT/worker_rank{RANK}.json` with the number of processes, the distributed type, the per-step `hpt/sft_fraction`,
the gate history (gathered prompt ids and decisions) and how the demonstration forward pass was run: through which
module, and, under ZeRO-3 and FSDP, whether the parameters were sharded before it and gathered during it.

`--fsdp_on_cpu` applies `tests/fsdp_on_cpu.py`, which lets Accelerate run an FSDP config on CPU
processes instead of silently falling back to DDP.
"""

import json
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

torch.set_num_threads(1)

from hpt_trl import train  # noqa: E402
from hpt_trl.hpt_trainer import HPTTrainer  # noqa: E402

DEMO_CALLS: list[dict] = []


def _probe_parameter(module):
    """A large weight of the model (a ZeRO-3 partitioned one: bigger than the persistence threshold)."""
    return max(module.parameters(), key=lambda p: getattr(p, "ds_numel", p.numel()))


def _local_numel(parameter) -> int:
    """The number of elements this process holds (an FSDP2 `DTensor` holds a shard)."""
    return parameter.to_local().numel() if isinstance(parameter, DTensor) else parameter.numel()


def _spy_demonstration_loss(original):
    def spy(self, model, inputs):
        unwrapped = self.accelerator.unwrap_model(model)
        weight = _probe_parameter(unwrapped)
        # FSDP: the first decoder layer (FSDP2 keeps the root module's own parameters, e.g. the embedding, gathered
        # from the forward pass to the backward pass; FSDP1 shards one flat parameter per layer, so a single weight
        # can lie whole on one process): the elements of its parameters this process holds before the demonstration
        # pass and during it (seen by the layer's forward pass, which FSDP gathers the layer for)
        layer = next(m for m in unwrapped.modules() if type(m).__name__.endswith("DecoderLayer"))
        record = {
            "module": type(model).__name__,
            "is_wrapped": model is not unwrapped,
            "zero3_param": hasattr(weight, "ds_id"),
            "numel_before": weight.numel(),
            "full_numel": getattr(weight, "ds_numel", weight.numel()),
            "numels_during": [],
            "layer_dtensor": [isinstance(p, DTensor) for p in layer.parameters()],
            "layer_numel_before": sum(_local_numel(p) for p in layer.parameters()),
            "layer_numels_during": [],
            "layer_dtensor_during": [],
        }

        def record_layer(module, args):
            record["layer_numels_during"].append(sum(_local_numel(p) for p in module.parameters()))
            record["layer_dtensor_during"].append([isinstance(p, DTensor) for p in module.parameters()])

        # The embedding's forward sees the parameters as they are during the demonstration forward pass
        embedding = unwrapped.get_input_embeddings()
        handle = embedding.register_forward_pre_hook(lambda m, a: record["numels_during"].append(weight.numel()))
        layer_handle = layer.register_forward_pre_hook(record_layer)
        try:
            loss = original(self, model, inputs)
        finally:
            handle.remove()
            layer_handle.remove()
        DEMO_CALLS.append(record)
        return loss

    return spy


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--fsdp_on_cpu" in argv:
        from fsdp_on_cpu import allow_fsdp_on_cpu

        argv.remove("--fsdp_on_cpu")
        allow_fsdp_on_cpu()
    HPTTrainer._demonstration_loss = _spy_demonstration_loss(HPTTrainer._demonstration_loss)
    script_args, training_args, model_args = train.parse_args(argv)
    trainer = train.run(script_args, training_args, model_args)
    accelerator = trainer.accelerator
    fsdp = str(accelerator.distributed_type) == "DistributedType.FSDP"
    result = {
        "num_processes": accelerator.num_processes,
        "process_index": accelerator.process_index,
        "distributed_type": str(accelerator.distributed_type),
        "deepspeed_zero_stage": (
            accelerator.state.deepspeed_plugin.zero_stage if accelerator.state.deepspeed_plugin is not None else None
        ),
        "fsdp_version": accelerator.state.fsdp_plugin.fsdp_version if fsdp else None,
        "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
        "global_step": trainer.state.global_step,
        "sft_fraction": [e["hpt/sft_fraction"] for e in trainer.state.log_history if "hpt/sft_fraction" in e],
        "gate_history": trainer.gate_history,
        "is_fsdp_enabled": trainer.is_fsdp_enabled,
        "all_dtensor_after_training": all(isinstance(p, DTensor) for p in trainer.model_wrapped.parameters()),
        "demonstration_calls": DEMO_CALLS,
        "skip_zero_loss_rows": trainer._skip_zero_loss_rows,
        "skipped_rows_fraction": [
            e["hpt/skipped_rows_fraction"] for e in trainer.state.log_history if "hpt/skipped_rows_fraction" in e
        ],
    }
    with open(os.path.join(training_args.output_dir, f"worker_rank{accelerator.process_index}.json"), "w") as f:
        json.dump(result, f)
    train.finish(trainer)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
