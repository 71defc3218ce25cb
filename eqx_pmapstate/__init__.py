"""eqx_pmapstate: create and train Equinox models whose states are laid out over devices."""

from . import filters as filters
from ._cache import clear_caches as clear_caches
from ._checkpoint import load as load, save as save
from ._describe import (
    axes_of as axes_of,
    describe as describe,
    states_by_axis as states_by_axis,
)
from ._distributed import initialize_distributed as initialize_distributed
from ._errors import ReplicationError as ReplicationError
from ._explain import RecompileWarning as RecompileWarning
from ._layout import DEFAULT as DEFAULT
from ._map import Map as Map
from ._new_states import (
    eval_new_states as eval_new_states,
    pmap2_new_states as pmap2_new_states,
    vmap2_new_states as vmap2_new_states,
)
from ._pmap2 import Pmap2 as Pmap2, pmap2 as pmap2, StateAxes as StateAxes
from ._relayout import abstract as abstract, relayout as relayout
from ._state import (
    LongTermState as LongTermState,
    NonBatchState as NonBatchState,
    ParamState as ParamState,
    ShortTermState as ShortTermState,
    State as State,
)
from ._typing import per_device as per_device, PerDevice as PerDevice


# The version lives in pyproject.toml only: read it from the installed package's metadata.
try:
    import importlib.metadata as _metadata

    __version__ = _metadata.version("eqx_pmapstate")
except ImportError:  # PackageNotFoundError: imported from a source tree, not installed
    __version__ = "0+unknown"
