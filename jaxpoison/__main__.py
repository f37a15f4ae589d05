import sys

from jaxpoison.cli import main

sys.exit(main())
