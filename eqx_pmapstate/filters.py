"""The filter language of `eqx_pmapstate`: which states go to which axis."""

from ._filters import (
    All as All,
    Any as Any,
    Everything as Everything,
    Filter as Filter,
    Not as Not,
    Nothing as Nothing,
    OfType as OfType,
    PathContains as PathContains,
    to_predicate as to_predicate,
    WithTag as WithTag,
)
