"""Under mpiexec: exercise CommunicationGroup on the CPU and print one line per check (rank 0)."""

import numpy as np

from infinilm_nb.backend import get_backend
from infinilm_nb.kernels import reference
from infinilm_nb.runtime.distributed import CommunicationGroup, RankInfo

info = RankInfo.detect()
group = CommunicationGroup(info, get_backend("cpu"))
n, r = info.world_size, info.rank

x = np.arange(6, dtype=np.float32) * (r + 1)
group.all_reduce(x)
assert np.array_equal(x, np.arange(6, dtype=np.float32) * sum(range(1, n + 1))), x

h = np.full(3, r + 0.5, dtype=np.float16)
group.all_reduce(h)
assert np.allclose(h, sum(k + 0.5 for k in range(n))), h

bf = reference.cast(np.full(3, r + 0.25, dtype=np.float32), reference.BF16)  # bfloat16 bits: summed as values
group.all_reduce(bf)
assert bf.dtype == np.uint16 and np.allclose(reference.to_f32(bf), sum(k + 0.25 for k in range(n))), bf

out = np.empty((n, 2), np.int32)
group.all_gather(np.array([r, 10 * r], np.int32), out)
assert np.array_equal(out, np.array([[k, 10 * k] for k in range(n)])), out

b = np.array([r, r], np.int32)
group.broadcast(b, root=n - 1)
assert np.array_equal(b, [n - 1, n - 1])
assert group.broadcast_object({"rank": r}) == {"rank": 0}
if r == 0:
    print(f"comm ok world={n}")
