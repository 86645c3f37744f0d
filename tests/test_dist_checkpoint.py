"""Sharded checkpoints across world sizes: a 1-process checkpoint loads into 2-rank FSDP2, a
2-rank FSDP2 step is saved and loads back into one process, equal to the 1-process step."""

from __future__ import annotations

import torch
from test_dist import ENV, contrastive_loss, global_batch, make_model, rows

from omni_core.train import dist as odist
from omni_core.train.checkpoint import latest_sharded, load_sharded, save_sharded


def optimizer(model: torch.nn.Module) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.98))


def step(runner, opt, inputs) -> None:
    opt.zero_grad(set_to_none=True)
    runner(contrastive_loss, inputs, True).backward()
    opt.step()


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in model.state_dict().items()}


def _rank_main(ref_run: str, run: str, out: str, n: int) -> None:
    r, w = odist.rank(), odist.world_size()
    model = make_model(seed=7)  # other weights: the load must overwrite them
    runner = odist.wrap_model(model, "fsdp")
    opt = optimizer(model)  # after sharding: it must hold the sharded parameters
    _, rank_state = load_sharded(latest_sharded(ref_run), model, opt)
    loaded = full_state(model)
    per = n // w
    step(runner, opt, rows(global_batch(n, seed=2), r * per, (r + 1) * per))
    save_sharded(run, 2, model, opt, {"config": model.config_dict()}, {"rank": r})
    after = full_state(model)  # a collective: every rank
    if r == 0:
        torch.save({"loaded": loaded, "after": after, "rank_state": rank_state}, out)


def test_checkpoint_moves_between_world_sizes(tmp_path):
    n = 4
    ref_run, run, out = tmp_path / "one", tmp_path / "two", tmp_path / "out.pt"
    model = make_model()
    opt = optimizer(model)
    step(odist.wrap_model(model, "none"), opt, global_batch(n, seed=3))  # optimizer state exists
    save_sharded(ref_run, 1, model, opt, {"config": model.config_dict()}, {"rank": 0})
    odist.launch_local(_rank_main, 2, str(ref_run), str(run), str(out), n, env=ENV)
    got = torch.load(out)

    assert got["rank_state"] is None  # saved by 1 rank: its data position does not apply to 2
    for k, v in model.state_dict().items():
        assert torch.equal(got["loaded"][k], v), k
    step(odist.wrap_model(model, "none"), opt, global_batch(n, seed=2))  # the same step, one process

    fresh = make_model(seed=9)
    fresh_opt = optimizer(fresh)
    meta, rank_state = load_sharded(latest_sharded(run), fresh, fresh_opt)
    assert meta["world_size"] == 2 and rank_state is None
    for k, v in model.state_dict().items():
        assert torch.allclose(got["after"][k], v, rtol=1e-10, atol=1e-13), k
        assert torch.equal(fresh.state_dict()[k], got["after"][k]), k
    ref_state, loaded_state = opt.state_dict()["state"], fresh_opt.state_dict()["state"]
    assert ref_state.keys() == loaded_state.keys()  # parameters that never had a gradient have no state
    for i in ref_state:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.allclose(loaded_state[i][name], ref_state[i][name], rtol=1e-10, atol=1e-16), (i, name)
