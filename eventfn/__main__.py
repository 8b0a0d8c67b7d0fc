"""``python -m eventfn``: the same as the ``eventfn`` command."""

import sys

from eventfn.cli import main

sys.exit(main())
