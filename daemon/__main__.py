"""`python -m daemon` runs rastosd (the tests start the real daemon this way)."""

import sys

from daemon.cli import daemon_main

sys.exit(daemon_main())
