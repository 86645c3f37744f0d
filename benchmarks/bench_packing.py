"""pytest-benchmark suite: packed ONE-PEACE step vs the released padded step (forward + backward),
in fp32 and under the ``auto`` precision (bf16 autocast on a CPU with native bf16).

    .venv/bin/pytest benchmarks/bench_packing.py --benchmark-group-by=param:mix
"""

import pytest
from packing import MIXES, make_mix, packed_forward

from omni_core.precision import resolve_precision
from omni_core.recipes.one_peace_padded import padded_forward


@pytest.mark.parametrize("precision", ["fp32", "auto"])
@pytest.mark.parametrize("mix", sorted(MIXES))
@pytest.mark.parametrize("forward", [packed_forward, padded_forward], ids=["packed", "padded"])
def test_step(benchmark, mix, forward, precision):
    model, recipe, samples, masks = make_mix(mix)
    prec = resolve_precision(precision, "cpu")
    benchmark.extra_info["precision"] = prec.name

    def run():
        model.zero_grad(set_to_none=True)
        with prec.autocast("cpu"):
            loss, _ = recipe.loss(model, forward(recipe, model, samples, masks), samples, masks)
        loss.backward()
        return loss

    loss = benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    assert loss.isfinite()
