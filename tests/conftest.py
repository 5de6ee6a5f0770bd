"""Test configuration: hypothesis profiles, quiet progress, the real-model marker.

Profiles: ``ci`` (default, fast) and ``thorough`` (many more random programs), picked
with ``IFP_HYPOTHESIS_PROFILE=thorough``.
"""

import os

os.environ.setdefault("IFP_QUIET", "1")

from hypothesis import HealthCheck, Phase, settings  # noqa: E402

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# ci: the same examples on every run (a landing never depends on luck) and no shrinking
# (shrinking random exported models can take longer than the whole suite); thorough:
# fresh random examples each run, shrunk to a minimal failing model.
settings.register_profile("ci", max_examples=12, derandomize=True,
                          phases=[Phase.explicit, Phase.reuse, Phase.generate], **_common)
settings.register_profile("thorough", max_examples=200, derandomize=False, **_common)
settings.load_profile(os.environ.get("IFP_HYPOTHESIS_PROFILE", "ci"))
