import sys

from imagebuilder.cli import main

sys.exit(main())
