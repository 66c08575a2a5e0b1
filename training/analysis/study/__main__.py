"""`python -m training.analysis.study [--quick] [--out DIR] ...`: see training.analysis.study."""

import sys

from training.analysis.study.cli import main

sys.exit(main())
