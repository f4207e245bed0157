"""Unsloth on each family's tiny model (GPU machine): train a few steps, save, reload, generate.

    python bench/unsloth_families.py OUT_DIR [family ...]

Each family runs in its own process, all at once (Unsloth patches transformers globally, and one
family's failure must not hide the next one's result); OUT_DIR/unsloth_families.json
gets one record per family as it finishes: ok or the exact error.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = ["qwen2_5_vl", "qwen3_vl", "mllama", "gemma3", "llava", "mistral3", "qwen2_vl"]
PROMPT = "Read the number in this image."


def _write_prepared(store, rows: int = 8) -> None:
    """Prepared shards as docs/architecture.md specifies: numbers drawn on 56x56 / 84x56 images."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image, ImageDraw

    from vlm_ray import layout

    for split, n, offset in (("train", rows, 0), ("heldout", 2, rows)):
        recs = []
        for i in range(offset, offset + n):
            w, h = (84, 56) if i % 2 else (56, 56)
            img = Image.new("RGB", (w, h), "white")
            ImageDraw.Draw(img).text((8, 20), str(100 + i), fill="black")
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            msgs = [
                {"role": "user", "content": [{"type": "text", "text": PROMPT}, {"type": "image"}]},
                {"role": "assistant", "content": [{"type": "text", "text": str(100 + i)}]},
            ]
            recs.append(
                {
                    "id": f"row-{i}",
                    "source_id": str(i),
                    "image": buf.getvalue(),
                    "width": w,
                    "height": h,
                    "prompt": PROMPT,
                    "system_prompt": None,
                    "text": str(100 + i),
                    "messages": json.dumps(msgs),
                }
            )
        sink = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(recs), sink)
        key = f"{layout.PREPARED}/{split}/shard-00000.parquet"
        store.write_bytes(key, sink.getvalue())
    store.write_json(
        layout.PREPARED_MANIFEST,
        {
            "rows_in": rows + 2,
            "rows_ok": rows + 2,
            "rows_quarantined": 0,
            "splits": {"train": rows, "heldout": 2},
            "shards": [],
        },
    )


def run_family(family: str, work: Path) -> dict:
    """Build the tiny model, train 3 steps with the Unsloth engine, save, reload with Unsloth, generate."""
    import unsloth  # noqa: F401  (first: it patches transformers, trl and peft)

    from vlm_ray import layout
    from vlm_ray.config import load_spec
    from vlm_ray.infer.generation import generate_batch, prepare_inputs
    from vlm_ray.infer.loading import _load_unsloth
    from vlm_ray.models.tiny import build_tiny_model
    from vlm_ray.storage import LocalStore
    from vlm_ray.train.unsloth_engine import train_unsloth

    rec: dict = {"family": family}
    model_dir = build_tiny_model(work / "models" / family, family=family, size="tiny")
    spec = load_spec(
        ROOT / "examples/demo.yaml",
        [
            f"run.uri={work / 'runs' / family}",
            f"model.name={model_dir}",
            "model.full_finetuning=false",
            "model.load_in_16bit=true",
            "train.engine=unsloth",
            "train.max_steps=3",
            "train.per_device_train_batch_size=2",
            "train.warmup_steps=0",
            "train.logging_steps=1",
            "lora.r=4",
            "lora.lora_alpha=4",
        ],
    )
    store = LocalStore(spec.run.uri)
    _write_prepared(store)
    t0 = time.time()
    summary = train_unsloth(spec, store, work / "work" / family, None, [])
    rec.update(
        stage="train",
        train_s=round(time.time() - t0, 1),
        steps=summary["global_step"],
        train_loss=summary["train_loss"],
        peak_gib=summary.get("peak_gpu_memory_gib"),
    )
    adapter = store.uri_of(layout.ADAPTER).removeprefix("file://")
    rec["stage"] = "reload"
    t0 = time.time()
    model, processor = _load_unsloth(spec, str(model_dir), adapter)
    processor.tokenizer.padding_side = "left"
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (84, 56), "white")
    ImageDraw.Draw(img).text((8, 20), "123", fill="black")
    msgs = [[{"role": "user", "content": [{"type": "text", "text": PROMPT}, {"type": "image"}]}]]
    rec["stage"] = "generate"
    out = generate_batch(
        model,
        processor,
        prepare_inputs(processor, [img], msgs),
        {"max_new_tokens": 4, "do_sample": False},
    )
    rec.update(
        stage="done",
        ok=True,
        reload_generate_s=round(time.time() - t0, 1),
        generated_tokens=out[0].tokens,
        generated=out[0].text,
    )
    return rec


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    if len(sys.argv) > 2 and sys.argv[2] == "--one":
        family = sys.argv[3]
        try:
            rec = run_family(family, Path("/tmp/unsloth_families"))
        except BaseException as err:  # record the exact error of this family and go on
            rec = {
                "family": family,
                "ok": False,
                "error": f"{type(err).__name__}: {err}"[:2000],
                "traceback": traceback.format_exc()[-4000:],
            }
        (out / f"{family}.json").write_text(json.dumps(rec, indent=2, default=str))
        return
    families = sys.argv[2:] or FAMILIES
    # tiny models: all families at once on one GPU, each in its own process
    t0 = time.time()
    procs = {}
    for family in families:
        fh = (out / f"{family}.log").open("w")
        procs[family] = subprocess.Popen(
            [sys.executable, __file__, str(out), "--one", family],
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    results = []
    for family, proc in procs.items():
        try:
            code = proc.wait(timeout=max(1, 420 - (time.time() - t0)))
        except subprocess.TimeoutExpired:
            proc.kill()
            code = "killed after 420 s"
        path = out / f"{family}.json"
        rec = (
            json.loads(path.read_text())
            if path.exists()
            else {
                "family": family,
                "ok": False,
                "error": f"process exited {code}; see {family}.log",
            }
        )
        rec["wall_s"] = round(time.time() - t0, 1)
        results.append(rec)
        print(json.dumps({k: v for k, v in rec.items() if k != "traceback"}), flush=True)
        (out / "unsloth_families.json").write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
