"""Counting Pallas Mosaic GPU kernel launches in a traced function (no GPU needed)."""

import jax


def kernel_launches(fn, *args) -> int:
    """Mosaic GPU kernels (each a `custom_vmap_call`) in the traced gradient of `fn` with
    respect to every argument: the forward plus the backward pass."""
    jaxpr = jax.make_jaxpr(jax.grad(fn, argnums=tuple(range(len(args)))))(*args).jaxpr
    return _count(jaxpr)


def sub_jaxprs(eqn):
    """The jaxprs an equation calls (jit, custom_vjp, scan, cond branches, a kernel's body)."""
    for p in eqn.params.values():
        for q in p if isinstance(p, (tuple, list)) else (p,):
            sub = q if hasattr(q, "eqns") else getattr(q, "jaxpr", None)
            if hasattr(sub, "eqns"):
                yield sub


def _count(jaxpr) -> int:
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == "custom_vmap_call"
        n += sum(_count(sub) for sub in sub_jaxprs(eqn))
    return n


def named_value_sources(fn, *args, name: str) -> list[str]:
    """For each value `checkpoint_name`d `name` in the traced `fn`, the primitive that made it."""
    return _sources(jax.make_jaxpr(fn)(*args).jaxpr, name)


def _sources(jaxpr, name: str) -> list[str]:
    producer = {v: eqn.primitive.name for eqn in jaxpr.eqns for v in eqn.outvars}
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "name" and eqn.params.get("name") == name:
            found.append(producer.get(eqn.invars[0], "input"))
        for sub in sub_jaxprs(eqn):
            found += _sources(sub, name)
    return found
