"""The shared training loop with a method's own optimizers and update: named optimizers are checkpointed and resumed
exactly, the default update is plain gradient descent, and a mismatched checkpoint is refused."""

import pytest
import torch
from torch import nn

from genreg.training import StepContext, TrainConfig, adamw, fit, load_checkpoint, resolve_checkpoint


class TwoPlayers(nn.Module):
    """A toy game with two parameter sets, as a generator / critic pair has."""

    def __init__(self):
        super().__init__()
        self.g = nn.Parameter(torch.tensor([1.0, -2.0]))
        self.c = nn.Parameter(torch.tensor([0.5]))

    def forward(self, batch: dict) -> torch.Tensor:
        x = batch["x"]
        return ((self.g * x).sum(-1) - self.c).pow(2).mean() + 0.1 * self.g.pow(2).sum()


def sample(step: int, index: int) -> dict:
    g = torch.Generator().manual_seed(1000 * step + index)
    return {"x": torch.randn(2, generator=g)}


def two_optimizers(params, config, lr):
    model_g, model_c = params
    return {"generator": torch.optim.SGD([model_g], lr=lr), "critic": torch.optim.Adam([model_c], lr=lr)}


def alternating(ctx: StepContext) -> torch.Tensor:
    """Critic step on the first micro-batch, then a generator step on the same batch (SFD's alternation)."""
    batch = next(iter(ctx.micro_batches()))
    total = torch.zeros(())
    for name in ("critic", "generator"):
        loss = ctx.model(batch)
        ctx.accelerator.backward(loss)
        for other in ctx.optimizers:  # each player updates only its own parameters
            if other != name:
                ctx.optimizers[other].zero_grad(set_to_none=True)
        ctx.optimizers[name].step()
        ctx.schedules[name].step()
        ctx.optimizers[name].zero_grad(set_to_none=True)
        total = total + loss.detach()
    return total


def config(tmp_path, name, **changes):
    base = dict(
        output_dir=str(tmp_path / name),
        max_train_steps=6,
        train_batch_size=2,
        learning_rate=0.05,
        checkpointing_steps=3,
        report_to="none",
    )
    return TrainConfig(**(base | changes))


def run(tmp_path, name, stop_after=None, **changes):
    model = TwoPlayers()
    steps = {"n": 0}

    def should_stop():
        steps["n"] += 1
        return stop_after is not None and steps["n"] == stop_after

    result = fit(
        model,
        sample,
        config(tmp_path, name, **changes),
        optimizers=two_optimizers,
        update=alternating,
        should_stop=should_stop,
    )
    return model, result


def test_named_optimizers_resume_exactly(tmp_path):
    whole, _ = run(tmp_path, "whole")
    _, first = run(tmp_path, "split", stop_after=2)
    assert first.stopped and first.step == 2
    checkpoint = resolve_checkpoint("latest", tmp_path / "split")
    _, _, states, meta = load_checkpoint(checkpoint)
    assert set(states) == {"generator", "critic"} and meta["optimizers"] == ["generator", "critic"]
    assert (checkpoint / "optimizer-critic.safetensors").is_file()
    resumed, second = run(tmp_path, "split", resume_from_checkpoint="latest")
    assert second.step == 6 and len(second.losses) == 4
    for a, b in zip(whole.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_each_player_moves_only_its_parameters(tmp_path):
    model = TwoPlayers()
    g0 = model.g.detach().clone()

    def critic_only(ctx: StepContext) -> torch.Tensor:
        loss = ctx.model(next(iter(ctx.micro_batches())))
        ctx.accelerator.backward(loss)
        ctx.optimizers["critic"].step()
        for optimizer in ctx.optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    fit(model, sample, config(tmp_path, "c"), optimizers=two_optimizers, update=critic_only)
    assert torch.equal(model.g, g0) and model.c.item() != 0.5


def test_default_update_is_adamw_and_refuses_another_runs_optimizers(tmp_path):
    model = TwoPlayers()
    fit(model, sample, config(tmp_path, "a", max_train_steps=3))
    manual = TwoPlayers()
    optimizer = adamw(list(manual.parameters()), config(tmp_path, "a"), 0.05)["optimizer"]
    for step in range(3):
        batch = {"x": torch.stack([sample(step, i)["x"] for i in range(2)])}
        manual(batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    for a, b in zip(model.parameters(), manual.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="holds optimizers"):
        run(tmp_path, "a", resume_from_checkpoint="latest", max_train_steps=6)


def test_a_fresh_run_into_another_runs_folder_is_refused(tmp_path):
    run(tmp_path, "r", max_train_steps=3)
    with pytest.raises(ValueError, match="holds the checkpoints of an earlier run.*--resume_from_checkpoint latest"):
        run(tmp_path, "r", max_train_steps=3)


def test_resuming_with_other_settings_is_refused(tmp_path):
    run(tmp_path, "r", stop_after=2)
    for change, name in (({"seed": 1}, "seed"), ({"train_batch_size": 4}, "global_batch")):
        with pytest.raises(ValueError, match=f"other settings \\({name}"):
            run(tmp_path, "r", resume_from_checkpoint="latest", **change)
    fit(TwoPlayers(), sample, config(tmp_path, "m", max_train_steps=2), settings={"method": "b"})
    with pytest.raises(ValueError, match="method: 'b' there, 'c' now"):
        fit(TwoPlayers(), sample, config(tmp_path, "m", resume_from_checkpoint="latest"), settings={"method": "c"})


def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(tmp_path, caplog):
    whole, _ = run(tmp_path, "whole")
    run(tmp_path, "split", stop_after=4, checkpointing_steps=2)
    damaged = tmp_path / "split" / "checkpoint-4" / "trainable.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:20])  # truncated, as by a crash mid-copy
    resumed, result = run(tmp_path, "split", resume_from_checkpoint="latest", checkpointing_steps=2)
    assert "checkpoint-4 cannot be read" in caplog.text and len(result.losses) == 4  # steps 3..6 again
    for a, b in zip(whole.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch):
    import errno

    import genreg.training.checkpoints as checkpoints

    real, calls = checkpoints.save_file, {"n": 0}

    def full(tensors, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:  # the second checkpoint: trainable + two optimizers were the first
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoints, "save_file", full)
    with pytest.raises(OSError, match="no space left .* checkpoint-6; the earlier checkpoints are intact"):
        run(tmp_path, "disk")
    assert [p.name for p in (tmp_path / "disk").iterdir() if "checkpoint" in p.name] == ["checkpoint-3"]
