"""Start ``torch.distributed`` under any launcher: torchrun, DeepSpeed's launcher, mpirun, or none.

torchrun and the ``deepspeed`` launcher export ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` and the
rendezvous address. mpirun exports only its own variables; the layout is then read from MPI
itself (mpi4py) and rank 0 picks the rendezvous: on one host always the loopback address (so
nothing ever leaves the machine, whatever ``hostname -I`` says), across hosts ``MASTER_ADDR``
as given (``mpirun -x MASTER_ADDR=<first host>``). A plain ``python`` start is a world of one.
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


def init_distributed(backend: str | None = None) -> None:
    """Initialise the default process group from whichever launcher started this process."""
    if dist.is_initialized():
        return
    if started_by_mpi():
        adopt_mpi_layout()
    elif "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ["MASTER_PORT"] = str(free_port())
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend)
