"""Running ofa_ds on several machines: hostfile and launch setup, the pre-flight doctor, master ports.

* `launch_setup`: what `launch/multinode.sh` and `launch/slurm.sbatch` ask (`python -m ofa_ds.cluster.launch_setup`).
* `doctor`: the pre-flight check behind `launch/doctor.py`; `probe`: the stdlib-only script it runs on each host.
* `ports`: a free master port and cleanup of DeepSpeed's /dev/shm buffers, for jobs started on one machine.

Standard library only (torch only as a fallback GPU query), so the launchers' checks are instant on a login node.
"""
