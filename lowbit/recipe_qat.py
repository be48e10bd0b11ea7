"""A recipe's ``qat:`` section: how ranges and batch norms behave in quantization-aware training.

.. code-block:: yaml

    qat:
      weight_range: lsq          # lsq (learned step size) | minmax (follows the weight)
      input_range: lsq           # lsq (LSQ+, learned offset when asymmetric) | moving_average
      averaging_constant: 0.01   # moving_average only
      freeze_ranges_after: null  # training steps after which minmax/moving_average ranges stop
      freeze_bn_after: null      # training steps after which batch-norm statistics freeze
      learned_offset: true       # LSQ+: learn the zero point of asymmetric inputs
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from lowbit.spec import SpecError

__all__ = ["QatConfig", "WEIGHT_RANGES", "INPUT_RANGES"]

WEIGHT_RANGES = ("lsq", "minmax")
INPUT_RANGES = ("lsq", "moving_average")


def _steps(name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SpecError(f"qat.{name}={value!r} must be a number of training steps (>= 0) or null")


@dataclass(frozen=True)
class QatConfig:
    """Range and batch-norm handling for :func:`lowbit.prepare` with ``qat=True``.

    >>> QatConfig().weight_range, QatConfig.from_dict({"input_range": "moving_average"}).input_range
    ('lsq', 'moving_average')
    """

    weight_range: str = "lsq"
    input_range: str = "lsq"
    averaging_constant: float = 0.01
    freeze_ranges_after: int | None = None
    freeze_bn_after: int | None = None
    learned_offset: bool = True

    def __post_init__(self) -> None:
        if self.weight_range not in WEIGHT_RANGES:
            raise SpecError(
                f"qat.weight_range={self.weight_range!r} is unknown: use one of "
                f"{list(WEIGHT_RANGES)}"
            )
        if self.input_range not in INPUT_RANGES:
            raise SpecError(
                f"qat.input_range={self.input_range!r} is unknown: use one of {list(INPUT_RANGES)}"
            )
        c = self.averaging_constant
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0.0 < c <= 1.0:
            raise SpecError(f"qat.averaging_constant={c!r} must be a number in (0, 1]")
        _steps("freeze_ranges_after", self.freeze_ranges_after)
        _steps("freeze_bn_after", self.freeze_bn_after)
        if not isinstance(self.learned_offset, bool):
            raise SpecError(f"qat.learned_offset={self.learned_offset!r} must be true or false")

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form, as written in YAML."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = "recipe.qat") -> QatConfig:
        """Read a ``qat:`` mapping strictly (an unknown key is an error naming it)."""
        if not isinstance(data, dict):
            raise SpecError(
                f"{where} must be a mapping such as {{weight_range: lsq}}, got {data!r}"
            )
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
        try:
            return cls(**data)
        except SpecError as err:
            raise SpecError(f"{where}: {err}") from None
