"""Where the ranks of a SLURM job meet: one rule for every way dmhpc starts them.

The trainer's bootstrap (srun tasks), the submitit jobs of `dmhpc grid` and `dmhpc scaling`, and
slurm/lib.sh (torchrun's rendezvous endpoint, through `python -m dmhpc.rendezvous`) all use it:

- address: the first node of the job's node list, as other nodes reach it: its name where the name
  resolves (most sites), else its NodeAddr from `scontrol show node` (sites, and tests/cluster,
  whose node names are not host names). Asking slurmctld only then keeps a job of thousands of
  tasks from sending it thousands of requests at once;
- port: 29500 + (job id + 889 x step id) % 2000: the same on every node and after a requeue,
  different for jobs running side by side on one node (unless their ids are a multiple of 2000
  apart) and for job steps side by side in one job (two `srun` trainers packed into one allocation
  met at one port: the second failed to bind, or its ranks joined the first's store; 889 apart, not
  1, so that step 1 of one job is not step 0 of the next job's id: steps 1 to 8 of a job land at
  least 222 ids away from any job's step 0, where 997 put step 2 at job id - 6), and below Linux's
  ephemeral range (32768 and up), so no outgoing connection holds it. The batch script, outside any
  step, and a job's first step (0) compute the same port.

MASTER_ADDR and MASTER_PORT, when set, win over both (MASTER_ADDR an address of the node that
hosts the ranks' store: checked where that node is known). This module imports no torch: the batch
script runs it before anything else.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from itertools import product
from typing import Mapping

from dmhpc.errors import DmhpcError

PORT_BASE = 29500
PORT_SPAN = 2000


def expand_nodelist(nodelist: str) -> list[str]:
    """Host names of a SLURM node list such as `n[1-3,5],gpu[01-02]-ib` (pure Python)."""
    item_re = r"(?:[^,\[\]]|\[[^\[\]]*\])+"  # one host pattern: text and [ranges], no top-level comma
    if not re.fullmatch(f"{item_re}(?:,{item_re})*", nodelist):
        raise DmhpcError(f"SLURM node list {nodelist!r}: not a comma-separated list of host[ranges]")
    hosts: list[str] = []
    for item in re.findall(item_re, nodelist):
        choices: list[list[str]] = []
        for piece in re.split(r"(\[[^\]]*\])", item):
            if not piece.startswith("["):
                choices.append([piece])
                continue
            values: list[str] = []
            for part in piece[1:-1].split(","):
                m = re.fullmatch(r"(\d+)(?:-(\d+))?", part.strip())
                if not m:
                    raise DmhpcError(f"SLURM node list {nodelist!r}: cannot read range {part!r}")
                lo, hi = m.group(1), m.group(2) or m.group(1)
                if int(hi) < int(lo):
                    raise DmhpcError(f"SLURM node list {nodelist!r}: range {part!r} runs backwards")
                values += [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
            choices.append(values)
        hosts += ["".join(parts) for parts in product(*choices)]
    return hosts


def _scontrol(env: Mapping[str, str], *args: str) -> str | None:
    """scontrol's output, or None where it is missing or cannot run (a container without slurm.conf)."""
    scontrol = shutil.which("scontrol", path=env.get("PATH", os.defpath))
    if not scontrol:
        return None
    try:
        return subprocess.run([scontrol, *args], capture_output=True, text=True, timeout=30, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return None


def hosts(nodelist: str, env: Mapping[str, str]) -> list[str]:
    """The hosts of a SLURM node list: scontrol's expansion, or ours when scontrol is unusable."""
    return (_scontrol(env, "show", "hostnames", nodelist) or "").split() or expand_nodelist(nodelist)


def first_host(nodelist: str, env: Mapping[str, str]) -> str:
    return hosts(nodelist, env)[0]


def _nodelist(env: Mapping[str, str]) -> str:
    """The node list whose first node hosts the rendezvous: the step's inside an srun step, else the
    job's. A step list that is not within the job's came from elsewhere (exported by a shell that
    ran inside another job's step, and passed on by sbatch): the job's then."""
    step = env.get("SLURM_STEP_NODELIST")
    job = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if step and job and first_host(step, env) not in hosts(job, env):
        return job
    if step or job:
        return step or job
    raise DmhpcError("environment: no SLURM_STEP_NODELIST or SLURM_JOB_NODELIST to find the job's first node in")


def node_address(node: str, env: Mapping[str, str]) -> str:
    """How the other nodes reach `node`: its name where it resolves, else Slurm's NodeAddr for it."""
    try:
        socket.getaddrinfo(node, None)
        return node
    except (socket.gaierror, UnicodeError):
        pass
    m = re.search(r"\bNodeAddr=(\S+)", _scontrol(env, "show", "node", "-o", node) or "")
    return m.group(1) if m else node


STEP_IDS = 0xFFFFFFF0  # SLURM's own steps (batch, extern, interactive) are numbered from here up
# Prime to 2000 (2000 steps of a job take 2000 ports), and its first 8 multiples at least 222 from
# 0 mod 2000, the most any stride gives: a job's steps stay away from its neighbours' step 0.
STEP_STRIDE = 889


def slurm_port(env: Mapping[str, str]) -> int:
    job, step = env.get("SLURM_JOB_ID", ""), env.get("SLURM_STEP_ID", "")
    if not job.isdecimal():
        return PORT_BASE
    step_id = int(step) if step.isdecimal() and int(step) < STEP_IDS else 0
    return PORT_BASE + (int(job) + STEP_STRIDE * step_id) % PORT_SPAN


def slurm_rendezvous(env: Mapping[str, str]) -> tuple[str, int]:
    """(address, port) where the ranks of this SLURM job meet; MASTER_ADDR/MASTER_PORT win. An IPv6
    address comes without brackets (`endpoint` adds them)."""
    addr = master_addr(env)
    if addr:
        check_master_addr(env["MASTER_ADDR"], _nodes(env))
    else:
        addr = node_address(first_host(_nodelist(env), env), env)
    port = master_port(env)
    return addr, slurm_port(env) if port is None else port


def _nodes(env: Mapping[str, str]) -> int:
    """The nodes of this step (or job) the ranks run on."""
    nodes = env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or env.get("SLURM_JOB_NUM_NODES") or "1"
    return int(nodes) if nodes.isdecimal() else 1


def master_addr(env: Mapping[str, str]) -> str | None:
    """MASTER_ADDR, an IPv6 address without its brackets ("[::1]" made torch's URL tcp://[[::1]]:P,
    a ValueError traceback); None when it is not set."""
    addr = env.get("MASTER_ADDR")
    return addr[1:-1] if addr and addr.startswith("[") and addr.endswith("]") else addr or None


def endpoint(addr: str) -> str:
    """The host part of a HOST:PORT endpoint (torchrun's --rdzv-endpoint): an IPv6 address in brackets."""
    return f"[{addr}]" if ":" in addr else addr


def check_master_addr(addr: str, nodes: int) -> None:
    """Refuse a loopback or unspecified MASTER_ADDR (a tutorial's `localhost` in ~/.bashrc) for
    ranks on several nodes: each node formed a world of its own and waited 30 minutes for the others."""
    import ipaddress

    name = addr.strip("[]").rstrip(".").lower()
    try:
        ip = ipaddress.ip_address(name)
        loopback, unspecified = ip.is_loopback, ip.is_unspecified
    except ValueError:
        loopback, unspecified = name == "localhost" or name.endswith(".localhost"), False
    if (loopback or unspecified) and nodes > 1:
        kind = "a loopback" if loopback else "an unspecified"
        raise DmhpcError(f"environment variable MASTER_ADDR={addr}: {kind} address, and the ranks are on {nodes} "
                         f"nodes, each of which would meet alone; unset it (the job's first node is used) or name a "
                         f"node of the job")


def check_hosted_here(addr: str, host: str) -> None:
    """Refuse a MASTER_ADDR that is no address of this node, `host` (where the ranks' store is):
    the others dialled the named node (a login node exported from the submitting shell, another
    node of the job) and waited 30 minutes, or torchrun's 60 s, for a store that was not there."""
    try:
        found = socket.getaddrinfo(addr, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise DmhpcError(f"environment variable MASTER_ADDR={addr}: cannot be resolved here "
                         f"({getattr(exc, 'strerror', None) or exc}); unset it (the job's first node is used) or "
                         f"name {host}") from None
    for family, kind, proto, _, address in found:
        try:  # (an IPv6 address on a node without IPv6: no socket of its family)
            with socket.socket(family, kind, proto) as probe:
                probe.bind((address[0], 0, *address[2:]))  # only an address of this node binds
            return
        except OSError:
            continue
    raise DmhpcError(f"environment variable MASTER_ADDR={addr}: not an address of {host} ({socket.gethostname()}), "
                     f"where the ranks' store is; unset it (the job's first node is used) or name that node")


def master_port(env: Mapping[str, str]) -> int | None:
    """MASTER_PORT as a port number, None when it is not set; a one-line error naming it otherwise."""
    port = env.get("MASTER_PORT")
    if port is None:
        return None
    if not port.strip().isdecimal() or not 0 < int(port) < 65536:
        raise DmhpcError(f"environment variable MASTER_PORT: expected a port number, got {port!r}")
    return int(port)


def main() -> int:
    """Print `ADDRESS PORT` for this job, the address as an endpoint's host (slurm/lib.sh reads it).
    Run by the batch script, on the job's first node: where a multi-node torchrun hosts the store,
    and srun's rank 0 runs (one node's torchrun meets on a port of its own, and srun's rank 0
    checks MASTER_ADDR itself)."""
    try:
        addr, port = slurm_rendezvous(os.environ)
        if master_addr(os.environ) and _nodes(os.environ) > 1:  # (one node: torchrun picks its own)
            check_hosted_here(addr, "the job's first node")
    except DmhpcError as exc:
        print(f"dmhpc rendezvous: error: {exc}", file=sys.stderr)
        return 1
    print(endpoint(addr), port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
