"""The filter language: shorthands, matching, combinators, value semantics."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest
from helpers import _spec, assert_laid_out, BNNet

import eqx_pmapstate as ep
from eqx_pmapstate.filters import (
    All,
    Any,
    Everything,
    Filter,
    Not,
    Nothing,
    OfType,
    PathContains,
    to_predicate,
    WithTag,
)


A = jtu.GetAttrKey
D = jtu.DictKey
S = jtu.SequenceKey


# --------------------------------------------------------------------------- shorthands


def test_type_means_oftype():
    f = to_predicate(ep.ParamState)
    assert isinstance(f, OfType)
    assert f == OfType(ep.ParamState)
    assert f((), ep.ParamState(jnp.zeros(2)))
    assert not f((), ep.ShortTermState(jnp.zeros(2)))
    assert not f((), jnp.zeros(2))
    # subclasses count, as for isinstance
    assert to_predicate(ep.State)((), ep.NonBatchState(jnp.zeros(2)))


def test_str_means_withtag():
    f = to_predicate("fast")
    assert isinstance(f, WithTag)
    assert f == WithTag("fast")
    assert f((), ep.ShortTermState(jnp.zeros(2), tag="fast"))
    assert not f((), ep.ShortTermState(jnp.zeros(2), tag="slow"))
    assert not f((), ep.ShortTermState(jnp.zeros(2)))
    assert not f((), jnp.zeros(2))  # a bare array has no tag


@pytest.mark.parametrize("shorthand", [True, ...])
def test_true_and_ellipsis_mean_everything(shorthand):
    f = to_predicate(shorthand)
    assert isinstance(f, Everything)
    assert f((), jnp.zeros(2))
    assert f((A("x"),), ep.NonBatchState(jnp.zeros(2)))


@pytest.mark.parametrize("shorthand", [False, None])
def test_false_and_none_mean_nothing(shorthand):
    f = to_predicate(shorthand)
    assert isinstance(f, Nothing)
    assert not f((), jnp.zeros(2))
    assert not f((A("x"),), ep.ParamState(jnp.zeros(2)))


@pytest.mark.parametrize("container", [list, tuple])
def test_list_and_tuple_mean_any(container):
    f = to_predicate(container([ep.ParamState, "t"]))
    assert isinstance(f, Any)
    assert f == Any(ep.ParamState, "t")
    assert f((), ep.ParamState(jnp.zeros(2)))
    assert f((), ep.ShortTermState(jnp.zeros(2), tag="t"))
    assert not f((), ep.ShortTermState(jnp.zeros(2), tag="u"))
    assert not f((), jnp.zeros(2))


def test_empty_list_matches_nothing():
    f = to_predicate([])
    assert f == Any()
    assert not f((), ep.ParamState(jnp.zeros(2)))
    assert not f((A("x"),), ep.ShortTermState(jnp.zeros(2), tag="t"))
    assert not f((), jnp.zeros(2))


def test_one_argument_callable_is_asked_about_the_value():
    f = to_predicate(eqx.is_inexact_array)
    assert f((), jnp.zeros(2, jnp.float32))
    assert not f((), jnp.zeros(2, jnp.int32))
    # a marker: the question is about its value, not about the marker object
    assert f((), ep.ParamState(jnp.zeros(2, jnp.float32)))
    assert not f((), ep.ParamState(jnp.zeros(2, jnp.int32)))

    seen = []

    def probe(x):
        seen.append(x)
        return True

    value = jnp.arange(3)
    assert to_predicate(probe)((A("a"),), ep.ShortTermState(value))
    assert seen and all(s is value for s in seen)


def test_one_argument_callable_on_a_pytree_value_asks_every_array():
    f = to_predicate(eqx.is_inexact_array)
    both = ep.State({"a": jnp.zeros(2), "b": jnp.zeros(2)})
    mixed = ep.State({"a": jnp.zeros(2), "b": jnp.zeros(2, jnp.int32)})
    assert f((), both)
    assert not f((), mixed)


def test_two_argument_callable_gets_path_and_state():
    seen = []

    def fn(path, state):
        seen.append((path, state))
        return len(path) == 2

    f = to_predicate(fn)
    st = ep.ParamState(jnp.zeros(2))
    path = (A("layer"), A("weight"))
    assert f(path, st)
    assert not f(path[:1], st)
    assert seen[0][0] == path and seen[0][1] is st  # the marker itself, not its value
    assert seen[1][0] == path[:1] and seen[1][1] is st


def test_filter_instance_is_returned_as_is():
    f = PathContains("x")
    assert to_predicate(f) is f
    g = Not(OfType(ep.ParamState))
    assert to_predicate(g) is g


@pytest.mark.parametrize("bad", [42, 1.5, {"a": 1}, {1, 2}, b"bytes", object()])
def test_anything_else_is_a_typeerror(bad):
    with pytest.raises(TypeError) as e:
        to_predicate(bad)
    assert type(bad).__name__ in str(e.value)
    assert f"Cannot use {bad!r} of type {type(bad).__name__} as a filter" in str(
        e.value
    )


def test_int_one_is_not_true():
    # `True` is a shorthand; `1` (equal to True) is not.
    with pytest.raises(TypeError, match="Cannot use 1 of type int as a filter"):
        to_predicate(1)  # pyright: ignore[reportArgumentType]  (deliberately not a filter)
    with pytest.raises(TypeError, match="Cannot use 0 of type int as a filter"):
        to_predicate(0)  # pyright: ignore[reportArgumentType]  (deliberately not a filter)


def test_callable_of_three_arguments_is_a_typeerror():
    def three(a, b, c):
        return True

    with pytest.raises(
        TypeError, match=r"<function .*three .* must take one argument .* or two"
    ):
        to_predicate(three)


def test_bad_filter_inside_a_list_is_a_typeerror():
    with pytest.raises(TypeError, match="Cannot use 42 of type int as a filter"):
        to_predicate([ep.ParamState, 42])  # pyright: ignore[reportArgumentType]  (a deliberately invalid filter)


# --------------------------------------------------------------------------- OfType


def test_oftype_matches_inside_an_instance_directly():
    bn = eqx.nn.BatchNorm(3, axis_name="b", mode="ema")
    lin = eqx.nn.Linear(2, 2, key=jax.random.key(0))
    f = OfType(eqx.nn.BatchNorm)
    assert f((A("bn"), A("weight")), bn.weight, ancestors=("root", bn))
    assert not f((A("lin"), A("weight")), lin.weight, ancestors=("root", lin))
    assert OfType((eqx.nn.BatchNorm, eqx.nn.Linear))((), lin.weight, ancestors=(lin,))


def test_oftype_batchnorm_and_state_in_pmap2_new_states(leaks):
    net, state = ep.pmap2_new_states(
        eqx.nn.make_with_state(BNNet),
        {"key": jax.random.key(0)},
        state_out_axes={None: OfType(eqx.nn.BatchNorm), -1: OfType(eqx.nn.State)},
    )
    # the BatchNorm's arrays are replicated
    assert net.bn.weight.shape == (2,)
    assert net.bn.bias.shape == (2,)
    assert _spec(net.bn.weight) == ()
    assert_laid_out(net.bn.weight, None)
    assert_laid_out(net.bn.bias, None)
    # the Linear's arrays matched nothing: axis 0
    assert net.linear.weight.shape == (8, 2, 3)
    assert net.linear.bias.shape == (8, 2)
    assert _spec(net.linear.weight) == ("devices",)
    assert_laid_out(net.linear.weight, 0)
    assert_laid_out(net.linear.bias, 0)
    # everything in the eqx.nn.State: device axis last
    leaves = jtu.tree_leaves(state)
    assert len(leaves) == 3
    shapes = sorted(x.shape for x in leaves)
    assert shapes == [(2, 8), (2, 8), (8,)]
    for x in leaves:
        assert x.sharding.spec[x.ndim - 1] == "devices"
        assert_laid_out(x, x.ndim - 1)


# --------------------------------------------------------------------------- PathContains


def test_pathcontains_attribute_dict_key_and_index():
    path = (A("encoder"), D("blocks"), S(2), A("weight"))
    assert PathContains("encoder")(path, None)
    assert PathContains("blocks")(path, None)
    assert PathContains(2)(path, None)
    assert PathContains("weight")(path, None)
    assert not PathContains("decoder")(path, None)
    assert not PathContains("enc")(path, None)  # whole entries, not substrings
    assert not PathContains(1)(path, None)
    assert not PathContains("encoder")((), None)
    # a key-path entry itself works too
    assert PathContains(A("encoder"))(path, None)
    assert PathContains(S(2))(path, None)


class _EncDec(eqx.Module):
    encoder: dict
    decoder: list


def _make_encdec():
    return _EncDec(
        encoder={"w": jnp.zeros(2), "v": jnp.zeros(2)},
        decoder=[ep.ShortTermState(jnp.zeros(2)), ep.ShortTermState(jnp.ones(2))],
    )


def test_pathcontains_really_matches_paths_in_pmap2_new_states(leaks):
    # brainstate calls filters with an empty path, so PathContains never matches there.
    with pytest.warns(UserWarning, match="PathContains\\(key='nothing'\\)"):
        out = ep.pmap2_new_states(
            _make_encdec,
            state_out_axes={
                1: PathContains("w"),
                None: PathContains(1),
                -1: PathContains("nothing"),
            },
        )
    assert out.encoder["w"].shape == (2, 8)  # dict key -> axis 1
    assert_laid_out(out.encoder["w"], 1)
    assert out.encoder["v"].shape == (8, 2)  # no match -> axis 0
    assert_laid_out(out.encoder["v"], 0)
    assert out.decoder[0].value.shape == (8, 2)
    assert_laid_out(out.decoder[0].value, 0)
    assert out.decoder[1].value.shape == (2,)  # index 1 -> replicated
    assert_laid_out(out.decoder[1].value, None)
    np.testing.assert_array_equal(np.asarray(out.decoder[1].value), np.ones(2))

    out = ep.pmap2_new_states(
        _make_encdec, state_out_axes={-1: PathContains("decoder")}
    )
    assert out.decoder[0].value.shape == (2, 8)  # attribute name
    assert out.decoder[1].value.shape == (2, 8)
    assert_laid_out(out.decoder[0].value, 1)
    assert_laid_out(out.decoder[1].value, 1)
    for k in ("w", "v"):
        assert out.encoder[k].shape == (8, 2)
        assert_laid_out(out.encoder[k], 0)


def test_two_argument_callable_in_state_out_axes(leaks):
    seen = []

    def is_v(path, state):
        seen.append(path)
        return bool(path) and path[-1] == D("v")

    out = ep.pmap2_new_states(_make_encdec, state_out_axes={None: is_v})
    assert out.encoder["v"].shape == (2,)
    assert_laid_out(out.encoder["v"], None)
    assert out.encoder["w"].shape == (8, 2)
    assert_laid_out(out.encoder["w"], 0)
    for d in out.decoder:
        assert d.value.shape == (8, 2)
        assert_laid_out(d.value, 0)
    assert (A("encoder"), D("w")) in seen  # real, non-empty paths
    assert (A("encoder"), D("v")) in seen


# --------------------------------------------------------------------------- combinators


def test_any_all_not_and_operators():
    tagged_param = ep.ParamState(jnp.zeros(2), tag="a")
    plain_param = ep.ParamState(jnp.zeros(2))
    tagged_short = ep.ShortTermState(jnp.zeros(2), tag="a")
    path = (A("x"),)

    is_param = OfType(ep.ParamState)
    has_a = WithTag("a")

    both = All(is_param, has_a)
    assert both(path, tagged_param)
    assert not both(path, plain_param)
    assert not both(path, tagged_short)

    either = Any(is_param, has_a)
    assert either(path, tagged_param)
    assert either(path, plain_param)
    assert either(path, tagged_short)
    assert not either(path, ep.LongTermState(jnp.zeros(2)))

    neg = Not(is_param)
    assert not neg(path, tagged_param)
    assert neg(path, tagged_short)

    assert (is_param & has_a) == both
    assert (is_param | has_a) == either
    assert (~is_param) == neg
    assert isinstance(is_param | has_a, Any)
    assert isinstance(is_param & has_a, All)
    assert isinstance(~is_param, Not)
    assert (is_param & ~has_a)(path, plain_param)
    assert not (is_param & ~has_a)(path, tagged_param)


def test_combinators_accept_shorthands():
    f = All(ep.ParamState, "a")
    assert f == All(OfType(ep.ParamState), WithTag("a"))
    assert Not("a") == Not(WithTag("a"))
    assert f((), ep.ParamState(jnp.zeros(2), tag="a"))
    assert Any()((), jnp.zeros(2)) is False
    assert All()((), jnp.zeros(2)) is True


def test_combinators_pass_ancestors_through():
    bn = eqx.nn.BatchNorm(3, axis_name="b", mode="ema")
    f = All(OfType(eqx.nn.BatchNorm), PathContains("weight"))
    assert f((A("weight"),), bn.weight, (bn,))
    assert not f((A("weight"),), bn.weight, ())
    assert Not(OfType(eqx.nn.BatchNorm))((A("weight"),), bn.weight, ()) is True
    assert Not(OfType(eqx.nn.BatchNorm))((A("weight"),), bn.weight, (bn,)) is False


# --------------------------------------------------------------------------- value semantics


@pytest.mark.parametrize(
    "make",
    [
        lambda: OfType(ep.ParamState),
        lambda: WithTag("t"),
        lambda: PathContains("encoder"),
        lambda: PathContains(0),
        lambda: Any(ep.ParamState, "t"),
        lambda: All(ep.ParamState, Not("t")),
        lambda: Not(PathContains("x")),
        lambda: Everything(),
        lambda: Nothing(),
        lambda: to_predicate(eqx.is_inexact_array),
        lambda: OfType(ep.ParamState) | WithTag("t"),
    ],
)
def test_filters_compare_and_hash_by_value(make):
    a, b = make(), make()
    assert a is not b
    assert a == b
    assert hash(a) == hash(b)
    assert len({a, b}) == 1
    assert isinstance(a, Filter)


def test_different_filters_are_not_equal():
    assert OfType(ep.ParamState) != OfType(ep.ShortTermState)
    assert WithTag("a") != WithTag("b")
    assert PathContains("a") != PathContains("b")
    assert Any(ep.ParamState, "a") != Any(ep.ParamState, "b")
    assert Any(ep.ParamState, "a") != All(ep.ParamState, "a")
    assert Everything() != Nothing()
    assert OfType(ep.ParamState) != WithTag("ParamState")
    assert (
        len({OfType(ep.ParamState), OfType(ep.ShortTermState), OfType(ep.ParamState)})  # pyright: ignore[reportUnhashable]  # Equinox's dataclass_transform omits frozen_default, so pyright thinks Modules unhashable
        == 2
    )
