"""The matching registry and protocol: a model defined here, registered by one line, trains, resumes its
checkpoint and evaluates through the unchanged loop, evaluator and ablation runner (issue #16)."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from synth_store import make_synth_store, make_text_cache
from vlcache.pipeline.config import load_config
from vlcache.stages.match.ablation import run_match_ablation
from vlcache.stages.match.evaluate import evaluate_match
from vlcache.stages.match.protocol import MatchModel, attention_scores
from vlcache.stages.match.registry import MATCH_MODELS, match_model
from vlcache.stages.match import train as match_train
from vlcache.stages.match.train import MatchTrainConfig, load_match_run, train_match

torch.set_num_threads(2)


class MeanNet(nn.Module):
    """Mean-pooled regions and words, projected and l2-normalised; word->region dot-product attention."""

    def __init__(self, region_dim: int, text_dim: int, d: int):
        super().__init__()
        self.img, self.txt = nn.Linear(region_dim, d), nn.Linear(text_dim, d)

    def forward(self, regions, region_mask, words, word_mask) -> dict:
        v, w = self.img(regions), self.txt(words.float())
        vi = F.normalize((v * region_mask[..., None]).sum(1) / region_mask.sum(1, keepdim=True), dim=-1)
        ti = F.normalize((w * word_mask[..., None]).sum(1) / word_mask.sum(1, keepdim=True), dim=-1)
        return {"sim": vi @ ti.T, "v": v, "w": w}


class MeanMatch(MatchModel):
    name, text, visual, network = "mean", "bert", "regions", MeanNet
    defaults = {"width": 8}  # its own hyperparameter: no field in MatchTrainConfig

    def network_args(self, cfg, visual_dim, vocab_size, text_dim):
        return dict(region_dim=visual_dim, text_dim=text_dim, d=self.options(cfg)["width"])

    def forward(self, net, batch, attention):
        ti = batch["txt_img"]
        out = net.net(net.regions(batch["regions"]), batch["region_mask"], batch["words"], batch["word_mask"])
        res = {"sim": out["sim"][ti]}  # rows: the image of each caption
        return {**res, **(self.attention(net, batch) if attention else {})}

    def attention(self, net, batch):
        ti, vm = batch["txt_img"], batch["region_mask"][batch["txt_img"]]
        out = net.net(net.regions(batch["regions"][ti]), vm, batch["words"], batch["word_mask"])
        logits = torch.einsum("pld,prd->plr", out["w"], out["v"]).masked_fill(~vm[:, None, :], float("-inf"))
        weights = logits.softmax(-1)
        return dict(query=out["w"], values=out["v"], weights=weights, scores=attention_scores(weights, vm),
                    value_mask=vm)

    def similarity(self, net, data, device, rerank_top=0, block=1024):
        out = net.net(net.regions(data["regions"].to(device)), data["region_mask"].to(device),
                      data["words"].to(device), data["word_mask"].to(device))
        return {"sim": out["sim"].cpu()}


@pytest.fixture
def mean_registered(monkeypatch):
    # What one line in registry.py does, undone after the test. Registered after train.py was imported, so
    # the config's list of choices (read from the registry at import) is refreshed as an import would.
    monkeypatch.setitem(MATCH_MODELS._items, "mean", MeanMatch)
    monkeypatch.setattr(match_train, "MODEL_NAMES", tuple(MATCH_MODELS.names()))
    return "mean"


@pytest.fixture(scope="module")
def synth():
    url, _ = make_synth_store()
    return url, make_text_cache(url)


def test_registry_names_and_a_clear_error_for_an_unknown_model():
    assert MATCH_MODELS.names() == ["mmca", "scan", "slan"]
    assert [match_model(n).name for n in MATCH_MODELS.names()] == ["mmca", "scan", "slan"]
    with pytest.raises(ValueError, match=r"model must be one of \('mmca', 'scan', 'slan'\), got 'sacn'"):
        MatchTrainConfig(model="sacn")


def test_a_model_defined_outside_the_package_trains_resumes_and_evaluates(mean_registered, synth, tmp_path):
    store, cache = synth
    cfg = MatchTrainConfig(model="mean", store=store, text_cache=cache, model_options={"width": 16}, epochs=1,
                           batch_size=8, lr=1e-3,
                           captions="one", ccr=1.0, ica=1.0, val_split="train", val_max_images=8, device="cpu",
                           log_every=1)
    res = train_match(cfg, tmp_path / "mean")
    assert res["step"] > 0 and res["epochs_completed"] == 1
    recs = [json.loads(x) for x in (tmp_path / "mean" / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in recs if "triplet" in r)  # the protocol's default objective, plus CCR and ICA
    assert all(k in step for k in ("loss", "triplet", "ccr", "ica"))
    net, _, ckpt, loaded = load_match_run(tmp_path / "mean")
    assert isinstance(net.family, MeanMatch) and ckpt["model_args"] == {"kind": "mean", "region_dim": 2048,
                                                                        "text_dim": 384, "d": 16}
    scores = evaluate_match(tmp_path / "mean", "train", figures=1, device="cpu")
    assert scores["model"] == "mean" and 0 <= scores["rsum"] <= 600 and scores["attn_words"] > 0
    assert 0 <= scores["attn_f1"] <= 1 and (tmp_path / "mean" / "report.md").is_file()


def test_a_models_own_hyperparameters_come_from_model_options(mean_registered):
    cfg = load_config(MatchTrainConfig, overrides=["model=mean", "model_options.width=12"])
    assert cfg.model_options == {"width": 12} and cfg.family.options(cfg) == {"width": 12}
    assert MeanMatch().options(MatchTrainConfig(model="mean")) == {"width": 8}  # the model's default
    with pytest.raises(ValueError, match=r"model_options \['depth'\] are not hyperparameters of model 'mean'; "
                                         r"it takes \['width'\]"):
        load_config(MatchTrainConfig, overrides=["model=mean", "model_options.depth=3"])
    with pytest.raises(ValueError, match=r"not hyperparameters of model 'scan'; it takes none"):
        MatchTrainConfig(model="scan", model_options={"width": 3})


def test_the_ablation_runner_takes_any_registered_model(mean_registered, synth, tmp_path):
    store, cache = synth
    res = run_match_ablation(store, "mean", seeds=1, runs_root=tmp_path, figures=0,
                             variants={"baseline": {"ccr": 0.0}, "+CCR": {"ccr": 1.0}},
                             options={"text_cache": cache, "d": 16, "epochs": 1, "max_steps": 2, "batch_size": 8,
                                      "captions": "one", "val_max_images": 4, "device": "cpu"})
    assert [r["variant"] for r in res["rows"]] == ["baseline", "+CCR"] and res["model"] == "mean"
