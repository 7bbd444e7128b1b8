"""`python -m bigbatch ...` and `deepspeed --module bigbatch train <recipe>`."""

import sys

from bigbatch.cli import main

sys.exit(main())
