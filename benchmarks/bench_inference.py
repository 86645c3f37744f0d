"""pytest-benchmark suite: embeddings per modality, packed vs ONE-PEACE's padded batches.

    .venv/bin/pytest benchmarks/bench_inference.py --benchmark-group-by=param:modality

Each round decodes and embeds 32 items of one modality (one batch), end to end, as
``omni bench inference`` does; items come from a small ``omni data synth`` dataset made once
per session.
"""

import pytest
import torch
from inference import EMBED, decoder, read_items, run_once

from omni_core.data.synth import generate
from omni_core.data.tokenizer import load_tokenizer
from omni_core.model.omni import AUDIO, IMAGE, TEXT, OmniModel
from omni_core.precision import resolve_precision

ITEMS = 32


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("inference") / "triplets"
    generate(path, n_train=ITEMS, n_eval=0, seed=0, workers=2, shard_size=ITEMS)
    torch.manual_seed(0)
    return OmniModel.from_preset("tiny").eval(), read_items(path, ITEMS), load_tokenizer(path)


@pytest.mark.parametrize("precision", ["fp32", "auto"])
@pytest.mark.parametrize("modality", [TEXT, IMAGE, AUDIO], ids=["text", "image", "audio"])
@pytest.mark.parametrize("method", sorted(EMBED))
def test_embed(benchmark, setup, method, modality, precision):
    model, items, tokenizer = setup
    prec = resolve_precision(precision, "cpu")
    benchmark.extra_info["precision"] = prec.name
    decode = decoder(modality, model, tokenizer)
    _, emb = benchmark.pedantic(run_once, args=(model, modality, items[modality], method, ITEMS, decode, prec),
                                rounds=3, warmup_rounds=1)
    assert emb.shape == (ITEMS, model.cfg.embed_dim) and emb.isfinite().all()
