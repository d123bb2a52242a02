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

The names below are importable from ``ddpw.slurm`` itself, loaded when first used (as
``import ddpw`` loads its own), so that ``ddpw-launch --help`` reads :data:`ON_INTERRUPT`
without loading either side.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_names

if TYPE_CHECKING:
    from .cluster import check_cluster, fit_cores, gres_gpus
    from .node import NodeTask, RequeuePolicy
    from .submission import Submission, executor_parameters, submit

#: What to do with a waited-for job on Ctrl-C (:meth:`Submission.wait
#: <ddpw.slurm.submission.Submission.wait>`): ask (cancel when there is no terminal to ask on),
#: cancel it, or keep it running.
ON_INTERRUPT = ("ask", "cancel", "keep")

__all__ = ["ON_INTERRUPT", "NodeTask", "RequeuePolicy", "Submission", "check_cluster",
           "executor_parameters", "fit_cores", "gres_gpus", "submit"]

#: The module that defines each name.
_HOMES = {"check_cluster": "cluster", "fit_cores": "cluster", "gres_gpus": "cluster",
          "NodeTask": "node", "RequeuePolicy": "node", "Submission": "submission",
          "executor_parameters": "submission", "submit": "submission"}


__getattr__, __dir__ = lazy_names(__name__, _HOMES, __all__)
