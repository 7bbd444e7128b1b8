"""`python -m bigbatch.finetune`: the documented command; the code is `bigbatch.models.finetune`."""

import sys

from bigbatch.models.finetune import main

if __name__ == "__main__":
    sys.exit(main())
