import sys

from eemini.cli import main

sys.exit(main())
