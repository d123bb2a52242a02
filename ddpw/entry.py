"""Command line of every process that ddpw launches, on every platform.

``python -m ddpw.entry FOLDER`` runs the payload that :class:`~ddpw.wrapper.Wrapper` wrote to
the payload folder ``FOLDER`` (:func:`ddpw.worker.main`, :mod:`ddpw.jobfolder`);
``python -m ddpw.entry --script PATH ARGS...`` or ``--module NAME ARGS...`` runs a user's script
for ``ddpw-launch`` (:func:`ddpw.worker.run_script`). Kept apart from :mod:`ddpw.worker` so
that running it as a module does not import that module twice.
"""

import sys

from ddpw.worker import main, run_script

if __name__ == "__main__":
    if sys.argv[1:2] in (["--script"], ["--module"]):
        run_script(sys.argv[2], sys.argv[3:], module=sys.argv[1] == "--module")
    else:
        main(sys.argv[1:])
