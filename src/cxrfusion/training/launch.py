"""What differs between the processes of a multi-GPU launch (torchrun, SLURM or Lightning's own).

Which process prepares the data (rank 0; the others wait for it), whether this process writes the
run's files, and how DDP must be set up for the frozen phase 1.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from lightning.pytorch.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

from cxrfusion.atomic import write_atomic
from cxrfusion.data.options import PrepareOptions
from cxrfusion.errors import CxrError

log = logging.getLogger(__name__)

PREPARED_MARKER = ".prepared.json"
PREPARE_TIMEOUT_S = 12 * 3600.0  # the full NIH set at 256 px takes well under an hour on 8 cores
DDP_STRATEGIES = ("ddp", "ddp_spawn", "ddp_fork", "ddp_notebook")


def launch_rank() -> int:
    """This process's global rank, read from the launcher's environment before DDP starts.

    torchrun sets RANK, SLURM's srun SLURM_PROCID; Lightning's own launcher (`--devices 2` without
    torchrun) starts the other ranks with LOCAL_RANK / NODE_RANK. A plain run, or the process that
    launches the others, is rank 0.
    """
    env = os.environ
    for name in ("RANK", "SLURM_PROCID"):
        if env.get(name, "").isdigit():
            return int(env[name])
    return int(env.get("NODE_RANK") or 0) + int(env.get("LOCAL_RANK") or 0)  # 0 only on rank 0


def prepare_once(
    data: Path,
    out: Path,
    options: PrepareOptions,
    timeout_s: float = PREPARE_TIMEOUT_S,
    poll_s: float = 2.0,
) -> None:
    """`cxrfusion prepare` on rank 0 only; every other rank waits until it has finished.

    Rank 0 prepares (each file of `prepare` is written atomically, the cache resumably), then
    writes `out/.prepared.json`, naming the data folder and cache side, last. The other ranks wait
    for that marker to name the same data and side, so none reads a half-prepared folder; one
    left by an earlier launch with the same data and side lets them start at once (its files are
    what rank 0 finds up to date). `--prepared` must be on a filesystem all nodes share.

    Args:
        timeout_s: how long a rank > 0 waits before a CxrError (rank 0 may have failed).
        poll_s: seconds between looks at the marker.
    """
    from cxrfusion.data.prepare import prepare

    marker = Path(out) / PREPARED_MARKER
    expected = {"data": str(Path(data).resolve()), "size": options.size}
    if launch_rank() == 0:
        prepare(data, Path(out), options)
        write_atomic(marker, json.dumps(expected))
        return
    log.info("waiting for rank 0 to prepare %s", out)
    deadline = time.monotonic() + timeout_s
    while _read_marker(marker) != expected:
        if time.monotonic() > deadline:
            raise CxrError(
                f"{marker}: rank 0 did not finish preparing {data} within {timeout_s:.0f} s; "
                "see rank 0's error, or run `cxrfusion prepare` once before the launch"
            )
        time.sleep(poll_s)


def _read_marker(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def ddp_strategy(
    strategy: str, accelerator: str, devices: object, num_nodes: int, frozen_phase: bool
) -> str:
    """The Lightning strategy to use: DDP told to expect unused parameters during a frozen phase.

    DDP's reducer waits for a gradient of every parameter registered when it wrapped the model;
    the backbone frozen in phase 1 produces none, hence "parameters that were not used in
    producing the loss". With `find_unused_parameters` DDP marks them ready instead. That flag is
    fixed when DDP wraps the model, so it is on for whole runs that have a phase 1 (a backbone
    model with phase1_epochs > 0) and off otherwise. Why not `BaseFinetuning`: see
    `callbacks.TwoPhaseTraining`.

    Args:
        strategy / accelerator / devices / num_nodes: as given to the Trainer.
        frozen_phase: whether some epoch of the run freezes the backbone.
    """
    if not frozen_phase:
        return strategy
    if strategy == "auto" and _process_count(accelerator, devices, num_nodes) > 1:
        strategy = "ddp"  # what Lightning picks for several processes
    if strategy in DDP_STRATEGIES:
        return f"{strategy}_find_unused_parameters_true"
    return strategy


def _process_count(accelerator: str, devices: object, num_nodes: int) -> int:
    """How many processes Lightning will train with (enough to tell one from several)."""
    if TorchElasticEnvironment.detect():
        return int(os.environ["WORLD_SIZE"])
    if SLURMEnvironment.detect():
        return int(os.environ["SLURM_NTASKS"])
    text = str(devices).strip().strip("[]")
    if "," in text:
        per_node = len([part for part in text.split(",") if part.strip()])
    elif text.lstrip("-").isdigit() and int(text) != -1:
        per_node = int(text)
    else:  # "auto" or -1: every GPU, or one CPU process
        import torch

        per_node = torch.cuda.device_count() if accelerator in ("auto", "gpu", "cuda") else 1
    return max(per_node, 1) * num_nodes
