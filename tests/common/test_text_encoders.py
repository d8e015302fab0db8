import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from vlcache.stages.common.text_encoders import (GRUTextEncoder, char_span_to_token_mask, default_bert_dir,
    encode_tokens, load_bert)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def bert():
    return load_bert()


def test_bundled_bert_loads_fully_offline():
    # A fresh interpreter, so HF_HUB_OFFLINE is in force before transformers is imported.
    code = textwrap.dedent("""
        import json, torch
        torch.set_num_threads(1)
        from vlcache.stages.common.text_encoders import load_bert, encode_tokens
        tok, model = load_bert()
        h, m, o = encode_tokens(["a teddy bear"], tok, model)
        try:
            load_bert("no-such-bert-model-xyz")
            err = ""
        except RuntimeError as e:
            err = str(e)
        print(json.dumps({"hidden": list(h.shape), "layers": model.config.num_hidden_layers,
                          "grad": any(p.requires_grad for p in model.parameters()), "err": err}))
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME="/nonexistent-hf-home")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["hidden"] == [1, 5, 384]  # [CLS] a teddy bear [SEP], MiniLM width
    assert out["layers"] == 6 and out["grad"] is False
    assert "no-such-bert-model-xyz" in out["err"] and "local directory" in out["err"]


def test_local_directory_and_missing_directory(tmp_path):
    tok, model = load_bert(default_bert_dir())
    assert model.config.hidden_size == 384 and tok.is_fast
    with pytest.raises(RuntimeError, match="local directory"):
        load_bert(tmp_path / "empty")


def test_encode_tokens_shapes_masks_and_batching(bert):
    tok, model = bert
    texts = ["A teddy bear sits on a bed.", "two dogs", "a man riding a skateboard down the street"]
    h, mask, off = encode_tokens(texts, tok, model, max_len=32, batch_size=2)
    n_tok = [len(tok(t)["input_ids"]) for t in texts]
    assert h.shape == (3, max(n_tok), 384) and h.dtype == torch.float32
    assert mask.dtype == torch.bool and mask.sum(1).tolist() == n_tok
    assert off.shape == (3, max(n_tok), 2)
    # batching and padding do not change a text's real token outputs
    for i, t in enumerate(texts):
        alone, _, _ = encode_tokens([t], tok, model)
        assert torch.allclose(alone[0], h[i, : n_tok[i]], atol=1e-4), t
    short, smask, _ = encode_tokens(texts, tok, model, max_len=5)
    assert short.shape[1] == 5 and smask.sum(1).tolist() == [5, 4, 5]  # truncated, [SEP] kept
    with pytest.raises(TypeError, match="text 1 is int"):
        encode_tokens(["ok", 3], tok, model)


def test_char_span_maps_teddy_bear_to_its_tokens(bert):
    tok, model = bert
    texts = ["A teddy bear sits on a bed.", "skateboarders near a teddy bear"]
    _, mask, off = encode_tokens(texts, tok, model)
    ids = tok(texts, padding="longest")["input_ids"]
    for b, text in enumerate(texts):
        start = text.index("teddy bear")
        sel = char_span_to_token_mask(off[b], start, start + len("teddy bear"))
        assert sel.shape == mask[b].shape
        picked = [tok.convert_ids_to_tokens(ids[b][i]) for i in sel.nonzero().squeeze(1).tolist()]
        assert picked == ["teddy", "bear"]
    # a word split into word pieces maps to all of its pieces, never to [CLS]/[SEP]/padding
    sel = char_span_to_token_mask(off[1], 0, len("skateboarders"))
    pieces = [tok.convert_ids_to_tokens(ids[1][i]) for i in sel.nonzero().squeeze(1).tolist()]
    assert len(pieces) >= 2 and "".join(p.removeprefix("##") for p in pieces) == "skateboarders"
    # batched offsets work too
    assert char_span_to_token_mask(off, 2, 7).shape == mask.shape
    with pytest.raises(ValueError, match="empty"):
        char_span_to_token_mask(off[0], 5, 5)


def test_gru_text_encoder():
    torch.manual_seed(0)
    enc = GRUTextEncoder(vocab_size=30, word_dim=8, embed=6)
    tokens = torch.tensor([[3, 4, 5, 0], [7, 8, 0, 0]])
    lengths = torch.tensor([3, 2])
    out = enc(tokens, lengths)
    assert out.shape == (2, 4, 6)
    assert torch.allclose(out[0, :3].norm(dim=-1), torch.ones(3), atol=1e-5)
    assert (out[0, 3] == 0).all() and (out[1, 2:] == 0).all()
    # more padding, different padding ids: the same outputs at real positions
    wider = torch.cat([tokens, torch.full((2, 3), 9)], 1)
    assert torch.allclose(enc(wider, lengths)[:, :4], out, atol=1e-6)
    # bidirectional: a later word changes an earlier word's output
    changed = tokens.clone()
    changed[0, 2] = 11
    assert not torch.allclose(enc(changed, lengths)[0, 0], out[0, 0])
    with pytest.raises(ValueError, match="caption 1 has length 0"):
        enc(tokens, torch.tensor([3, 0]))
