"""SLURM: a job submitted with submitit, whose one task per node runs ``accelerate launch``.

The package is split along the machine boundary:

- :mod:`ddpw.slurm.cluster` and :mod:`ddpw.slurm.submission` run on the submitting machine:
  :func:`submit` checks the plan against the cluster (``sinfo``), writes the job folder and
  hands the job to SLURM; the :class:`Submission` it returns waits for the job and reads its
  results;
- :mod:`ddpw.slurm.node` runs on each node of the allocation: its :class:`NodeTask` starts the
  node's processes and requeues the job after SLURM's warning.

Both sides meet in the job folder, whose files :mod:`ddpw.jobfolder` names; the nodes must
share it with the submitting machine (as SLURM clusters' home and project file systems are).
"""

from .cluster import check_cluster, fit_cores, gres_gpus
from .node import NodeTask, RequeuePolicy
from .submission import ON_INTERRUPT, Submission, executor_parameters, submit

__all__ = ["ON_INTERRUPT", "NodeTask", "RequeuePolicy", "Submission", "check_cluster",
           "executor_parameters", "fit_cores", "gres_gpus", "submit"]
