import sys

from pipelines.filter.job import main

sys.exit(main())
