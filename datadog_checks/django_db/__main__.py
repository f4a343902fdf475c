"""``python -m datadog_checks.django_db`` in a development environment: the runner of django_db_tools.

Neither the wheel nor the checks.d copy carries this module: the Agent runs the check itself.
"""

import sys

from django_db_tools.cli import main

sys.exit(main())
