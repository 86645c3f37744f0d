"""pytest-benchmark suite: packed step vs ONE-PEACE's padded step (forward + backward).

    .venv/bin/pytest benchmarks/bench_packing.py --benchmark-group-by=param:mix
"""

import pytest
from packing import MIXES, make_mix

from omni_core.train.steps import packed_step, padded_step


@pytest.mark.parametrize("mix", sorted(MIXES))
@pytest.mark.parametrize("step", [packed_step, padded_step], ids=["packed", "padded"])
def test_step(benchmark, mix, step):
    model, inputs, views = make_mix(mix)

    def run():
        model.zero_grad(set_to_none=True)
        loss, *_ = step(model, inputs, views)
        loss.backward()
        return loss

    loss = benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    assert loss.isfinite()
