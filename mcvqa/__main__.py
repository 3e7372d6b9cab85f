import sys

from mcvqa.cli import main

sys.exit(main())
