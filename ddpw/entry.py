"""Command line of every launched ddpw process: ``python -m ddpw.entry JOB_DIR``.

Kept apart from :mod:`ddpw.worker` (which the package imports) so that running it as a module
does not import it twice.
"""

import sys

from ddpw.worker import main

if __name__ == "__main__":
    main(sys.argv[1:])
