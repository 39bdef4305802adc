"""Public testing helpers: the equivalence oracle, the tolerance table and hypothesis strategies.

    from ogt.testing import assert_equivalent
    from ogt.testing.strategies import bn_graphs
"""

from .equivalence import assert_equivalent, first_divergence, random_feeds, run
from .tolerances import TOLERANCES, Tolerance, compare, tolerance_for

__all__ = ["TOLERANCES", "Tolerance", "assert_equivalent", "compare", "first_divergence", "random_feeds", "run", "tolerance_for"]
