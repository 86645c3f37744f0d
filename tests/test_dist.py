"""Distributed running on CPU with gloo, two processes started by the test itself.

A 2-rank DDP step and a 2-rank FSDP2 step must equal the single-process computation in float64:
with the autograd gather, the 1-process step on the global batch; with the default gather, the
average of ONE-PEACE's per-rank losses computed in one process. A dead or hung rank must make the
other exit with a clear error within the collective timeout.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from omni_core.model.omni import IMAGE, TEXT, ModalInputs, OmniModel, SegmentRef
from omni_core.train import dist as odist

SMALL = dict(depth=1, dim=64, heads=2, ffn_hidden=128, embed_dim=32, stem_channels=16, audio_channels=32,
             image_size=32, vocab_size=200)
ENV = {"OMP_NUM_THREADS": "1"}


def make_model(seed: int = 0) -> OmniModel:
    torch.manual_seed(seed)
    model = OmniModel.from_preset("tiny", **SMALL).double()
    with torch.no_grad():  # a non-trivial scale so its gradient is not tiny
        model.logit_scale.fill_(2.0)
    return model


def global_batch(n: int, seed: int = 1) -> ModalInputs:
    g = torch.Generator().manual_seed(seed)
    return ModalInputs(text=[torch.randint(0, 200, (3 + i % 4,), generator=g) for i in range(n)],
                       image=torch.randn(n, 3, 32, 32, generator=g, dtype=torch.float64), audio=[])


def rows(inputs: ModalInputs, lo: int, hi: int) -> ModalInputs:
    return ModalInputs(text=inputs.text[lo:hi], image=inputs.image[lo:hi], audio=[])


def embeddings(model: OmniModel, inputs: ModalInputs) -> tuple[torch.Tensor, torch.Tensor]:
    n = len(inputs.text)
    feats, batch = model(inputs, [[SegmentRef(m, i)] for m in (TEXT, IMAGE) for i in range(n)])
    cls = feats[batch.cu_seqlens[:-1].long()]
    return model.project(cls[:n], TEXT), model.project(cls[n:], IMAGE)


def nce(q: torch.Tensor, keys: torch.Tensor, offset: int, scale: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(scale * q @ keys.t(), torch.arange(q.shape[0]) + offset)


def contrastive_loss(model: OmniModel, inputs: ModalInputs, with_grad: bool | str) -> torch.Tensor:
    """Symmetric InfoNCE with negatives from every rank (the loss's use of gather_rows).
    ``"released"``: ONE-PEACE's released form, every candidate row detached (the recipe's default)."""
    t, i = embeddings(model, inputs)
    if with_grad == "released":
        t_all, offset = odist.gather_rows(t.detach(), False)
        i_all, _ = odist.gather_rows(i.detach(), False)
    else:
        t_all, offset = odist.gather_rows(t, with_grad)
        i_all, _ = odist.gather_rows(i, with_grad)
    scale = model.logit_scale.exp().clamp(max=100)
    return 0.5 * (nce(i, t_all, offset, scale) + nce(t, i_all, offset, scale))


def onepeace_reference(model: OmniModel, inputs: ModalInputs, bounds: list[int], released: bool = False
                       ) -> torch.Tensor:
    """One process: the mean over ranks of each rank's loss, other ranks' rows detached (all
    candidate rows with ``released``, as ONE-PEACE's criterion: queries carry the gradient)."""
    t, i = embeddings(model, inputs)
    scale = model.logit_scale.exp().clamp(max=100)
    losses = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        def keys(x, lo=lo, hi=hi):
            return x.detach() if released else torch.cat([x[:lo].detach(), x[lo:hi], x[hi:].detach()])
        losses.append(0.5 * (nce(i[lo:hi], keys(t), lo, scale) + nce(t[lo:hi], keys(i), lo, scale)))
    return torch.stack(losses).mean()


def full_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            g = p.grad
            out[name] = g.full_tensor() if hasattr(g, "full_tensor") else g
    return {k: v.detach().clone() for k, v in out.items()}


def _rank_step(mode: str, with_grad: bool, n: int, checkpoint_activations: bool) -> dict:
    r, w = odist.rank(), odist.world_size()
    per = n // w
    model = make_model()
    runner = odist.wrap_model(model, mode, checkpoint_activations=checkpoint_activations)
    loss = runner(contrastive_loss, rows(global_batch(n), r * per, (r + 1) * per), with_grad)
    loss.backward()
    return {"loss": odist.all_reduce_mean({"loss": loss.item()})["loss"], "grads": full_grads(model)}


def _rank_main(mode: str, n: int, out: str) -> None:
    """One launch per mode (process start-up dominates): both gathers, and for FSDP2 activation
    checkpointing and gradient accumulation; for DDP the raw gather checks."""
    result = {g: _rank_step(mode, g, n, mode == "fsdp") for g in (True, False, "released")}
    if mode == "fsdp":
        result["accum"] = _accum_step()
    else:
        _gather_check(out)
    if odist.rank() == 0:
        torch.save(result, out)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a - b).norm() <= 1e-10 * max(b.norm(), 1e-30)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_equal_one_process(mode, tmp_path):
    n = 6
    inputs = global_batch(n)
    out = tmp_path / f"{mode}.pt"
    odist.launch_local(_rank_main, 2, mode, n, str(out), env=ENV)
    runs = torch.load(out)

    ref_model = make_model()  # --gather-grad: the 1-process step on the global batch
    loss = contrastive_loss(ref_model, inputs, with_grad=True)
    loss.backward()
    ref = full_grads(ref_model)
    got = runs[True]
    assert abs(got["loss"] - loss.item()) <= 1e-12 * abs(loss.item())
    assert got["grads"].keys() == ref.keys() and "logit_scale" in ref
    for name in ref:
        assert close(got["grads"][name], ref[name]), name

    ref_model = make_model()  # default: ONE-PEACE's per-rank loss, averaged by the data-parallel reduce
    loss = onepeace_reference(ref_model, inputs, [0, n // 2, n])
    loss.backward()
    ref1 = full_grads(ref_model)
    got = runs[False]
    assert abs(got["loss"] - loss.item()) <= 1e-12 * abs(loss.item())
    for name in ref1:
        assert close(got["grads"][name], ref1[name]), name
    # the two gathers differ where they should: the remote rows' gradients
    assert not close(ref1["heads.0.weight"], ref["heads.0.weight"])

    ref_model = make_model()  # the recipe's default: ONE-PEACE's released criterion, candidates detached
    loss = onepeace_reference(ref_model, inputs, [0, n // 2, n], released=True)
    loss.backward()
    ref2, got = full_grads(ref_model), runs["released"]
    assert abs(got["loss"] - loss.item()) <= 1e-12 * abs(loss.item())
    for name in ref2:
        assert close(got["grads"][name], ref2[name]), name
    assert not close(ref2["heads.0.weight"], ref1["heads.0.weight"])
    if mode == "ddp":
        _check_gathers(str(out))
    else:
        _check_accumulation(runs["accum"])


def _gather_check(out: str) -> None:
    r = odist.rank()
    sizes = [3, 5]  # unequal row counts, as packed steps give
    x = torch.full((sizes[r], 2), float(r + 1), dtype=torch.float64, requires_grad=True)
    weights = torch.arange(16, dtype=torch.float64).view(8, 2) * (r + 1)  # differs per rank
    result = {}
    for with_grad in (True, False):
        x.grad = None
        rows_all, offset = odist.gather_rows(x * 1.0, with_grad)
        (rows_all * weights).sum().backward()
        result[with_grad] = (rows_all.detach(), offset, x.grad.clone())
    result["metrics"] = odist.all_reduce_mean({"a": float(r), "b": torch.tensor(2.0 * r), "name": "x"})
    torch.save(result, f"{out}.{r}")


def _check_gathers(out: str) -> None:
    expect = torch.cat([torch.full((3, 2), 1.0), torch.full((5, 2), 2.0)]).double()
    base = torch.arange(16, dtype=torch.float64).view(8, 2)
    for r, (lo, hi) in enumerate([(0, 3), (3, 8)]):
        res = torch.load(f"{out}.{r}")
        for with_grad in (True, False):
            rows_all, offset, grad = res[with_grad]
            assert torch.equal(rows_all, expect) and offset == lo
        # autograd gather: every rank's weight for my rows comes back to me (1 + 2 = 3 × base)
        assert torch.equal(res[True][2], 3 * base[lo:hi])
        # no-grad gather: only my own loss reaches my rows
        assert torch.equal(res[False][2], (r + 1) * base[lo:hi])
        assert res["metrics"] == {"a": 0.5, "b": 1.0, "name": "x"}


def test_single_process_is_identity():
    x = torch.randn(4, 3, requires_grad=True)
    for with_grad in (True, False):
        y, offset = odist.gather_rows(x, with_grad)
        assert y is x and offset == 0
    assert odist.all_reduce_mean({"loss": 1.5}) == {"loss": 1.5}
    info = odist.init_distributed() if "WORLD_SIZE" not in os.environ else None
    assert info is None or (info.world_size == 1 and info.backend is None)
    with pytest.raises(RuntimeError, match="torchrun"):
        odist.wrap_model(make_model(), "ddp")
    with pytest.raises(ValueError, match="unknown distribution mode"):
        odist.wrap_model(make_model(), "zero3")


def test_checkpointed_blocks_give_the_same_gradients():
    inputs = global_batch(4)
    grads = []
    for ac in (False, True):
        model = make_model()
        runner = odist.wrap_model(model, "none", checkpoint_activations=ac)
        runner(contrastive_loss, inputs, True).backward()
        grads.append(full_grads(model))
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert close(grads[1][name], grads[0][name]), name


def test_compiled_blocks_match_eager():
    """``--compile`` compiles each block with torch.compile. Here with the ``aot_eager`` backend:
    Dynamo's capture of the block (custom ops through their fake kernels) and AOTAutograd's
    backward, in seconds. Inductor itself also matches eager on this CPU (5e-15 in float64, checked
    by hand) but takes about a minute per compile on 2 cores, and recompiles once for the next step's
    token count: too slow for the suite. Two steps of different lengths (the recompile) must match."""
    results = []
    for backend in (False, "aot_eager"):
        model = make_model()
        runner = odist.wrap_model(model, "none", compile=backend)
        steps = []
        for n, seed in ((4, 1), (5, 3)):
            loss = runner(contrastive_loss, global_batch(n, seed), True)
            loss.backward()
            steps.append((loss.detach(), full_grads(model)))
            model.zero_grad(set_to_none=True)
        results.append(steps)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # it did compile
    for (loss, grads), (ref_loss, ref_grads) in zip(results[1], results[0]):
        assert close(loss, ref_loss)
        assert grads.keys() == ref_grads.keys()
        for name in ref_grads:
            assert close(grads[name], ref_grads[name]), name


def _accum_step() -> dict:
    """K=2 micro-steps with the reduction skipped on the first: the sum of both steps' gradients."""
    r = odist.rank()
    inputs = global_batch(8)
    model = make_model()
    runner = odist.wrap_model(model, "fsdp")
    for k, sync in ((0, False), (1, True)):
        lo = 4 * k + 2 * r
        with odist.accumulate(runner, sync):
            runner(contrastive_loss, rows(inputs, lo, lo + 2), True).backward()
    return full_grads(model)


def _check_accumulation(got: dict) -> None:
    inputs = global_batch(8)
    model = make_model()
    for k in range(2):
        contrastive_loss(model, rows(inputs, 4 * k, 4 * k + 4), True).backward()
    ref = full_grads(model)
    for name in ref:
        assert close(got[name], ref[name]), name


WORKER = textwrap.dedent("""
    import os, signal, sys, time
    import torch
    from omni_core.train import dist as odist
    info = odist.init_distributed(timeout_s=float(sys.argv[1]))
    with odist.peer_guard():
        for step in range(10_000):
            if info.rank == 1 and step == 3:
                os.kill(os.getpid(), getattr(signal, sys.argv[2]))
            t = torch.ones(4)
            torch.distributed.all_reduce(t)
            time.sleep(0.01)
""")


@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])
def test_dead_or_hung_rank_stops_the_other(how, tmp_path):
    timeout = 6.0
    env = {**os.environ, **ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(odist.free_port()),
           "WORLD_SIZE": "2", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(timeout), how],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        start = time.monotonic()
        _, err = procs[0].communicate(timeout=timeout + 60)
        waited = time.monotonic() - start
    finally:
        procs[1].kill()
        procs[1].wait()
    assert procs[0].returncode != 0
    assert "lost contact with another rank" in err, err[-2000:]
    assert waited < timeout + 30  # start-up + the timeout, never an indefinite hang


# ---------------------------------------------------------------- ONE-PEACE stage 2 under FSDP2
def stage2_samples(n: int, seed: int) -> list:
    from omni_core.data.sample import Sample

    g = torch.Generator().manual_seed(seed)
    return [Sample(f"s{i}", torch.randn(3, 32, 32, generator=g, dtype=torch.float64),
                   torch.randn(4000 + 800 * i, generator=g, dtype=torch.float64), "",
                   torch.cat([torch.randint(5, 200, (4 + i,), generator=g), torch.tensor([3])])) for i in range(n)]


def _stage2_run(mode: str) -> dict:
    """Two optimizer steps of ONE-PEACE stage 2 (frozen rows of the stacked FFN / final-norm
    parameters) on this rank's half of each global batch; the full parameters after them."""
    from omni_core.recipes.one_peace import OnePeaceRecipe
    from omni_core.train.trainer import TrainArgs, make_optimizer, train_step

    r = odist.rank()
    model = make_model()
    recipe = OnePeaceRecipe("2", word_start=torch.ones(200, dtype=torch.bool), eos_id=3)
    recipe.attach(model)
    model.dcl_decoder.double()
    recipe.prepare(model, reset_logit_scale=True)
    runner = odist.wrap_model(model, mode)
    optimizer = make_optimizer(model, TrainArgs(data="", out=""))
    for step in range(2):
        batch = stage2_samples(4, seed=10 + step)[2 * r:2 * r + 2]
        train_step(model, recipe, optimizer, 5e-2, 3.0, batch, torch.device("cpu"),
                   torch.Generator().manual_seed(100 * step + r), runner)
    return full_state(model)


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in model.state_dict().items()}


def _stage2_main(out: str) -> None:
    result = {mode: _stage2_run(mode) for mode in ("ddp", "fsdp")}
    if odist.rank() == 0:
        torch.save(result, out)


def test_stage2_frozen_rows_under_fsdp_equal_ddp(tmp_path):
    from omni_core.model.omni import AUDIO

    out = tmp_path / "stage2.pt"
    odist.launch_local(_stage2_main, 2, str(out), env=ENV)
    runs = torch.load(out)
    model = make_model()  # the weights both runs started from
    start = model.state_dict()
    ddp, fsdp = runs["ddp"], runs["fsdp"]
    assert ddp.keys() == fsdp.keys()
    for name in ddp:
        assert close(fsdp[name], ddp[name]), name
    stacked = [k for k in start if k.startswith("final_norm.") or ".ffn." in k]
    assert stacked
    for name in stacked:  # the audio rows train, every other row is exactly as it was
        rows = torch.ones(start[name].shape[0], dtype=torch.bool)
        rows[AUDIO] = False
        assert torch.equal(fsdp[name][rows], start[name][rows]), name
        assert not torch.equal(fsdp[name][AUDIO], start[name][AUDIO]), name
    for name in ("blocks.0.attn.q_proj.weight", "text.embed.weight", "heads.0.weight"):
        assert torch.equal(fsdp[name], start[name]), name
    assert not torch.equal(fsdp["heads.2.weight"], start["heads.2.weight"])
