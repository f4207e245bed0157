"""Build random-weight VLMs of the supported architectures locally, in the normal HF layout.

No hub access is needed: the config is written from the family's real
architecture at a chosen size, the tokenizer is trained locally, the image
processor is the family's real one, and the chat template is the family's.
`from_pretrained(<folder>)` on the result is exactly the production loading path.

    python -m vlm_ray.models.tiny --family qwen2_vl --out models/tiny-qwen2-vl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vlm_ray.models.tiny_common import SHAPES, Shape
from vlm_ray.models.tiny_llama_gemma_mistral import (
    build_gemma3,
    build_mllama,
    build_pixtral_family,
)
from vlm_ray.models.tiny_qwen import build_qwen2_5_vl, build_qwen2_vl, build_qwen3_vl

__all__ = ["BUILDERS", "SHAPES", "Shape", "build_tiny_model", "main"]


BUILDERS = {
    "qwen2_vl": build_qwen2_vl,
    "qwen2_5_vl": build_qwen2_5_vl,
    "qwen3_vl": build_qwen3_vl,
    "mllama": build_mllama,
    "gemma3": build_gemma3,
    "llava": lambda out, shape, vocab, seed: build_pixtral_family(out, shape, vocab, seed, "llava"),
    "mistral3": lambda out, shape, vocab, seed: build_pixtral_family(
        out, shape, vocab, seed, "mistral3"
    ),
}


def build_tiny_model(
    out_dir: str | Path,
    family: str = "qwen2_vl",
    size: str = "tiny",
    vocab_size: int = 1024,
    seed: int = 0,
) -> Path:
    """Build a random-weight model of `family` at `size` into out_dir (reused if already built)."""
    out = Path(out_dir)
    marker = out / "vlm_ray_tiny.json"
    want = {"family": family, "size": size, "vocab_size": vocab_size, "seed": seed}
    if (
        marker.exists()
        and {k: v for k, v in json.loads(marker.read_text()).items() if k in want} == want
    ):
        return out
    if family not in BUILDERS:
        raise ValueError(f"unknown family {family!r}; choose one of {sorted(BUILDERS)}")
    if size not in SHAPES:
        raise ValueError(f"unknown size {size!r}; choose one of {sorted(SHAPES)}")
    out.mkdir(parents=True, exist_ok=True)
    info = BUILDERS[family](out, SHAPES[size], vocab_size, seed)
    marker.write_text(json.dumps({**want, **info}, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    """CLI: build a tiny model folder."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--family", default="qwen2_vl", choices=sorted(BUILDERS))
    p.add_argument("--size", default="tiny", choices=sorted(SHAPES))
    p.add_argument("--out", required=True, help="Folder to write the model into.")
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    path = build_tiny_model(a.out, a.family, a.size, a.vocab_size, a.seed)
    print(f"built {a.family} ({a.size}) at {path}")


if __name__ == "__main__":
    main()
