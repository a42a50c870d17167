"""Pre-flight check of a multi-node setup: `python launch/doctor.py --hostfile launch/hostfile`.

Prints one table (a row per host: reachability, Python/torch/deepspeed/ofa_ds versions and commit, GPUs and free
memory, master port reachability, data paths) and one message per problem, and exits 1 if there is any problem,
0 otherwise. Run it from the directory you will launch from, with the Python you will launch with: both are what
DeepSpeed's runner uses on every node. See ofa_ds/cluster/doctor.py for the list of checks and docs/multinode.md
for use.

    python launch/doctor.py --hostfile launch/hostfile --master-port 29500 --data /data/ofa/caption_train.tsv
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ofa_ds.cluster.doctor import Options, check, render  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hostfile", default=os.environ.get("OFA_HOSTFILE", "launch/hostfile"),
                    help="DeepSpeed/OpenMPI hostfile: 'host slots=N' lines, # comments")
    ap.add_argument("--master-addr", default=os.environ.get("MASTER_ADDR"),
                    help="address the ranks rendezvous at (default: the first host)")
    ap.add_argument("--master-port", type=int, default=int(os.environ.get("MASTER_PORT", 29500)))
    ap.add_argument("--data", action="append", default=[], metavar="PATH",
                    help="a dataset file or folder every node must read (repeat)")
    ap.add_argument("--launcher", default="pdsh", choices=["pdsh", "openmpi", "no_ssh"])
    ap.add_argument("--via", default="ssh", choices=["ssh", "srun"],
                    help="how the doctor reaches the nodes (srun: inside a SLURM allocation without ssh)")
    ap.add_argument("--ssh-port", type=int, default=None)
    ap.add_argument("--ds-config", default=None, help="checked against the GPUs (bf16 needs A100/H100 or newer)")
    ap.add_argument("--env-file", default=None, help="the .deepspeed_env the launch will use (default: DeepSpeed's)")
    ap.add_argument("--timeout", type=float, default=10.0, help="ssh connect timeout, seconds")
    ap.add_argument("--min-free-frac", type=float, default=0.9,
                    help="a GPU with less than this fraction of its memory free is reported as busy")
    ap.add_argument("--json", metavar="FILE", help="also write every node's raw answers here")
    a = ap.parse_args(argv)
    opts = Options(hostfile=a.hostfile, master_addr=a.master_addr, master_port=a.master_port, data=a.data,
                   launcher=a.launcher, via=a.via, ssh_port=a.ssh_port, env_file=a.env_file,
                   ds_config=a.ds_config, timeout=a.timeout, min_free_frac=a.min_free_frac)
    rep = check(opts)
    print(render(opts, rep), flush=True)
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump({"ok": rep.ok, "problems": rep.problems, "notes": rep.notes, "nodes": rep.probes}, f, indent=1)
    return 0 if rep.ok else 1


if __name__ == "__main__":
    sys.exit(main())
