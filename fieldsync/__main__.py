import sys

from fieldsync.cli import main

sys.exit(main())
