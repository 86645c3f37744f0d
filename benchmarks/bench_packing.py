"""pytest-benchmark suite: packed ONE-PEACE step vs the released padded step (forward + backward).

    .venv/bin/pytest benchmarks/bench_packing.py --benchmark-group-by=param:mix
"""

import pytest
from packing import MIXES, make_mix, packed_forward

from omni_core.recipes.one_peace_padded import padded_forward


@pytest.mark.parametrize("mix", sorted(MIXES))
@pytest.mark.parametrize("forward", [packed_forward, padded_forward], ids=["packed", "padded"])
def test_step(benchmark, mix, forward):
    model, recipe, samples, masks = make_mix(mix)

    def run():
        model.zero_grad(set_to_none=True)
        loss, _ = recipe.loss(model, forward(recipe, model, samples, masks), samples, masks)
        loss.backward()
        return loss

    loss = benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    assert loss.isfinite()
