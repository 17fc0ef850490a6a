"""Probes what CoRe's regularizers weigh on the bundled model: each term's value and its gradient on the token against
the diffusion loss's, at the token's start (the category word) and at tokens the personalization benchmark learnt.

    python scripts/probe_core.py [--work_dir runs/bench_core] [--batches 4]

For each subject kit and each learnt token found under --work_dir (``<method>/<subject>/seed0/checkpoint-N``, as
``bench_personalization.py`` leaves them; 1-vector runs only, since CoRe's contexts pair one subject token with one
category word), the probe draws --batches training batches (the benchmark's batch, seed and contexts) and reports
L_emb (Eq. 3), L_attn (Eq. 4), and the norm of each term's gradient on the token at the paper's weights over the
diffusion loss's gradient norm. Writes bench/results/core_probe.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import default_collate

from genreg import load_pipeline
from genreg.embeddings import PlaceholderVectors, add_placeholder, initializer_vectors, load_learned_embeds
from genreg.methods.core import Contexts, CoReConfig, CoReObjective
from genreg.tinyworld.subjects import SUBJECTS, write_kit

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
TERMS = {"diffusion": (1.0, 0.0, 0.0), "embedding": (0.0, 1.0, 0.0), "attention": (0.0, 0.0, 1.0)}


def measure(pipe, subject, kit: Path, vectors: torch.Tensor | None, batches: int, batch_size: int) -> dict:
    """Mean over batches of each term's value and gradient norm on the token (``vectors``: None = the start)."""
    token = f"<{subject.name}>"
    config = CoReConfig(
        train_data_dir=str(kit),
        placeholder_token=token,
        initializer_token=subject.shape,
        prompt_set="tinyworld",
        flip_p=0.0,
    )
    ids = add_placeholder(pipe.tokenizer, pipe.text_encoder, token, 1)
    start = initializer_vectors(pipe.text_encoder, pipe.tokenizer, subject.shape, 1)
    placeholder = PlaceholderVectors(pipe.text_encoder, ids, start if vectors is None else vectors)
    data, contexts = config.read(pipe), Contexts(pipe.tokenizer, config.contexts(), [token], subject.shape)
    found: dict[str, list[float]] = {}
    for step in range(batches):
        samples = [
            data.sample(pipe.tokenizer, 0, step, i, token) | contexts.sample(0, step, i) for i in range(batch_size)
        ]
        batch = default_collate(samples)
        for term, weights in TERMS.items():
            loss = CoReObjective(pipe, placeholder, *weights)(batch)
            grad = torch.autograd.grad(loss, placeholder.vectors, allow_unused=True)[0] if loss.requires_grad else None
            found.setdefault(f"{term}_loss", []).append(loss.item())
            found.setdefault(f"{term}_grad", []).append(0.0 if grad is None else grad.norm().item())
    out = {k: float(np.mean(v)) for k, v in found.items()}
    paper = CoReConfig.__dataclass_fields__
    for term in ("embedding", "attention"):
        weight = paper[f"{term}_weight"].default
        out[f"{term}_ratio"] = weight * out[f"{term}_grad"] / max(out["diffusion_grad"], 1e-30)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tinyworld")
    p.add_argument("--work_dir", default="runs/bench_core")
    p.add_argument("--subjects", nargs="+", default=list(SUBJECTS), choices=list(SUBJECTS))
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--batch_size", type=int, default=8)
    args = p.parse_args()

    work = Path(args.work_dir)
    rows = []
    for name in args.subjects:
        subject = SUBJECTS[name]
        kit = write_kit(subject, work / "kits" / name)
        tokens = {"start (the category word)": None}
        for checkpoint in sorted(work.glob(f"*/{name}/seed0/checkpoint-*")):
            learnt = load_learned_embeds(checkpoint / "learned_embeds.safetensors")[1]
            if len(learnt) == 1:
                tokens[f"{checkpoint.parts[-4]} at {checkpoint.name.split('-')[1]}"] = learnt
        for label, vectors in tokens.items():
            pipe = load_pipeline(args.model, device="cpu", dtype=torch.float32)
            row = {"subject": name, "token": label} | measure(
                pipe, subject, kit, vectors, args.batches, args.batch_size
            )
            rows.append(row)
            print(json.dumps({k: round(v, 8) if isinstance(v, float) else v for k, v in row.items()}))

    table = []
    for label in dict.fromkeys(r["token"] for r in rows):
        group = [r for r in rows if r["token"] == label]
        keys = [k for k in group[0] if k not in ("subject", "token")]
        table.append({"token": label, "kits": len(group)} | {k: float(np.mean([r[k] for r in group])) for k in keys})
    command = shlex.join(["python", "scripts/probe_core.py", *sys.argv[1:]])
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "core_probe.json").write_text(json.dumps({"command": command, "table": table, "runs": rows}, indent=1))
    lines = [
        "# CoRe probe: what the regularizers weigh on the bundled model",
        "",
        f"Command: `{command}`",
        "",
        f"{args.batches} training batches of {args.batch_size} per kit and token (the benchmark's data, seed and "
        "tiny-world contexts); means over kits. Ratio: the term's gradient norm on the token at the paper's weight "
        "(1.5e-4, 0.05) over the diffusion loss's.",
        "",
        "| token | kits | diffusion loss | L_emb (Eq. 3) | L_attn (Eq. 4) | emb grad ratio | attn grad ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in table:
        lines.append(
            f"| {r['token']} | {r['kits']} | {r['diffusion_loss']:.4f} | {r['embedding_loss']:.2e} | "
            f"{r['attention_loss']:.2e} | {r['embedding_ratio']:.1e} | {r['attention_ratio']:.1e} |"
        )
    lines.append("")
    (RESULTS / "core_probe.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
