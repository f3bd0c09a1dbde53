"""Generate text from a train.py checkpoint.  `python sample.py --ckpt=out/ckpt.pt`.

Owns: SampleConfig and the prompt -> tokens -> generate -> text loop. Nothing else.
"""
import sys
from dataclasses import dataclass

import torch

import data
from train import load_model, parse_config, resolve_device


@dataclass
class SampleConfig:
    ckpt: str = "out/ckpt.pt"
    prompt: str = "\n"
    num_samples: int = 2
    max_new_tokens: int = 200
    temperature: float = 0.8
    top_k: int = 200
    seed: int = 1337
    device: str = "auto"


def main(cfg: SampleConfig) -> list[str]:
    device, _ = resolve_device(cfg.device, "auto")
    model, _ = load_model(cfg.ckpt, device)
    model.eval()
    enc = data.get_encoding()
    prompt = torch.tensor([enc.encode(cfg.prompt, allowed_special="all")], device=device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    texts = []
    for _ in range(cfg.num_samples):
        out = model.generate(prompt, cfg.max_new_tokens, cfg.temperature, cfg.top_k, generator)
        texts.append(enc.decode(out[0].tolist()))
        print(texts[-1], "\n---------------")
    return texts


if __name__ == "__main__":
    try:
        config = parse_config(SampleConfig, sys.argv[1:])
    except ValueError as error:
        sys.exit(f"error: {error}")
    main(config)
