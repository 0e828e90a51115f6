"""How far held-out paraphrases can reach their concepts through MiniLM's token states, without a denoiser.

    python -m safeguard.world.text_probe [--seeds 3] [--split dev|test]

A small attention-pooling reader (learned queries attending over the token states, as a cross-attention
layer does) is trained to name each training caption's subject and style, then asked to name the held-out
paraphrases. It is run with and without the token-state dropout that the denoiser is trained with; the
table shows what the text side allows and what the dropout changes. It informs a training choice, so it
reads the dev split by default; ``--split test`` reports the release split once the choice is made.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from . import assets, concepts as C
from .data import STYLE_KEYS, SUBJECT_KEYS, sample_scenes
from .train import encode_texts


class AttentionReader(torch.nn.Module):
    def __init__(self, width: int = 384, queries: int = 16, dim: int = 64):
        super().__init__()
        self.queries = torch.nn.Parameter(torch.randn(queries, dim))
        self.to_k, self.to_v = torch.nn.Linear(width, dim), torch.nn.Linear(width, dim)
        self.subject = torch.nn.Linear(queries * dim, len(SUBJECT_KEYS))
        self.style = torch.nn.Linear(queries * dim, len(STYLE_KEYS))

    def forward(self, states):
        weights = torch.softmax(self.queries @ self.to_k(states).transpose(1, 2) / self.queries.shape[1] ** 0.5, -1)
        pooled = (weights @ self.to_v(states)).flatten(1)
        return self.subject(pooled), self.style(pooled)


def paraphrase_accuracy(train_states, subject, style, test_states, test_targets, dropout: float, seed: int,
                        steps: int = 600) -> dict:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    reader = AttentionReader()
    opt = torch.optim.Adam(reader.parameters(), 1e-3)
    for _ in range(steps):
        b = torch.randint(0, len(train_states), (128,), generator=g)
        x = train_states[b].clone()
        x[torch.rand(x.shape[:2], generator=g) < dropout] = 0
        s_logits, st_logits = reader(x)
        loss = F.cross_entropy(s_logits, subject[b]) + F.cross_entropy(st_logits, style[b])
        opt.zero_grad(); loss.backward(); opt.step()
    with torch.no_grad():
        s_logits, st_logits = reader(test_states)
    out = {}
    for category, (attr, targets) in test_targets.items():
        logits = st_logits if attr == "style" else s_logits
        rows = torch.tensor([i for i, _ in targets])
        out[category] = float((logits[rows].argmax(1) == torch.tensor([t for _, t in targets])).float().mean())
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--scenes", type=int, default=40000, help="training scenes whose captions are used (as in train.py)")
    ap.add_argument("--split", choices=C.SPLITS, default="dev", help="held-out split to test on (default dev)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    labels = {}
    for s, st, _, caption in sample_scenes(args.scenes, seed=1):
        labels[caption] = (SUBJECT_KEYS.index(s), STYLE_KEYS.index(st))
    captions = sorted(labels)
    tokenizer, encoder = assets.load_text_encoder()
    train_states = encode_texts(captions, tokenizer, encoder)
    subject = torch.tensor([labels[c][0] for c in captions])
    style = torch.tensor([labels[c][1] for c in captions])
    paraphrases, targets = [], {}
    for category, group, attr, keys in (("style", C.STYLES, "style", STYLE_KEYS), ("character", C.CHARACTERS, "subject", SUBJECT_KEYS),
                                        ("person", C.PEOPLE, "subject", SUBJECT_KEYS)):
        for concept in group:
            for p in concept.heldout(args.split):
                targets.setdefault(category, (attr, []))[1].append((len(paraphrases), keys.index(concept.key)))
                paraphrases.append(p)
    test_states = encode_texts(paraphrases, tokenizer, encoder)
    print(f"{len(captions)} training captions, {len(paraphrases)} held-out paraphrases ({args.split} split), "
          f"mean of {args.seeds} seeds")
    print(f"{'token dropout':<15}" + "".join(f"{c:>11}" for c in targets))
    for dropout in (0.0, 0.25, 0.5):
        runs = [paraphrase_accuracy(train_states, subject, style, test_states, targets, dropout, seed) for seed in range(args.seeds)]
        print(f"{dropout:<15}" + "".join(f"{np.mean([r[c] for r in runs]):>11.2f}" for c in targets))


if __name__ == "__main__":
    main()
