"""Sweeps: one command, or one :meth:`~ddpw.wrapper.Wrapper.sweep` call, runs a job for each
point of a grid, here ``parallelism`` at a time or as one SLURM job array, each point resumable
and recorded in the sweep's folder.

- :mod:`ddpw.sweep.grid`: the grid, the points' names and the script arguments' placeholders,
  checked before anything starts;
- :mod:`ddpw.sweep.folder`: the sweep folder, one record a point, and the table;
- :mod:`ddpw.sweep.pending`: which points a run runs: those not done;
- :mod:`ddpw.sweep.local`: the points run on this machine;
- :mod:`ddpw.sweep.array`: the points run as one SLURM job array;
- :mod:`ddpw.sweep.python`: the Python form, whose points :mod:`ddpw.sweep.point` runs;
- :mod:`ddpw.cli_sweep`: the ``ddpw-launch --sweep`` form.
"""
