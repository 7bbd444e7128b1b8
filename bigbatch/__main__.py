"""`python -m bigbatch ...` and `deepspeed --module bigbatch train <recipe>`."""

import sys

# First, before the imports that take seconds: from here on SIGUSR1/SIGTERM ask the run to stop cleanly instead of
# killing the rank (see bigbatch.run.preemption).
from bigbatch.run.preemption import install_handlers, trains

if trains(sys.argv[1:]):
    install_handlers()

from bigbatch.cli import main  # noqa: E402

sys.exit(main())
