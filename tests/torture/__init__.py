"""Torture campaigns (issue 14): ``python -m tests.torture [--quick|--long] [--json]``.

Each campaign is one module here with ``NAME`` and ``run(quick, seed, progress) ->
Result`` (``tests/torture/result.py``): it builds what it needs in a temporary
directory, runs, and counts. ``CAMPAIGNS`` lists the modules in the order a run takes
them; a new campaign (kills, store faults) is a module plus its name here. Each campaign
is also a test in the suite, in its quick form (``tests/torture/test_campaigns.py``).
"""

CAMPAIGNS = ("power_loss", "kills", "wire_fuzz", "rest_fuzz", "store_faults")
