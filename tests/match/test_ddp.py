"""Matching training under torchrun (2 ranks, gloo on CPU) on real synthetic stores: sharding, rank 0
writing the run, DDP with SLAN's parameters, and SLAN's ITC queue all-gathered so every rank holds the
same queue with every rank's pairs. Plus the distributed helpers in a single process."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import yaml

from synth_store import make_synth_store, make_text_cache
from vlcache.pipeline.runs import RunDir
from vlcache.stages.common import distributed as D
from vlcache.stages.match.data import MatchDataset
from vlcache.stages.match.model import MatchNet, match_losses, model_args
from vlcache.stages.match.train import MatchTrainConfig, train_match

torch.set_num_threads(1)
SLAN = dict(model="slan", d=32, slan_levels=2, slan_regions=4, slan_samples=1, slan_queue=32, region_norm=True,
            device="cpu", log_every=1, val_max_images=4)


@pytest.fixture(scope="module")
def grid7():
    return make_synth_store(grid=7)[0]


@pytest.fixture(scope="module")
def cache(grid7):
    return make_text_cache(grid7)


# Each rank: all_gather_cat of unequal parts, then train_match from a JSON config; dumps what it saw.
DDP_SCRIPT = """
import json, sys, torch
torch.set_num_threads(1)
from vlcache.stages.common import distributed as D
from vlcache.stages.match.data import match_loader
from vlcache.stages.match.train import MatchTrainConfig, make_dataset, train_match
configs, out = json.loads(sys.argv[1]), sys.argv[2]
D.init_distributed("cpu")
info = {"rank": D.rank(), "world": D.world_size(), "gathered": D.all_gather_cat(
    torch.full((D.rank() + 1, 2), float(D.rank()))).tolist(), "runs": []}
for run_dir, kw in configs:
    cfg = MatchTrainConfig(**kw)
    seen, last = [], {}
    summary = train_match(cfg, run_dir, on_step=lambda s, t, net: (seen.append(t["loss"]), last.update(net=net)))
    net = last["net"]
    rec = {"step": summary["step"], "losses": seen, "param_sum": float(sum(p.double().sum() for p in net.parameters()))}
    # this rank's shard of epoch 0, as the training loop's sampler deals it
    _, sampler = match_loader(make_dataset(cfg, cfg.train_split, None, cfg.captions, labels=False), cfg.batch_size,
                              seed=cfg.seed, window_blocks=cfg.window_blocks, rank=D.rank(),
                              world_size=D.world_size(), drop_last=True)
    rec["shard"] = sampler.rank_order(0).tolist()
    if net.kind == "slan":
        q = net.net.queue
        rec["queue"] = {"ids": q.ids.tolist(), "img": q.img.tolist(), "filled": int(q.filled), "ptr": int(q.ptr)}
    info["runs"].append(rec)
D.cleanup()
open(f"{out}/rank{info['rank']}.json", "w").write(json.dumps(info))
"""


def run_torchrun(tmp_path, configs: list) -> list[dict]:
    """Run DDP_SCRIPT on 2 ranks; returns each rank's record (rank order). A hung rank ends the whole
    launcher process group, never leaving workers behind."""
    (tmp_path / "ddp.py").write_text(DDP_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(tmp_path / "ddp.py"), json.dumps(configs), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=env)
    try:
        _, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    # rank r sent r + 1 rows of r: unequal parts come back whole, in rank order, on both ranks
    assert ranks[0]["gathered"] == ranks[1]["gathered"] == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
    return ranks


def check_run(run_dir, ranks: list[dict], k: int, steps: int) -> RunDir:
    """Both ranks took ``steps`` steps on disjoint shards and ended with the same parameters; rank 0 alone
    wrote the run."""
    a, b = (r["runs"][k] for r in ranks)
    assert a["step"] == b["step"] == steps and len(a["losses"]) == len(b["losses"]) == steps
    assert not set(a["shard"]) & set(b["shard"])  # drop_last: disjoint shards of one epoch
    assert a["losses"] != b["losses"]  # different data on each rank
    assert a["param_sum"] == b["param_sum"]  # DDP kept the replicas identical
    run = RunDir(run_dir)
    assert yaml.safe_load(run.config_path.read_text())["world_size"] == 2
    train_steps = [r["step"] for r in run.metrics() if "loss" in r]
    assert train_steps == list(range(1, steps + 1))  # one record per step: rank 0 only
    assert [r["loss"] for r in run.metrics() if "loss" in r] == pytest.approx(a["losses"])  # rank 0's losses
    ckpt = run.load_checkpoint("last")
    assert ckpt["step"] == steps and ckpt["world_size"] == 2
    return run


def test_scan_trains_on_two_ranks_and_a_mid_epoch_stop_needs_two_ranks_to_resume(tmp_path):
    url = make_synth_store()[0]
    # 40 training images over 2 ranks: 20 each, batches of 10 images (one caption each) -> 2 steps per epoch;
    # stop in epoch 2
    cfg = dict(model="scan", store=url, epochs=2, batch_size=10, captions="one", embed=32, word_dim=32,
               vocab_min_count=1, lr=1e-3, device="cpu", log_every=1, val_max_images=4, max_steps=3)
    ranks = run_torchrun(tmp_path, [[str(tmp_path / "scan"), cfg]])
    run = check_run(tmp_path / "scan", ranks, 0, 3)
    assert [r["epoch"] for r in run.metrics() if "val_rsum" in r] == [0]  # validated once, by rank 0
    assert run.load_checkpoint("last")["batches"] == 1 and run.load_checkpoint("best") is not None
    assert (run.path / "vocab.json").is_file() and (run.figures / "loss.png").is_file()
    with pytest.raises(ValueError, match=r"stopped mid-epoch with 2 rank\(s\).*now 1"):
        train_match(MatchTrainConfig(**{**cfg, "max_steps": 0}), tmp_path / "scan")


def test_slan_queue_gathers_every_rank_and_frozen_boxes_run_under_ddp(grid7, cache, tmp_path):
    # 2 steps per rank (caption-level epoch, stopped), 10 pairs per rank and step: 40 pairs enqueued into 32 slots
    cfg = dict(store=grid7, text_cache=cache, epochs=1, batch_size=10, lr=1e-3, max_steps=2, **SLAN)
    # slan_levels=0 leaves (empty) per-level parameters without gradient: DDP must be told to look for them,
    # else it raises at the 2nd step; after one step (this run) the replicas silently differ (param_sum)
    frozen = {**cfg, "slan_levels": 0, "max_steps": 1}
    ranks = run_torchrun(tmp_path, [[str(tmp_path / "slan"), cfg], [str(tmp_path / "frozen"), frozen]])
    run = check_run(tmp_path / "slan", ranks, 0, 2)
    qa, qb = (r["runs"][0]["queue"] for r in ranks)
    assert qa == qb  # the same queue on both ranks (rank 1's enqueues are not lost to rank 0's broadcast)
    assert qa["filled"] == 32 and qa["ptr"] == 40 % 32  # the global batch (20 pairs) per step
    shards = [set(r["runs"][0]["shard"]) for r in ranks]
    ids = set(qa["ids"])
    assert ids <= shards[0] | shards[1] and ids & shards[0] and ids & shards[1]  # pairs of both ranks
    saved = run.load_checkpoint("last")["model"]
    assert saved["net.queue.ids"].tolist() == qa["ids"]
    assert torch.allclose(saved["net.queue.img"], torch.tensor(qa["img"]))
    check_run(tmp_path / "frozen", ranks, 1, 1)


def test_all_gather_cat_and_wrap_model_in_a_single_process(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert D.init_distributed("cpu").world_size == 1
    x = torch.arange(6.0).view(3, 2).requires_grad_()
    y = D.all_gather_cat(x)
    assert torch.equal(y, x.detach()) and not y.requires_grad  # identity, detached
    assert torch.equal(D.all_gather_cat(torch.tensor([4, 5])), torch.tensor([4, 5]))
    with pytest.raises(ValueError, match="0-d"):
        D.all_gather_cat(torch.tensor(1.0))
    model = torch.nn.Linear(2, 2)
    assert D.wrap_model(model, torch.device("cpu"), find_unused_parameters=True) is model


@pytest.mark.parametrize("levels", [0, 2])
def test_has_unused_parameters_says_which_slan_leaves_parameters_without_gradient(grid7, cache, levels):
    cfg = MatchTrainConfig(store=grid7, text_cache=cache, **{**SLAN, "slan_levels": levels, "w_itm": 0.0})
    ds = MatchDataset(grid7, text="bert", visual="grid", text_cache=cache, split="train")
    b = ds[ds.rows[:6]]
    torch.manual_seed(0)
    net = MatchNet(**model_args(cfg, 2048, 0, 384))
    res = match_losses(net(b, attention=False), b, cfg, torch.Generator().manual_seed(0), net=net)
    res["loss"].backward()
    unused = [n for n, p in net.named_parameters() if p.grad is None]
    assert net.has_unused_parameters == bool(unused), unused  # a term at weight 0 still gives (zero) gradients
    assert not MatchNet(**model_args(MatchTrainConfig(model="mmca", store=grid7), 2048, 0, 384)).has_unused_parameters
