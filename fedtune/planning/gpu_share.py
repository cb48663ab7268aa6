"""How much of a GPU each simulated client asks Ray for (``fedtune simulate``, and
what ``fedtune plan`` says): Ray hides the GPUs from a client that asks for none, so
``model.device = "auto"`` with ``simulation.gpus_per_client = 0`` would mean CPU on a
GPU machine. There a client gets instead the share that the memory estimate
(``fedtune.model.memory``) allows; the run records it (``device`` in the summary)."""

from __future__ import annotations

from typing import Any

from fedtune.config import Scenario

#: of a GPU's memory, what clients sharing it may plan to fill (CUDA context, allocator
#: fragmentation and the estimate's own error take the rest)
GPU_USABLE = 0.85
#: Ray counts GPU fractions in steps of 1e-4
RAY_GPU_STEPS = 10_000


def client_memory_mb(scenario: Scenario) -> float:
    """The memory estimate (``fedtune.model.memory``) of the largest client on CUDA."""
    from fedtune.model.memory import estimate, model_dims
    from fedtune.planning.client_settings import client_settings

    dims = model_dims(scenario.model.source)
    targets = tuple(scenario.lora.target_modules)
    return max(estimate(dims, s.quantization, s.rank, targets, s.batch_size, s.seq_len,
                        "cuda").total_mb for s in client_settings(scenario))


def gpu_share(client_mb: float, gpu_mb: float, clients: int) -> float:
    """The GPU fraction each simulated client asks Ray for: as many clients share one
    GPU as fit in ``GPU_USABLE`` of its memory by the estimate, never more than there
    are clients or Ray can tell apart (its resolution is 1e-4), and 1.0, a whole GPU,
    when even one does not fit (it may still run)."""
    fit = int(gpu_mb * GPU_USABLE // max(client_mb, 1e-9))
    per_gpu = min(max(1, fit), max(clients, 1), RAY_GPU_STEPS)
    return float(RAY_GPU_STEPS // per_gpu) / RAY_GPU_STEPS


def gpu_memory_mb() -> list[float]:
    """Each visible CUDA GPU's memory (MiB); empty without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_properties(i).total_memory / 2**20
            for i in range(torch.cuda.device_count())]


def simulation_device(scenario: Scenario, gpus: list[float] | None = None
                    ) -> tuple[float, dict[str, Any]]:
    """Each client's GPU fraction and what the run records of it (``device`` in the
    summary): ``simulation.gpus_per_client`` when set; otherwise, with ``model.device =
    "auto"`` and a GPU here, a share sized from the memory estimate of the smallest GPU
    (Ray hides the GPUs from a client that asks for none, so "auto" would mean CPU)."""
    sim, device = scenario.simulation, scenario.model.device
    if sim.gpus_per_client > 0:
        return sim.gpus_per_client, {"trains_on": "cuda", "gpus_per_client": sim.gpus_per_client,
                                     "why": "simulation.gpus_per_client"}
    if device == "cpu":
        return 0.0, {"trains_on": "cpu", "gpus_per_client": 0.0, "why": "model.device = 'cpu'"}
    gpus = gpu_memory_mb() if gpus is None else gpus
    if not gpus:
        return 0.0, {"trains_on": "cpu", "gpus_per_client": 0.0,
                     "why": f"model.device = {device!r} and no CUDA GPU here"}
    client_mb = client_memory_mb(scenario)
    share = gpu_share(client_mb, min(gpus), scenario.data.num_clients)
    return share, {"trains_on": "cuda", "gpus_per_client": share,
                   "why": f"model.device = {device!r}: {client_mb:.0f} MiB estimated per "
                          f"client, {min(gpus):.0f} MiB per GPU, {len(gpus)} GPU(s)"}
