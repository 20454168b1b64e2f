"""Training checkpoints: each rank's RNG states, and what a checkpoint refuses to load into."""
import pytest
import torch

from bitlab.errors import BitlabError
from bitlab.train import checkpoint
from bitlab.train.distributed import DistInfo


def test_rng_of_missing_ranks_is_seeded_by_step_and_rank(caplog):
    """A checkpoint of 1 process resumed on 2: rank 0 restores its state, rank 1 (none saved)
    starts a stream seeded by (step, rank) — reproducible, different from rank 0's — with a warning."""
    torch.manual_seed(7)
    saved = [checkpoint.rng_state()]
    ref = torch.rand(3)
    checkpoint.restore_rng(saved, DistInfo(rank=0, world_size=2), step=5)
    assert torch.equal(torch.rand(3), ref)
    assert "RNG states of 1 process(es), this run has 2: ranks 1 and up start streams" in caplog.text
    draws = []
    for _ in range(2):
        checkpoint.restore_rng(saved, DistInfo(rank=1, world_size=2), step=5)
        draws.append(torch.rand(3))
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], ref)




def test_checkpoint_round_trip_and_refusals(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    path = checkpoint.save_checkpoint(tmp_path / "checkpoint.pt", 7, model, opt, None, DistInfo(), "lin")
    expected = torch.rand(2)  # what the global RNG draws next after the save
    assert checkpoint.saved_step(path) == 7
    other = torch.nn.Linear(3, 2)
    other_opt = torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9)
    ckpt = checkpoint.load_checkpoint(path, other, other_opt, None)
    assert ckpt["step"] == 7 and torch.equal(other.weight, model.weight)
    assert torch.equal(other_opt.state_dict()["state"][0]["momentum_buffer"], opt.state_dict()["state"][0]["momentum_buffer"])
    assert torch.equal(torch.rand(2), expected)  # the RNG is back where it was at the save
    with pytest.raises(BitlabError, match=r"checkpoint is for another architecture \(lin, 2 tensors\)"):
        checkpoint.load_checkpoint(path, torch.nn.Linear(4, 2), other_opt, None)
    (tmp_path / "x.pt").write_bytes(b"not a checkpoint")
    assert checkpoint.saved_step(tmp_path / "x.pt") == "?"
    torch.save({"model": {}}, tmp_path / "y.pt")
    with pytest.raises(BitlabError, match="not a bitlab training checkpoint"):
        checkpoint.load_checkpoint(tmp_path / "y.pt", other, other_opt, None)
