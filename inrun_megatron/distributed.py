"""Start ``torch.distributed`` under any launcher: torchrun, DeepSpeed's launcher, srun, mpirun, or none.

torchrun and the ``deepspeed`` launcher export ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` and the
rendezvous address. srun exports ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``; the batch
script exports ``MASTER_ADDR``/``MASTER_PORT``. mpirun exports only its own variables; the layout
is then read from MPI itself (mpi4py) and rank 0 picks the rendezvous: on one host always the
loopback address (so nothing ever leaves the machine, whatever ``hostname -I`` says), across hosts
``MASTER_ADDR`` as given (``mpirun -x MASTER_ADDR=<first host>``). A plain ``python`` start is a
world of one.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist

_MPI_RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


_SLURM_VARIABLES = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")


def started_by_slurm() -> bool:
    return "RANK" not in os.environ and all(v in os.environ for v in _SLURM_VARIABLES)


def adopt_slurm_layout() -> None:
    """Export the torch.distributed variables for tasks started by srun."""
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise RuntimeError(
                f"under srun, export {name} in the batch script, e.g. MASTER_ADDR=$(scontrol show hostnames"
                ' "$SLURM_JOB_NODELIST" | head -n 1) MASTER_PORT=29500 (see launch/slurm_pretrain.sbatch)'
            )
    os.environ.update(
        RANK=os.environ["SLURM_PROCID"], WORLD_SIZE=os.environ["SLURM_NTASKS"], LOCAL_RANK=os.environ["SLURM_LOCALID"]
    )


def adopt_launcher_layout() -> str:
    """Export ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` and the rendezvous for whichever launcher started
    this process (before any process group exists); returns the launcher's name."""
    if "RANK" in os.environ:
        return "torchrun/deepspeed"
    if started_by_slurm():
        adopt_slurm_layout()
        return "srun"
    if started_by_mpi():
        adopt_mpi_layout()
        return "mpirun"
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(free_port())
    return "single process"


def started_by_mpi() -> bool:
    return "RANK" not in os.environ and any(v in os.environ for v in _MPI_RANK_VARIABLES)


def adopt_mpi_layout() -> None:
    """Export the torch.distributed variables for a job started by mpirun (needs mpi4py)."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    one_host = len(set(comm.allgather(socket.gethostname()))) == 1
    address = os.environ.get("MASTER_ADDR")
    if address is None and not one_host:
        raise RuntimeError(
            "mpirun started ranks on several hosts: set MASTER_ADDR to an address of the first host that every"
            " host can reach (mpirun -x MASTER_ADDR=<host> ...)"
        )
    address = address or "127.0.0.1"
    port = os.environ.get("MASTER_PORT") or comm.bcast(str(free_port()) if rank == 0 else None, root=0)
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(size),
        LOCAL_RANK=str(node.Get_rank()),
        LOCAL_WORLD_SIZE=str(node.Get_size()),
        MASTER_ADDR=address,
        MASTER_PORT=str(port),
    )
    node.Free()


def collective_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """Where a tensor must live for a collective on ``group``: NCCL reduces only GPU tensors (the
    current GPU's), gloo and a mixed ``cpu:gloo,cuda:nccl`` group take CPU tensors."""
    if dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(backend: str | None = None) -> str | None:
    """Initialise the default process group from whichever launcher started this process; return
    the launcher's name (None if the process group already existed: the caller started it)."""
    if dist.is_initialized():
        return None
    launcher = adopt_launcher_layout()
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend)
    return launcher
