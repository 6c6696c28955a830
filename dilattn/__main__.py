"""``python -m dilattn``: the command line (see :mod:`dilattn.cli`)."""

import warnings

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

from dilattn.cli import main  # noqa: E402

raise SystemExit(main())
