"""`python -m mixprec ...` is the same as the `mixprec` console script."""

from __future__ import annotations

import sys

from mixprec.cli import main

sys.exit(main())
