"""Settings every test run shares.

Hypothesis: the default profile ("silo") is derandomized and has no deadline, so a run
of the suite (CI's included) draws the same examples every time and never fails on how
long one example took on a loaded box: a red run is a real failure that the next run
reproduces. `--hypothesis-profile=explore` draws fresh random examples instead (with the
example database on), for hunting new failures by hand; a failure it finds prints the
`@reproduce_failure` blob to pin it in a test.
"""

from __future__ import annotations

from hypothesis import settings

settings.register_profile("silo", derandomize=True, deadline=None, database=None,
                          print_blob=True)
settings.register_profile("explore", derandomize=False, deadline=None, print_blob=True)
settings.load_profile("silo")
