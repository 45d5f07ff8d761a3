"""Checks of the equal-cost baselines shared by the family tests (``from equal_cost_checks import ...``)."""

from __future__ import annotations

from collections.abc import Callable


def assert_closest_width(cost: Callable[[int], float], width: int, target: float, what: str = "") -> None:
    """``width`` is the width whose ``cost`` is closest to ``target``, which is what
    :func:`moelab.cost.match_width` guarantees for a cost growing with the width: both neighbours are farther.
    A matched network whose count is off by more than half a width step fails, whatever the step."""
    below, here, above = cost(width - 1), cost(width), cost(width + 1)
    assert below < here < above, (what, "the cost must grow with the width", below, here, above)
    assert abs(here - target) <= min(abs(below - target), abs(above - target)), (
        f"{what}: width {width} costs {here:g}, but the target is {target:g} and widths {width - 1} / "
        f"{width + 1} cost {below:g} / {above:g}")
