import sys

from pipelines.dump.job import main

sys.exit(main())
