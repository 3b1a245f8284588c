"""Test-only: let Accelerate run FSDP on CPU processes (gloo), so that CI without GPUs runs HPT under real FSDP.

What it stands in for: one decision in Accelerate 1.16, `AcceleratorState.__init__` (`accelerate/state.py`), which
switches the distributed type to `DistributedType.FSDP` when an FSDP plugin is given, but only from the GPU-like
multi-process types (`MULTI_GPU`, `MULTI_XPU`, `MULTI_NPU`, ...), never from `MULTI_CPU`. On a machine without GPUs an
FSDP config (examples/accelerate_configs/fsdp{1,2}.yaml) therefore silently runs DDP over gloo. `allow_fsdp_on_cpu()`
wraps that `__init__`: after it has run, when an FSDP plugin was given and the type is `MULTI_CPU`, it sets the type to
`FSDP` and keeps the plugin, as Accelerate does from `MULTI_GPU`, and sets the device to `cpu`. Everything
after that decision is Accelerate's and torch's own code: `Accelerator.prepare` wraps the model with FSDP1
(`FullyShardedDataParallel`) or FSDP2 (`fully_shard`: the parameters become `DTensor` shards), over the gloo process
group; the trainer sees `is_fsdp_enabled`; saving gathers the full state dict.

What it does not exercise: the CUDA/NCCL paths (NCCL collectives, CUDA streams and prefetching, bf16 mixed precision,
CPU offload of parameters, `cpu_ram_efficient_loading`, `sync_module_states`), which only a GPU run shows.

FSDP1 on CPU needs three more things that a GPU run does not:
- `fsdp_sync_module_states: false` and `fsdp_cpu_ram_efficient_loading: false`, given by the tests to `accelerate
  launch`: with `sync_module_states`, Accelerate's FSDP plugin asks for an accelerator device and fails at start-up;
- the device `cpu` set here: `MULTI_CPU`'s device is `cpu:0`, which FSDP1 rejects as `device_id` ("Inconsistent
  compute device and `device_id`: cpu vs cpu:0");
- no offload of gathered state dicts to CPU (`_never_offload_fsdp1_state_dicts_to_cpu`): with Accelerate's
  `offload_to_cpu=True`, process 0 crashes (SIGSEGV) while the model is gathered for saving (torch 2.13.0+cpu).

Used by `tests/distributed_worker.py --fsdp_on_cpu`, before the trainer builds its `Accelerator`.
"""

import torch
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

_PATCHED = "_hpt_fsdp_on_cpu"


def allow_fsdp_on_cpu() -> None:
    """Patch `AcceleratorState.__init__` (see the module docstring). Idempotent."""
    original = AcceleratorState.__init__
    if getattr(original, _PATCHED, False):
        return

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            # MULTI_CPU's device is `cpu:0` on every process; FSDP1 checks its `device_id` against `cpu`
            self.device = torch.device("cpu")
            if fsdp_plugin.fsdp_version == 1:
                _never_offload_fsdp1_state_dicts_to_cpu()
            # as Accelerate's `__init__` ends: later `PartialState()`s share the decision
            PartialState._shared_state.update(distributed_type=self.distributed_type, device=self.device)

    setattr(__init__, _PATCHED, True)
    AcceleratorState.__init__ = __init__


def _never_offload_fsdp1_state_dicts_to_cpu() -> None:
    """Accelerate gathers FSDP1 state dicts with `offload_to_cpu=True` (`Accelerator.get_state_dict` for the saved
    model, `save_fsdp_model` and `save_fsdp_optimizer` for checkpoints) through `FullyShardedDataParallel.
    state_dict_type`; on CPU processes process 0 then crashes (SIGSEGV) while saving. This makes `state_dict_type` turn
    the offload off for the model and the optimizer (on CPU there is nothing to offload to)."""
    original = FSDP.state_dict_type
    if getattr(original, _PATCHED, False):
        return

    def state_dict_type(module, state_dict_type, state_dict_config=None, optim_state_dict_config=None):
        for config in (state_dict_config, optim_state_dict_config):
            if getattr(config, "offload_to_cpu", False):
                config.offload_to_cpu = False
        return original(module, state_dict_type, state_dict_config, optim_state_dict_config)

    setattr(state_dict_type, _PATCHED, True)
    FSDP.state_dict_type = staticmethod(state_dict_type)
