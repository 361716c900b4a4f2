import time

import pytest

from tests.distributed.mpi import mpiexec

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize("ranks", [2, 3])
def test_collectives_on_cpu(ranks):
    done = mpiexec(ranks, ["-m", "tests.distributed.comm_worker"])
    assert done.returncode == 0, done.stderr
    assert f"comm ok world={ranks}" in done.stdout


def test_a_failing_rank_brings_every_rank_down_quickly():
    code = (
        "from infinilm_nb.runtime.distributed import RankInfo, install_abort_on_error, CommunicationGroup\n"
        "from infinilm_nb.backend import get_backend\n"
        "info = RankInfo.detect(); install_abort_on_error(info)\n"
        "group = CommunicationGroup(info, get_backend('cpu'))\n"
        "if info.rank == 1: raise RuntimeError('rank one failed on purpose')\n"
        "group.barrier()\n"
    )
    start = time.monotonic()
    done = mpiexec(2, ["-c", code], timeout=60)
    assert done.returncode != 0
    assert "rank one failed on purpose" in done.stderr
    assert time.monotonic() - start < 30
