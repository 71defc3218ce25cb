"""Run-time checks that a value is the same on every device or ensemble member.

Used where the dataflow pass cannot prove a replicated value identical (a state made
equal by arithmetic, `x - x`): two 32-bit hashes of each array's bits, compared across
the axis with a single `pmax`; or, on one device, an exact comparison of the members.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def _words(x):
    """The bits of `x` as a flat uint32 vector."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        x = jnp.stack([x.real, x.imag])
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    if jax.dtypes.itemsize_bits(x.dtype) < 8:  # int4, uint4, float4, ...: widen exactly
        wide = jnp.int8 if jnp.issubdtype(x.dtype, jnp.signedinteger) else jnp.uint8
        x = x.astype(wide if jnp.issubdtype(x.dtype, jnp.integer) else jnp.float32)
    size = x.dtype.itemsize
    bits = jax.lax.bitcast_convert_type(
        x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}[size]
    )
    if size == 8:
        bits = jax.lax.bitcast_convert_type(bits, jnp.uint32)
    return bits.astype(jnp.uint32).ravel()


def _mix(h):
    # The finaliser of MurmurHash3: every input bit affects every output bit.
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _hash_words(w, pos):
    # Two independent hashes of each word, mixed with its position, so that differences
    # in several words do not cancel out in the sum the way they can in a weighted sum.
    a = _mix(w ^ _mix(pos + jnp.uint32(0x9E3779B9)))
    b = _mix(
        (w + jnp.uint32(0x7F4A7C15))
        ^ _mix(pos * jnp.uint32(0x27D4EB2F) + jnp.uint32(1))
    )
    return jnp.stack([a, b], axis=-1)


_SMALL = 1 << 16  # arrays of at most this many words are hashed together, in one pass


def checksums(xs: Sequence) -> jax.Array:
    """Two uint32 hashes of the bits of each array of `xs`, as a `(len(xs), 2)` array.

    Large arrays are hashed and summed one by one (fused, no copy); small ones are
    concatenated and hashed in one pass, which costs far less than many tiny reductions.
    Nothing of the size of the arrays is baked into the program as a constant.
    """
    words = [_words(jnp.asarray(x)) for x in xs]
    out: list = [None] * len(words)
    small = [i for i, w in enumerate(words) if w.size <= _SMALL]
    for i, w in enumerate(words):
        if w.size > _SMALL:
            out[i] = jnp.sum(
                _hash_words(w, jnp.arange(w.size, dtype=jnp.uint32)),
                axis=0,
                dtype=jnp.uint32,
            )
    if small:
        bounds = np.cumsum([0] + [words[i].size for i in small]).astype(np.int32)
        cat = jnp.concatenate([words[i] for i in small])
        iota = jnp.arange(cat.size, dtype=jnp.int32)
        starts = jnp.asarray(bounds[:-1])
        # Which array each word belongs to: a running count of the starts passed.
        segment = (
            jnp.cumsum(jnp.zeros(cat.size, jnp.int32).at[starts].add(1, mode="drop"))
            - 1
        )
        pos = (iota - starts[segment]).astype(jnp.uint32)
        sums = jax.ops.segment_sum(
            _hash_words(cat, pos),
            segment,
            num_segments=len(small),
            indices_are_sorted=True,
        )
        for k, i in enumerate(small):
            out[i] = sums[k]
    return jnp.stack(out) if out else jnp.zeros((0, 2), jnp.uint32)


def checksum(x) -> jax.Array:
    """`checksums` of one array: its two hashes."""
    return checksums([x])[0]


def same_bits(x, y) -> jax.Array:
    """Whether two arrays hold the very same bits (NaNs included)."""
    return jnp.array_equal(_words(jnp.asarray(x)), _words(jnp.asarray(y)))


def differ_across(xs: Sequence, axis_name) -> jax.Array:
    """Inside a per-device program: a bool per array of `xs`, True where it is not the
    same on every device of `axis_name` (the same value on every device)."""
    sums = checksums(xs)
    top = jax.lax.pmax(jnp.stack([sums, ~sums]), axis_name)  # pmin(x) is ~pmax(~x)
    return jnp.any(top[0] != ~top[1], axis=1)


def differ_between_members(stacked: jax.Array) -> jax.Array:
    """For an array with the ensemble axis first: whether its members differ."""
    first = stacked[0]
    return ~jnp.all(jax.vmap(lambda m: same_bits(m, first))(stacked))
