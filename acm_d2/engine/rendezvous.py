"""Start the processes of one machine and form the group with the other machines' or fail, naming who.

Detectron2's ``launch`` spawns its workers, each of which calls ``init_process_group`` at
``--dist-url``; a group that cannot form (a machine not started, or started with another
``--num-gpus`` / ``--num-machines``) then waits silently for 30 minutes, and after Ctrl-C
the workers blocked in the join live on, holding the port. Detectron2 offers no hook
between the spawn and the join, so :func:`spawn_and_join` starts the workers itself (as
Detectron2 does: ``torch.multiprocessing`` "spawn", one process per local rank) and every
worker first joins a roll call on a ``TCPStore`` at ``--dist-url`` (rank 0 serves it):

* each worker writes its rank, the world size it expects, its machine, host and process id;
* rank 0 compares them as they arrive: a worker that expects another world size, a rank
  outside 0..world_size-1 or a rank claimed twice ends every worker at once, naming them;
* when all ``world_size`` ranks are there within ``join_timeout`` (``$ACM_D2_JOIN_TIMEOUT``
  seconds, default 600), every worker joins the process group on the same store; else every
  worker ends with an error naming the missing ranks and their machines. Rank 0 logs the
  missing ranks every 30 s while it waits; a worker that cannot reach rank 0 says so.

The parent process waits for its workers; if it is interrupted (Ctrl-C, an error) it ends
every worker (SIGTERM, then SIGKILL after 5 s), which frees the port.
"""
import json
import logging
import os
import signal
import socket
import time
from datetime import timedelta
from typing import Dict, Optional, Tuple
from urllib.parse import urlparse

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.utils import comm

__all__ = ["GroupFormationError", "default_join_timeout", "join_from_environment", "spawn_and_join"]

logger = logging.getLogger(__name__)

_PREFIX = "acm_d2_rollcall/"
_REPORT_EVERY_S = 30.0
_GRACE_S = 5.0


class GroupFormationError(RuntimeError):
    """The training processes of all machines did not form one group; the message says who is missing or disagrees."""


def default_join_timeout() -> float:
    """Seconds to wait for every rank: ``$ACM_D2_JOIN_TIMEOUT`` or 600."""
    value = os.environ.get("ACM_D2_JOIN_TIMEOUT", "600")
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"ACM_D2_JOIN_TIMEOUT must be a number of seconds > 0, got {value!r}")
    return seconds


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def tcp_address(dist_url: str) -> Tuple[str, int]:
    """(host, port) of a ``tcp://HOST:PORT`` URL; ValueError naming --dist-url otherwise."""
    parsed = urlparse(dist_url)
    try:
        port = parsed.port
    except ValueError:
        port = None
    if parsed.scheme != "tcp" or not parsed.hostname or port is None:
        raise ValueError(f"--dist-url {dist_url!r} is not tcp://HOST:PORT (or 'auto' on one machine)")
    return parsed.hostname, port


def _describe(member: dict) -> str:
    return (
        f"rank {member.get('rank')} (machine {member.get('machine_rank')}, host {member.get('host')}, pid "
        f"{member.get('pid')}, --num-gpus {member.get('num_gpus')} --num-machines {member.get('num_machines')})"
    )


def _disagreements(members: Dict[int, dict], me: dict) -> Optional[str]:
    seen: Dict[int, dict] = {}
    for member in members.values():
        rank = member.get("rank")
        if member.get("world_size") != me["world_size"] or member.get("num_gpus") != me["num_gpus"]:
            return (
                f"the machines disagree on the world size: {_describe(member)} expects {member.get('world_size')} "
                f"processes, {_describe(me)} expects {me['world_size']}; start every machine with the same "
                f"--num-gpus and --num-machines"
            )
        if rank in seen:
            return (
                f"rank {rank} was claimed twice: {_describe(seen[rank])} and {_describe(member)}; give every machine "
                f"its own --machine-rank in 0..{me['num_machines'] - 1}"
            )
        seen[rank] = member
    return None


def _missing(members: Dict[int, dict], me: dict) -> str:
    present = {m["rank"] for m in members.values()}
    absent = [r for r in range(me["world_size"]) if r not in present]
    machines = sorted({r // me["num_gpus"] for r in absent})
    return f"ranks {absent[:16]}{' ...' if len(absent) > 16 else ''} (machine(s) {machines})"


_SPAWN_HINT = "Start them with the same --dist-url, --num-machines and --num-gpus, each machine with its --machine-rank"


def _roll_call(store, me: dict, join_timeout: float, dist_url: str, hint: str = _SPAWN_HINT) -> None:
    """Register ``me``; rank 0 checks everyone and announces the verdict; see the module docstring.
    ``hint``: how to start the missing processes (the launcher's settings)."""
    index = store.add(_PREFIX + "count", 1) - 1
    store.set(f"{_PREFIX}member/{index}", json.dumps(me))
    if me["rank"] != 0:
        try:
            store.wait([_PREFIX + "verdict"], timedelta(seconds=join_timeout + 30))
        except Exception as e:  # noqa: BLE001 - DistStoreError / RuntimeError: rank 0 never answered
            raise GroupFormationError(
                f"{_describe(me)}: rank 0 at {dist_url} did not confirm the group within {join_timeout:g} s "
                f"({type(e).__name__}); is machine 0 still running?"
            ) from e
        verdict = json.loads(store.get(_PREFIX + "verdict"))
        if not verdict["ok"]:
            store.add(_PREFIX + "read", 1)  # rank 0 waits for this before it ends (and its store with it)
            raise GroupFormationError(verdict["message"])
        return
    deadline = time.monotonic() + join_timeout
    next_report = time.monotonic() + _REPORT_EVERY_S
    members: Dict[int, dict] = {}
    while True:
        count = store.add(_PREFIX + "count", 0)
        for i in range(len(members), count):
            members[i] = json.loads(store.get(f"{_PREFIX}member/{i}"))
        problem = _disagreements(members, me)
        if problem is None and len(members) == me["world_size"]:
            store.set(_PREFIX + "verdict", json.dumps({"ok": True}))
            return
        if problem is None and time.monotonic() > deadline:
            problem = (
                f"the group did not form within {join_timeout:g} s ($ACM_D2_JOIN_TIMEOUT): {len(members)} of "
                f"{me['world_size']} processes joined at {dist_url}; missing: {_missing(members, me)}. {hint}"
            )
        if problem is not None:
            message = f"Training processes cannot form a group: {problem}"
            store.set(_PREFIX + "verdict", json.dumps({"ok": False, "message": message}))
            linger = time.monotonic() + _GRACE_S  # let the others (also late ones) read it
            while store.add(_PREFIX + "read", 0) < store.add(_PREFIX + "count", 0) - 1 and time.monotonic() < linger:
                time.sleep(0.05)
            raise GroupFormationError(message)
        if time.monotonic() > next_report:
            logger.warning("Rank 0 waits for %s to join at %s (%d of %d joined)", _missing(members, me), dist_url, len(members), me["world_size"])
            next_report += _REPORT_EVERY_S
        time.sleep(0.05)


def _worker(local_rank, main_func, num_gpus, num_machines, machine_rank, dist_url, args, timeout, join_timeout, backend):
    rank = machine_rank * num_gpus + local_rank
    world_size = num_machines * num_gpus
    me = {
        "rank": rank, "world_size": world_size, "num_gpus": num_gpus, "num_machines": num_machines,
        "machine_rank": machine_rank, "host": socket.gethostname(), "pid": os.getpid(),
    }
    host, port = tcp_address(dist_url)
    try:
        store = dist.TCPStore(host, port, is_master=rank == 0, timeout=timedelta(seconds=join_timeout), wait_for_workers=False)
    except Exception as e:  # noqa: BLE001 - cannot bind (rank 0) or reach rank 0 (the others)
        what = f"could not serve the group at {dist_url} (is the port in use?)" if rank == 0 else (
            f"could not reach rank 0 at {dist_url} within {join_timeout:g} s: is machine 0 started with "
            f"--machine-rank 0 and this --dist-url?"
        )
        raise GroupFormationError(f"{_describe(me)} {what} ({type(e).__name__}: {e})") from e
    _roll_call(store, me, join_timeout, dist_url)
    store.set_timeout(timeout)  # from here on the group's own timeout, as Detectron2's
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(
        backend=backend, store=dist.PrefixStore("acm_d2_pg/", store), world_size=world_size, rank=rank, timeout=timeout
    )
    comm.create_local_process_group(num_gpus)
    comm.synchronize()
    main_func(*args)


def _end_workers(processes) -> None:
    """SIGTERM every live worker, SIGKILL those still alive after the grace period."""
    alive = [p for p in processes if p.is_alive()]
    for p in alive:
        p.terminate()
    deadline = time.monotonic() + _GRACE_S
    for p in alive:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in alive:
        if p.is_alive():
            os.kill(p.pid, signal.SIGKILL)
            p.join()


def spawn_and_join(main_func, num_gpus: int, num_machines: int, machine_rank: int, dist_url: str, args, timeout,
                   join_timeout: float, backend: str):
    """Start ``num_gpus`` workers of machine ``machine_rank``, which form the group (see the module
    docstring) and run ``main_func(*args)``; wait for them. ``dist_url``: ``tcp://HOST:PORT`` or "auto"."""
    if dist_url == "auto":
        if num_machines != 1:
            raise ValueError("--dist-url auto picks a port on this machine: with --num-machines > 1 give tcp://HOST0:PORT")
        dist_url = f"tcp://127.0.0.1:{_free_port()}"
    tcp_address(dist_url)
    context = mp.start_processes(
        _worker, nprocs=num_gpus, join=False, daemon=False, start_method="spawn",
        args=(main_func, num_gpus, num_machines, machine_rank, dist_url, args, timeout, join_timeout, backend),
    )
    try:
        while not context.join():
            pass
    except BaseException:
        _end_workers(context.processes)  # Ctrl-C or a failed worker: none is left behind on the port
        raise


_ENV_HINT = ("Start every process with the same MASTER_ADDR, MASTER_PORT and WORLD_SIZE and its own RANK "
             "(torchrun --nnodes / --nproc_per_node set them)")


def join_from_environment(layout: dict, backend: str, timeout) -> None:
    """Form the process group of an external launcher (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
    ``MASTER_PORT``: torchrun, SLURM, or set by hand) after the same roll call as
    :func:`spawn_and_join`, on the store ``init_method="env://"`` would use: rank 0 serves it at
    MASTER_ADDR:MASTER_PORT, or torchrun's agent serves it (``TORCHELASTIC_USE_AGENT_STORE``);
    the roll call of each restart of torchrun's workers has keys of its own
    (``TORCHELASTIC_RESTART_COUNT``). Ranks missing after ``$ACM_D2_JOIN_TIMEOUT`` seconds end
    every process with :class:`GroupFormationError` naming them.

    ``layout``: {"rank", "world_size", "local_rank", "local_world_size"}."""
    join_timeout = default_join_timeout()
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    where = f"env:// (MASTER_ADDR {host}, MASTER_PORT {port})"
    per_machine = layout["local_world_size"]
    me = {
        "rank": layout["rank"], "world_size": layout["world_size"], "num_gpus": per_machine,
        "num_machines": layout["world_size"] // per_machine, "machine_rank": layout["rank"] // per_machine,
        "host": socket.gethostname(), "pid": os.getpid(),
    }
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    try:
        store = dist.TCPStore(host, port, is_master=layout["rank"] == 0 and not agent_store,
                              timeout=timedelta(seconds=join_timeout), wait_for_workers=False)
    except Exception as e:  # noqa: BLE001 - cannot bind (rank 0) or reach rank 0 (the others)
        what = f"could not serve the group at {where} (is the port in use?)" if me["rank"] == 0 and not agent_store else (
            f"could not reach the store at {where} within {join_timeout:g} s: is rank 0 started?")
        raise GroupFormationError(f"{_describe(me)} {what} ({type(e).__name__}: {e})") from e
    store = dist.PrefixStore(f"acm_d2_env/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store)
    _roll_call(store, me, join_timeout, where, _ENV_HINT)
    store.set_timeout(timeout)
    dist.init_process_group(backend=backend, store=dist.PrefixStore("acm_d2_pg/", store),
                            world_size=layout["world_size"], rank=layout["rank"], timeout=timeout)
