"""eval_ppl.py: windowed loss equals a token-by-token brute force; every token counted once."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import data
import eval_ppl
import train
from eval_ppl import PplConfig
from model import GPT

BLOCK = 16


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    cfg = train.TrainConfig(moe="topk", sample_tokens=0, n_layer=2, n_head=2, n_embd=32, ffn_hidden=32,
                            n_experts=4, top_k=2, block_size=BLOCK, dropout=0.0)
    torch.manual_seed(0)
    model = GPT(cfg.model_config())
    path = tmp_path_factory.mktemp("ckpt") / "ckpt.pt"
    torch.save({"model": model.state_dict(), "config": dataclasses.asdict(cfg)}, path)
    return path


def _text_of(n_tokens: int) -> str:
    """A text that encodes to exactly n_tokens GPT-2 tokens (each word is one token)."""
    words = "the cat sat on a mat and dog ran".split()
    text = "".join(" " + words[(i * i + 3 * i) % len(words)] for i in range(n_tokens))
    assert len(data.get_encoding().encode_ordinary(text)) == n_tokens
    return text


@torch.no_grad()
def _brute_force_mean_nll(ckpt, tokens: list[int]) -> float:
    """Each token p >= 1 predicted from its window's tokens before it, one forward each."""
    model, _ = train.load_model(ckpt, "cpu")
    model.eval()
    nll = []
    for p in range(1, len(tokens)):
        start = (p - 1) // BLOCK * BLOCK                    # the window that predicts token p
        logits, _, _ = model(torch.tensor([tokens[start:p]]))            # (1, 1, V): last only
        nll.append(-F.log_softmax(logits[0, -1].float(), -1)[tokens[p]].item())
    return sum(nll) / len(nll)


@pytest.mark.parametrize("n_tokens, batch_size", [(76, 3), (65, 2), (2, 8), (10, 1)])
def test_loss_equals_brute_force(ckpt, tmp_path, n_tokens, batch_size):
    # 76: four full windows in batches of 3 + 1, and a last window of 11; 65: full windows only
    text = tmp_path / "t.txt"
    text.write_text(_text_of(n_tokens))
    result = eval_ppl.main(PplConfig(ckpt=str(ckpt), text=str(text), device="cpu",
                                     batch_size=batch_size))
    tokens = data.get_encoding().encode_ordinary(text.read_text())
    assert result["tokens"] == len(tokens) - 1
    assert result["loss"] == pytest.approx(_brute_force_mean_nll(ckpt, tokens), rel=1e-5)
    assert result["ppl"] == pytest.approx(torch.tensor(result["loss"]).exp().item(), rel=1e-6)


def test_windows_cover_every_prediction_once():
    for n_tokens in range(2, 60):
        spans = eval_ppl.windows(n_tokens, 8)
        predicted = [s + 1 + i for s, length in spans for i in range(length)]
        assert predicted == list(range(1, n_tokens))


def test_clear_errors(ckpt, tmp_path):
    with pytest.raises(FileNotFoundError, match="--text: no file"):
        eval_ppl.main(PplConfig(ckpt=str(ckpt), text=str(tmp_path / "missing.txt")))
    with pytest.raises(ValueError, match="--text=FILE is required"):
        PplConfig(ckpt=str(ckpt)).validate()
    one = tmp_path / "one.txt"
    one.write_text("hello")
    with pytest.raises(FileNotFoundError, match="--ckpt: no file"):
        PplConfig(ckpt=str(tmp_path / "none.pt"), text=str(one)).validate()
    for content in ("", "hello"):
        one.write_text(content)
        with pytest.raises(ValueError, match="at least 2"):
            eval_ppl.main(PplConfig(ckpt=str(ckpt), text=str(one), device="cpu"))
    with pytest.raises(ValueError, match="valid keys"):
        train.parse_config(PplConfig, ["--txt=a.txt"])
