"""Captioning data (ICA targets from stored instances), training, early stopping and exact resume."""

import json

import numpy as np
import pytest
import torch
import yaml
from synth_store import make_synth_store

from vlcache.pipeline.runs import RunDir
from vlcache.stages.caption.data import CaptionBatches, CaptionTransform, caption_loader
from vlcache.stages.common.store_rows import split_rows, store_fingerprint, train_tokens
from vlcache.stages.caption.train import CaptionTrainConfig, train_caption
from vlcache.stages.common.ica import ica_labels
from vlcache.stages.common.vocab import Vocab
from vlcache.storage.store import open_store

torch.set_num_threads(1)
TINY = dict(embed_dim=32, attn_dim=32, hidden_dim=32, num_workers=0, device="cpu", beam_size=2, max_len=20)


@pytest.fixture(scope="module")
def synth():
    url, data_dir = make_synth_store()
    vocab = Vocab.build(train_tokens(url, split_rows(url, "train")), min_count=5)
    return url, data_dir, vocab


def _batch(url, vocab, rows, **kw):
    tf = CaptionTransform(vocab, 4, ica=True, url=url, **kw)
    return CaptionBatches(url, tf, rows=rows)[list(rows)]


# ---- ICA targets -------------------------------------------------------------------------------------


def test_ica_targets_match_store_matches_and_masks(synth):
    url, data_dir, vocab = synth
    store = open_store(url, image_root=data_dir)
    rows = [0, 1, 2, 5]
    b = _batch(url, vocab, rows)
    assert b["rows"].tolist() == rows  # one block: the order is kept
    assert b["feats"].shape == (4, 16, 2048) and b["feats"].dtype == torch.float16
    # every caption of every image is a sample, encoded <start> tokens <end>
    n_caps = [len(store.captions(r)) for r in rows]
    assert b["img_index"].tolist() == [i for i, n in enumerate(n_caps) for _ in range(n)]
    assert b["captions"].shape[0] == sum(n_caps) and (b["captions"][:, 0] == vocab.start_id).all()
    expected = []
    for s, (i, c) in enumerate(zip(b["img_index"].tolist(), b["cap_index"].tolist())):
        tokens = store.tokens(rows[i])[c]
        assert b["captions"][s, 1:len(tokens) + 1].tolist() == [vocab.stoi.get(t, vocab.unk_id) for t in tokens]
        for m in store.matches(rows[i], c):
            for k in range(m["token_start"], m["token_end"]):
                expected.append((s, k, m["label"], rows[i], c))
    got = list(zip(b["ica_sample"].tolist(), b["ica_step"].tolist(), b["ica_class"].tolist()))
    assert len(expected) > 10 and sorted(got) == sorted(e[:3] for e in expected)
    assert int(b["ica_dropped"]) == 0  # synthetic annotations: every matched class is present (score 1)
    for j, (s, k, cls, row, c) in enumerate(sorted(expected)):
        pos = got.index((s, k, cls))
        # the supervised step predicts the span token: the encoded caption holds it at position step + 1
        assert int(b["captions"][s, k + 1]) == vocab.stoi.get(store.tokens(row)[c][k], vocab.unk_id)
        cov = torch.as_tensor(store.merged_mask(row, c, k, size="grid")).reshape(1, -1)
        want, keep = ica_labels(cov)
        assert keep.item() and want.sum() > 0  # a matched word with a visible instance is never empty
        assert torch.equal(b["ica_labels"][pos], want[0])
        assert torch.allclose(b["ica_coverage"][pos], cov[0])


def test_ica_targets_hand_checked_row(synth):
    url, _, vocab = synth
    b = _batch(url, vocab, [0])
    # row 0, caption 0: "an orange pyramid a small white ring and two plus signs on a checkered background"
    # matches: pyramid -> triangle (2), ring -> ring (4), plus signs -> cross (5)
    first = b["ica_sample"] == 0
    assert list(zip(b["ica_step"][first].tolist(), b["ica_class"][first].tolist())) == [(2, 2), (6, 4), (9, 5), (10, 5)]
    words = [vocab.itos[int(b["captions"][0, k + 1])] for k in (2, 6, 9, 10)]
    assert words[1] == "ring" and words[2] in ("plus", "<unk>")
    # the two tokens of "plus signs" share one merged mask -> the same label map, non-empty
    lab = b["ica_labels"][first]
    assert torch.equal(lab[2], lab[3]) and (lab.sum(1) > 0).all()


def test_ica_score_threshold_is_a_training_choice(synth):
    url, _, vocab = synth
    keep_all = _batch(url, vocab, [0, 1, 2])
    none = _batch(url, vocab, [0, 1, 2], score_threshold=1.01)  # above every instance's score
    assert len(keep_all["ica_sample"]) > 0 and len(none["ica_sample"]) == 0
    assert int(none["ica_dropped"]) == len(keep_all["ica_sample"])
    assert torch.equal(none["captions"], keep_all["captions"])


def test_transform_errors_name_the_row(synth):
    url, _, vocab = synth
    ds = CaptionBatches(url, CaptionTransform(vocab, 4, ica=True, url=url), rows=[3, 4])
    raw = ds.store[[3, 4]]
    bad = dict(raw, **{"matches/span": raw["matches/span"].clone()})
    c = int(np.flatnonzero(raw["matches/count"][1].numpy() > 0)[0])
    bad["matches/span"][1, c, 0, 1] = 99  # a span past the caption's end
    with pytest.raises(ValueError, match=rf"row 4 .*caption {c}: bad matches"):
        ds.transform(bad)
    with pytest.raises(ValueError, match=r"grid/feats has shape .* 7x7 grid"):
        CaptionTransform(vocab, 7, url=url)(raw)


def test_loader_runs_transform_in_workers(synth):
    url, _, vocab = synth
    tf = CaptionTransform(vocab, 4, ica=True, url=url)
    ds = CaptionBatches(url, tf, split="train")
    got = {}
    for workers in (0, 2):
        loader, sampler = caption_loader(ds, 8, shuffle=True, seed=3, num_workers=workers, lanes=2)
        sampler.set_epoch(1)
        got[workers] = list(loader)
    assert len(got[0]) == 5 and sorted(torch.cat([b["rows"] for b in got[0]]).tolist()) == ds.rows.tolist()
    for a, b in zip(got[0], got[2]):  # same batches whoever builds them
        assert torch.equal(a["rows"], b["rows"]) and torch.equal(a["ica_labels"], b["ica_labels"])
        assert torch.equal(a["feats"], b["feats"])


def test_workers_reuse_batch_memory_and_never_overwrite_a_held_batch(synth):
    """The grid features pass through the transform in the worker's shared-memory slot
    (storage/shared_batches.py): a slot is reused once nothing here holds its batch, never before."""
    import os

    url, _, vocab = synth
    ds = CaptionBatches(url, CaptionTransform(vocab, 4, url=url), split="train")
    loader, sampler = caption_loader(ds, 4, shuffle=True, seed=3, num_workers=2)
    expected = {int(r): ds.store[[int(r)]]["grid/feats"][0].clone() for r in ds.rows}  # read in this process
    held, inodes, seen = [], set(), 0
    for epoch in range(3):
        sampler.set_epoch(epoch)
        for i, b in enumerate(loader):
            assert "_vlcache_slot" not in b
            for r, f in zip(b["rows"].tolist(), b["feats"]):
                assert torch.equal(f, expected[r])
            fd, _ = b["feats"].untyped_storage()._share_fd_cpu_()
            inodes.add(os.fstat(fd).st_ino)
            seen += 1
            if epoch == 0 and i < 2:
                held.append((b["rows"].clone(), b["feats"][:, :2]))  # a view keeps the whole batch's slot
    assert len(inodes) <= 2 * loader.slots.per_worker + len(held) + 2 < seen, (len(inodes), seen)
    for rows, view in held:
        for r, f in zip(rows.tolist(), view):
            assert torch.equal(f, expected[r][:2])


def test_store_fingerprint_is_stable(synth):
    url = synth[0]
    fp = store_fingerprint(url)
    assert fp == store_fingerprint(url) and len(fp) > 8


# ---- training ----------------------------------------------------------------------------------------


def test_per_image_features_equal_expanded_features(synth):
    """The training step projects features once per image (img_index); same outputs and gradients."""
    from vlcache.stages.caption.sat import ShowAttendTell

    url, _, vocab = synth
    b = _batch(url, vocab, [0, 1, 2])
    torch.manual_seed(0)
    model = ShowAttendTell(len(vocab), 2048, 16, 16, 16, dropout=0.0)
    feats = b["feats"].float().requires_grad_()
    per_image = model(feats, b["captions"], b["lengths"], img_index=b["img_index"])
    per_image["logits"].sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    expanded = model(feats[b["img_index"]], b["captions"], b["lengths"])
    expanded["logits"].sum().backward()
    for key in ("logits", "alphas", "energies"):
        assert torch.allclose(per_image[key], expanded[key], atol=1e-5), key
    assert all(torch.allclose(g, p.grad, atol=1e-4) for g, p in zip(grads, model.parameters()))
    with pytest.raises(ValueError, match="img_index"):
        model(feats, b["captions"], b["lengths"], img_index=b["img_index"] + 3)



def test_short_training_run_learns_and_writes_its_run(synth, tmp_path):
    url = synth[0]
    cfg = CaptionTrainConfig(store=url, epochs=3, batch_images=8, lr=3e-3, dropout=0.0, log_every=1,
                             val_max_images=2, **TINY)
    steps = []
    summary = train_caption(cfg, tmp_path / "run", progress=False, on_step=lambda s, t: steps.append(t))
    assert summary["steps"] == 15 and summary["epochs_completed"] == 3 and not summary["interrupted"]
    xent = [t["xent"] for t in steps]
    assert np.mean(xent[-3:]) < np.mean(xent[:3]) - 0.2  # it learns
    assert all(t["ica"] > 0 for t in steps)  # ICA on by default, with targets in every batch
    run = RunDir(tmp_path / "run")
    config = yaml.safe_load(run.config_path.read_text())
    assert config["store_fingerprint"] == store_fingerprint(url) and config["ica_weight"] == 0.1
    saved = Vocab.from_dict(json.loads((run.path / "vocab.json").read_text()))
    assert saved.itos == synth[2].itos and saved.max_len == 20
    records = run.metrics()
    train_recs = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_recs] == list(range(1, 16))
    assert all(0 <= r["data_wait"] <= 1 and r["samples_per_s"] > 0 for r in train_recs)
    val = [r for r in records if "val_CIDEr" in r]
    assert [r["epoch"] for r in val] == [0, 1, 2] and all(r["val_CIDEr"] >= 0 for r in val)
    last = run.load_checkpoint("last")  # weights_only load: no pickle
    best = run.load_checkpoint("best")
    assert last["step"] == 15 and last["epoch"] == 3 and best["score"] == summary["best_val_cider"]
    assert (run.figures / "loss.png").stat().st_size > 1000 and (run.figures / "val.png").is_file()
    # rerunning a finished run trains nothing more
    again = train_caption(cfg, tmp_path / "run", progress=False)
    assert again["steps"] == 15 and len(run.metrics()) == len(records)


def test_early_stopping_and_config_guard(synth, tmp_path):
    url = synth[0]
    # lr 0: validation CIDEr never improves after the first epoch -> patience 1 stops after epoch 2
    cfg = CaptionTrainConfig(store=url, epochs=5, batch_images=16, lr=0.0, patience=1, val_max_images=2, **TINY)
    summary = train_caption(cfg, tmp_path / "run", progress=False)
    assert summary["stopped_early"] and summary["epochs_completed"] == 2 and summary["best_epoch"] == 0
    with pytest.raises(ValueError, match=r"different config for \['embed_dim'\]"):
        train_caption(CaptionTrainConfig(**{**cfg.__dict__, "embed_dim": 16}), tmp_path / "run", progress=False)
    with pytest.raises(FileExistsError):
        train_caption(cfg, tmp_path / "run", resume=False, progress=False)
    with pytest.raises(ValueError, match="store is required"):
        train_caption(CaptionTrainConfig(), tmp_path / "other", progress=False)
    with pytest.raises(ValueError, match=r"loss_recipe must be one of \['sgrvinod', 'xu-theano'\], got 'xu'"):
        train_caption(CaptionTrainConfig(store=url, loss_recipe="xu"), tmp_path / "other", progress=False)
    assert not (tmp_path / "other").exists()  # refused before anything is written


class _Crash(RuntimeError):
    pass


def test_resume_after_crash_mid_epoch_equals_uninterrupted(synth, tmp_path):
    url = synth[0]
    # dropout on (the RNG must be restored), two loader workers (lanes 2), 5 steps per epoch
    cfg = CaptionTrainConfig(store=url, epochs=2, batch_images=8, dropout=0.5, checkpoint_every=3, log_every=1,
                             val_max_images=2, **{**TINY, "num_workers": 2})
    train_caption(cfg, tmp_path / "full", progress=False)

    def crash(step, terms):
        if step == 8:  # mid epoch 2; the last checkpoint is at step 6
            raise _Crash("killed")

    with pytest.raises(_Crash):
        train_caption(cfg, tmp_path / "resumed", progress=False, on_step=crash)
    assert RunDir(tmp_path / "resumed").load_checkpoint("last")["step"] == 6
    # resume with no workers: the sampler keeps the lanes it started with, so the order is the same
    summary = train_caption(CaptionTrainConfig(**{**cfg.__dict__, "num_workers": 0}), tmp_path / "resumed",
                            progress=False)
    assert summary["steps"] == 10
    full, resumed = RunDir(tmp_path / "full").load_checkpoint("last"), RunDir(tmp_path / "resumed").load_checkpoint("last")
    for name, w in full["model"].items():
        assert torch.equal(w, resumed["model"][name]), name  # bit-identical on CPU
    assert full["best"] == resumed["best"]
    records = RunDir(tmp_path / "resumed").metrics()
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 11))  # steps 7-8 of the crash dropped
    assert [r["epoch"] for r in records if "val_CIDEr" in r] == [0, 1]


def test_max_steps_stops_with_a_checkpoint_then_continues(synth, tmp_path):
    url = synth[0]
    cfg = CaptionTrainConfig(store=url, epochs=1, batch_images=8, dropout=0.0, max_steps=2, val_max_images=2, **TINY)
    first = train_caption(cfg, tmp_path / "run", progress=False)
    assert first["interrupted"] and first["steps"] == 2 and first["best_val_cider"] is None
    ckpt = RunDir(tmp_path / "run").load_checkpoint("last")
    assert ckpt["sampler"]["position"] == 16 and ckpt["epoch"] == 0
    done = train_caption(CaptionTrainConfig(**{**cfg.__dict__, "max_steps": None}), tmp_path / "run", progress=False)
    assert done["steps"] == 5 and done["epochs_completed"] == 1 and not done["interrupted"]


DDP_SCRIPT = """
import hashlib, json, sys, torch
torch.set_num_threads(1)
from vlcache.stages.common import distributed as D
from vlcache.stages.caption.train import CaptionTrainConfig, train_caption
url, run, out = sys.argv[1:4]
cfg = CaptionTrainConfig(store=url, epochs=1, batch_images=8, embed_dim=16, attn_dim=16, hidden_dim=16, num_workers=0,
                         device="cpu", val_max_images=1, beam_size=1, max_len=8, log_every=1)
seen = []
summary = train_caption(cfg, run, progress=False, on_step=lambda s, t: seen.append(t["loss"]))
info = {"rank": D.rank(), "world": D.world_size(), "steps": summary["steps"], "losses": seen}
D.cleanup()
open(f"{out}/rank{info['rank']}.json", "w").write(json.dumps(info))
"""


def test_ddp_two_ranks_on_cpu_with_torchrun(synth, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    url = synth[0]
    (tmp_path / "ddp.py").write_text(DDP_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(tmp_path / "ddp.py"), url, str(tmp_path / "run"), str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:  # a hung rank: end the whole launcher group, never leave workers behind
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    # 40 train rows sharded over 2 ranks: 20 each, batches of 8 -> 3 steps on every rank
    assert [r["steps"] for r in ranks] == [3, 3]
    assert ranks[0]["losses"] != ranks[1]["losses"]  # different shards of the data
    run = RunDir(tmp_path / "run")
    assert yaml.safe_load(run.config_path.read_text())["world_size"] == 2
    assert [r["step"] for r in run.metrics() if "loss" in r] == [1, 2, 3]  # only rank 0 logs
    assert run.load_checkpoint("last")["step"] == 3


def test_distributed_helpers_without_torchrun(monkeypatch):
    from vlcache.stages.common import distributed as D

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info = D.init_distributed("cpu")
    assert (info.rank, info.world_size, info.backend, info.is_main, info.distributed) == (0, 1, None, True, False)
    model = torch.nn.Linear(2, 2)
    assert D.wrap_model(model, torch.device("cpu")) is model and D.unwrap(model) is model
    assert D.broadcast_object({"stop": True}) == {"stop": True} and D.is_main() and D.world_size() == 1
    assert torch.equal(D.all_reduce_mean(torch.tensor([1.0, 3.0])), torch.tensor([1.0, 3.0]))
    assert D.resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two'"):
        D.init_distributed("cpu")


# ---- feature standardisation -------------------------------------------------------------------------


def test_grid_feature_stats_equal_numpy_over_the_rows(synth):
    from vlcache.stages.caption.data import grid_feature_stats
    url = synth[0]
    rows = split_rows(url, "train")
    store = open_store(url)
    feats = np.stack([store.grid(int(r)) for r in rows]).astype(np.float64).reshape(-1, 2048)
    mean, std = grid_feature_stats(url, rows, max_images=None, chunk=7)  # chunks that straddle blocks
    np.testing.assert_allclose(mean.numpy(), feats.mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(std.numpy(), feats.std(0), rtol=1e-4, atol=1e-7)
    # a subsample reads evenly spaced rows: first and last included
    few = rows[[0, len(rows) // 2, len(rows) - 1]]
    sub = np.stack([store.grid(int(r)) for r in few]).astype(np.float64).reshape(-1, 2048)
    np.testing.assert_allclose(grid_feature_stats(url, rows, max_images=3)[0].numpy(), sub.mean(0), rtol=1e-5,
                               atol=1e-7)
    with pytest.raises(ValueError, match="no rows"):
        grid_feature_stats(url, rows[:0])


def test_standardized_model_equals_plain_model_on_standardized_features():
    from vlcache.stages.caption.sat import ShowAttendTell
    torch.manual_seed(0)
    feats = torch.rand(3, 4, 6) * torch.tensor([0.01, 1, 5, 0.1, 2, 0.0])  # last channel dead (std 0)
    mean, std = feats.reshape(-1, 6).mean(0), feats.reshape(-1, 6).std(0, unbiased=False)
    normed = ShowAttendTell(9, feat_dim=6, embed_dim=4, attn_dim=5, hidden_dim=7, dropout=0.0, feat_norm=True)
    normed.set_feature_stats(mean, std)
    plain = ShowAttendTell(9, feat_dim=6, embed_dim=4, attn_dim=5, hidden_dim=7, dropout=0.0)
    plain.load_state_dict({k: v for k, v in normed.state_dict().items() if k not in ("feat_mean", "feat_std")})
    caps = torch.randint(3, 9, (3, 5))
    caps[:, 0] = 1
    by_hand = (feats - mean) / torch.where(std > 1e-6, std, torch.ones_like(std))
    assert by_hand[..., 5].abs().max() == 0  # the dead channel is centred, not blown up
    torch.testing.assert_close(normed(feats, caps)["energies"], plain(by_hand, caps)["energies"])
    assert normed.beam_search(feats, beam_size=2, max_len=6) == plain.beam_search(by_hand, 2, 6)
    with pytest.raises(ValueError, match="feat_norm=False"):
        plain.set_feature_stats(mean, std)
    with pytest.raises(ValueError, match="6 channels"):
        normed.set_feature_stats(mean[:5], std[:5])


def test_feat_norm_training_saves_statistics_and_evaluation_uses_them(synth, tmp_path):
    from vlcache.stages.caption.data import grid_feature_stats
    from vlcache.stages.caption.evaluate import load_run_model
    url = synth[0]
    cfg = CaptionTrainConfig(store=url, epochs=1, batch_images=8, dropout=0.0, val_max_images=2, feat_norm="standardize",
                             **TINY)
    train_caption(cfg, tmp_path / "run", progress=False)
    model, _, ckpt, config = load_run_model(tmp_path / "run")
    mean, std = grid_feature_stats(url, split_rows(url, "train"))
    assert model.feat_norm and config["model"]["feat_norm"] is True
    torch.testing.assert_close(model.feat_mean, mean)
    torch.testing.assert_close(model.feat_std, torch.where(std > 1e-6, std, torch.ones_like(std)))
    with pytest.raises(ValueError, match=r"different config for \['feat_norm'\]"):
        train_caption(CaptionTrainConfig(**{**cfg.__dict__, "feat_norm": "none"}), tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match="feat_norm must be"):
        train_caption(CaptionTrainConfig(**{**cfg.__dict__, "feat_norm": "zscore"}), tmp_path / "x", progress=False)


def test_training_step_uses_the_configured_loss_recipe(synth):
    """loss_recipe reduces CE and the doubly stochastic term as METHODS §1 says: sgrvinod by default,
    Xu et al.'s Theano reductions one option away (same model, same batch: the ratios are exact)."""
    from vlcache.stages.caption.train import step_losses
    from vlcache.stages.caption.sat import ShowAttendTell

    url, _, vocab = synth
    b = _batch(url, vocab, [0, 1, 2])
    torch.manual_seed(0)
    model = ShowAttendTell(len(vocab), 2048, 16, 16, 16, dropout=0.0)
    with torch.no_grad():
        sg = step_losses(model, b, CaptionTrainConfig(store=url, ica_weight=0.0), torch.device("cpu"))
        xu = step_losses(model, b, CaptionTrainConfig(store=url, ica_weight=0.0, loss_recipe="xu-theano"),
                         torch.device("cpu"))
        out = model(b["feats"], b["captions"], b["lengths"], img_index=b["img_index"])
    n_captions, n_tokens, cells = b["captions"].shape[0], int((b["lengths"] - 1).sum()), b["feats"].shape[1]
    assert float(xu["xent"]) == pytest.approx(float(sg["xent"]) * n_tokens / n_captions, rel=1e-5)
    assert float(xu["ds"]) == pytest.approx(float(sg["ds"]) * n_captions, rel=1e-5)
    per = (1 - (out["alphas"] * out["mask"][..., None]).sum(1)) ** 2  # (captions, cells)
    assert float(sg["ds"]) == pytest.approx(float(per.sum()) / (n_captions * cells), rel=1e-5)
    assert float(sg["loss"]) == pytest.approx(float(sg["xent"] + sg["ds"]), rel=1e-6)
