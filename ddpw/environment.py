"""Every environment variable through which ddpw tells its own processes something.

ddpw's processes learn what the caller decided from the pickled payload
(:class:`ddpw.jobfolder.Payload`). Only what is decided after the payload was written, or
before it can be read, travels in the environment instead, under these names.
"""

#: Set by the SLURM node runner for every process it starts: the node runner's own pid, so that
#: a script there runs in place whatever its world size (the one process of a one-process job
#: has no torchrun variables to show it, and would otherwise submit a second job from the
#: compute node). Only the node runner's own children count (:func:`ddpw.plan.resolve_plan`).
NODE_RUNNER = "DDPW_NODE_RUNNER"

#: Set by ``ddpw-launch`` when it runs a world of one in its own process: that process's pid, so
#: that a script's Wrapper there runs in place, in that world of one, as it does under a launch
#: of several (the processes that the script starts have other pids, and are no ranks of it).
ONE_PROCESS_LAUNCH = "DDPW_ONE_PROCESS_LAUNCH"

#: Set by the SLURM node runner: the name of the requeue signal, which ``import ddpw`` notes
#: from the process's first moment (:func:`ddpw.process.note_requeue_signal`).
REQUEUE_SIGNAL = "DDPW_REQUEUE_SIGNAL"

#: Set by the SLURM node runner: the job folder's record of the checkpoints the job published
#: (:func:`ddpw.jobfolder.note_checkpoint`), from which a requeued attempt resumes.
CHECKPOINT_RECORD = "DDPW_CHECKPOINT_RECORD"

#: Set by the SLURM node runner in a requeued attempt: the newest checkpoint of that record, the
#: one the attempt resumes from (:func:`ddpw.resume.choose`).
RESUME_FROM = "DDPW_RESUME_FROM"

#: Set by ddpw in each process of a job on several machines without SLURM, once its world has
#: formed: the world's number in the job, the same on every rank (1 for the first; an elastic
#: job forms another whenever a machine is lost or joins, :func:`ddpw.rendezvous.next_world`).
WORLD = "DDPW_WORLD"

#: Set by the launcher for every process it starts: ``PlatformConfig.hang_timeout_s`` in seconds,
#: or ``off``; read by a script's processes under ``ddpw-launch`` (:mod:`ddpw.hang`), whose
#: payload's PlatformConfig is theirs alone.
HANG_TIMEOUT = "DDPW_HANG_TIMEOUT_S"

#: Set by ``ddpw-launch`` for a script's processes: the folder where a hang's report goes
#: (``hang-R.json``, :mod:`ddpw.jobfolder`), and the script's times (``times.json``,
#: :mod:`ddpw.goodput`), which ``ddpw-launch`` then reads.
HANG_FOLDER = "DDPW_HANG_FOLDER"

#: For the crash tests only: ``FILE:ACTION`` makes the process that has just written ``FILE``
#: into a checkpoint die (``kill``), fail as if the disk were full (``full``), or send ``SIGTERM``
#: to process ``PID`` and wait until a ``SIGTERM`` comes back (``sigterm=PID``), or sleep for
#: ``S`` seconds before going on (``sleep=S``: a slow disk).
TEST_CHECKPOINT_FAULT = "DDPW_TEST_CHECKPOINT_FAULT"

#: Set by a sweep for each point's processes: the sweep's folder and the point's name, so that
#: a Trainer of the point claims its checkpoint folder there (:func:`ddpw.sweep.folder.claim`).
SWEEP_FOLDER = "DDPW_SWEEP_FOLDER"
SWEEP_TASK = "DDPW_SWEEP_TASK"

#: Set for every process of a launch (by the local launcher, by the SLURM node runner for each
#: attempt): when it began, as seconds since the epoch, and an id for the launch (the SLURM
#: job's id across its requeues; one id per local launch, kept across elastic restarts), from
#: which a Trainer's goodput counts its start-up and ties attempts into a job (:mod:`ddpw.goodput`).
LAUNCH_TIME = "DDPW_LAUNCH_TIME"
LAUNCH_ID = "DDPW_LAUNCH_ID"
