"""`pmap2`: a `filter_pmap`-style decorator over global arrays laid out on a mesh.

The package is split by job (see its README.md): `_api` (the decorator and `Pmap2`),
`_axes` (`in_axes`/`out_axes` specs), `_inputs` (reading a call's inputs), `_outputs`
(the default output rule) and `_dispatch` (running a compiled entry).
"""

from ._api import Pmap2 as Pmap2, pmap2 as pmap2
from ._axes import StateAxes as StateAxes
