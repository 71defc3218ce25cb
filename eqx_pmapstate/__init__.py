"""eqx_pmapstate: create and train Equinox models whose states are laid out over devices."""

from . import filters as filters
from ._describe import describe as describe
from ._describe import states_by_axis as states_by_axis
from ._map import Map as Map
from ._new_states import pmap2_new_states as pmap2_new_states
from ._new_states import vmap2_new_states as vmap2_new_states
from ._engine import ReplicationError as ReplicationError
from ._pmap2 import pmap2 as pmap2
from ._pmap2 import Pmap2 as Pmap2
from ._pmap2 import StateAxes as StateAxes
from ._state import LongTermState as LongTermState
from ._state import NonBatchState as NonBatchState
from ._state import ParamState as ParamState
from ._state import ShortTermState as ShortTermState
from ._state import State as State


__version__ = "0.1.0"
