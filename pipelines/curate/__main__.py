import sys

from pipelines.curate.job import main

sys.exit(main())
