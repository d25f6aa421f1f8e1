"""Fixtures of the distributed tests: pools of real ranks (see rank_pool.py).

These tests spawn processes that join a gloo process group, so they run in their own
nox session (``nox -s distributed``), not with fused-sgd's unit tests.

They compare every rank's shards with torch.optim's bit for bit, FusedAdamW's too: the ranks run
with ``FUSED_OPTIM_TORCH_SQRT`` set (fp32 takes torch's square root, see fused_core.kernels), set
here before any rank is spawned. What the default square root changes is tested in fused-adam.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fused_core.kernels import TORCH_SQRT_ENV

os.environ[TORCH_SQRT_ENV] = "1"

# The helper modules next to the tests (rank_pool, dist_training) are imported by name, in
# this process and in the spawned ranks (which inherit sys.path).
sys.path.insert(0, str(Path(__file__).parent))

from rank_pool import RankPool, RankPools  # noqa: E402


@pytest.fixture(scope="session")
def rank_pools() -> Iterator[RankPools]:
    pools = RankPools()
    yield pools
    pools.close()


@pytest.fixture(params=[2, 4], ids=lambda n: f"{n}ranks")
def ranks(request: pytest.FixtureRequest, rank_pools: RankPools) -> RankPool:
    """A pool of 2, then 4 ranks: the test runs once with each."""
    return rank_pools.get(request.param)


@pytest.fixture
def two_ranks(rank_pools: RankPools) -> RankPool:
    return rank_pools.get(2)


def pytest_configure(config: pytest.Config) -> None:
    # torch.distributed.optim scripts its functional optimizers when imported (torch's own warning).
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.script` is deprecated:DeprecationWarning")
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.interface` is deprecated:DeprecationWarning")
