"""XLA:CPU flags mllm_jax runs with: appended to XLA_FLAGS before jax starts its backends (train.py and
benchmarks/throughput.py call ``apply`` first; the tests do not, their results do not depend on it);
a flag already named in XLA_FLAGS is left as the user set it.

- ``--xla_cpu_experimental_ynn_fusion_type=`` (an empty list: no YNNPACK fusions). By default jaxlib 0.10 hands
  every dot to a YNNPACK fusion that runs on one thread, so a train step's two cores only overlap where two
  independent matmuls happen to be ready at once (a profile of the vlm_small step: each core busy ~55% of it). Without
  them the dots are Eigen's, which splits every matmul over the intra-op pool: the vlm_small train step runs
  1.15-1.27x faster (benchmarks/RESULTS.md), although a lone 2048^2 matmul runs ~20% slower.
"""

from __future__ import annotations

import os
import re

DEFAULTS = (("xla_cpu_experimental_ynn_fusion_type", ""),)


def missing(xla_flags: str) -> list[str]:
    """The default flags that ``xla_flags`` does not name, as ``--name=value`` strings."""
    named = set(re.findall(r"--([A-Za-z0-9_]+)", xla_flags))
    return [f"--{name}={value}" for name, value in DEFAULTS if name not in named]


def apply(environ=None) -> list[str]:
    """Append the missing defaults to XLA_FLAGS in ``environ`` (default os.environ); returns what was added. Only
    takes effect if jax has not started its CPU backend yet."""
    env = os.environ if environ is None else environ
    flags = env.get("XLA_FLAGS", "")
    added = missing(flags)
    if added:
        env["XLA_FLAGS"] = " ".join([flags, *added]).strip()
    return added
