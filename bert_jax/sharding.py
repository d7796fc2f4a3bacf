"""Device mesh, logical axis names, and the one table mapping names to mesh axes.

Mesh axes:
  data    pure data parallelism (params replicated across it)
  fsdp    data parallelism with params, gradients and optimizer state sharded across it
  tensor  tensor (model) parallelism: heads, FFN width and vocabulary split across it

Weight axes are named where params are created (model/encoder.py, model/heads.py); activation axes
use the separate `act_*` vocabulary so that the two can be sharded independently.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from absl import logging
from flax import linen as nn
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# The one rules table. A logical name absent from here is an error (see `spec_for`).
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # weights
    ("layers", None),        # stacked layer copies: scanned over, never sharded
    ("vocab", "tensor"),
    ("embed", "fsdp"),       # the model width H (or E) on weights
    ("embed_out", None),     # the output side of an H->H (or H->E) square-ish weight
    ("heads", "tensor"),
    ("kv", None),            # per-head width K
    ("mlp", "tensor"),       # FFN width F
    ("positions", None),
    ("types", None),
    ("norm", None),          # LayerNorm scale and bias
    ("classes", None),       # task-head outputs (labels, 2 for NSP/SOP and span ends)
    # activations
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)
LOGICAL_NAMES = frozenset(name for name, _ in RULES)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default all); -1 takes what is left."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one of data/fsdp/tensor may be -1, got {sizes}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh: {len(devices)} devices are not divisible by fsdp*tensor*data={known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) < len(devices) and jax.process_count() == 1:
        logging.warning("mesh: data*fsdp*tensor=%s uses %d of the %d devices", sizes, math.prod(sizes), len(devices))
        devices = devices[:math.prod(sizes)]
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh: data*fsdp*tensor={sizes} uses {math.prod(sizes)} devices, "
                         f"but {len(devices)} are present")
    try:
        arr = mesh_utils.create_device_mesh(sizes, devices)
    except (ValueError, NotImplementedError, AssertionError):  # no physical topology (fake CPU devices)
        arr = np.asarray(devices).reshape(sizes)
    return Mesh(arr, MESH_AXES)


def spec_for(names: tuple[str | None, ...]) -> P:
    """PartitionSpec for a tuple of logical axis names, through RULES."""
    for n in names:
        if n is not None and n not in LOGICAL_NAMES:
            raise KeyError(f"logical axis name {n!r} has no rule in sharding.RULES")
    return nn.logical_to_mesh_axes(names, RULES)


def fit_spec(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """`spec` with each dimension that its mesh axes do not divide evenly left unsplit
    (e.g. RoBERTa's 50265-token vocabulary over an even tensor axis): replicated is
    always correct, where XLA would refuse an uneven split."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
        ways = math.prod(mesh.shape[a] for a in names)
        out.append(axes if dim % ways == 0 else None)
    return P(*out)


def mesh_shardings(boxed_tree, mesh: Mesh):
    """Tree of NamedShardings for a (possibly abstract) tree of nn.Partitioned boxes."""
    def one(box):
        if not isinstance(box, nn.Partitioned):
            return NamedSharding(mesh, P())
        spec = spec_for(tuple(box.names))
        return NamedSharding(mesh, fit_spec(spec, box.value.shape, mesh))
    return jax.tree.map(one, boxed_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def data_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Batch-leading arrays split over data and fsdp."""
    return NamedSharding(mesh, spec_for(("act_batch",) + (None,) * (ndim - 1)))


def constrain(x, names: tuple[str | None, ...]):
    """Activation sharding constraint by logical names, under the mesh set with
    `jax.set_mesh`; a no-op when no mesh is set (single device, tests of the math)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
        return x
    return jax.lax.with_sharding_constraint(x, fit_spec(spec_for(names), x.shape, mesh))
