"""`python -m icd.cli …` and `torchrun … -m icd.cli …`."""

import sys

from icd.cli import main

sys.exit(main())
