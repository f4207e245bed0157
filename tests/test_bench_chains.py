"""Every command in bench/chains/ would start: its bench script accepts its arguments, its BENCH_*
switches are ones the benches read, its job-spec overrides name real fields, and the tests it
runs exist. Device time is scarce; a typo found there costs a whole chain.

Each bench's arguments are checked with its own parser (infer_speed and train_speed's
build_parser; the pricing benches' through bench.kernel_rows.build_parser).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from bench import (
    fp8_frozen_linear,
    host_embedding_lookup,
    infer_speed,
    kernel_rows,
    lora_add,
    lora_add_fidelity,
    lora_add_training_split,
    lora_overhead,
    train_speed,
    vision_kernels,
)
from vlm_ray.config import SpecError, apply_overrides, parse_spec

ROOT = Path(__file__).resolve().parents[1]
CHAINS = sorted((ROOT / "bench" / "chains").glob("*.txt"))
PARSERS = {
    "bench/infer_speed.py": infer_speed.build_parser,
    "bench/train_speed.py": train_speed.build_parser,
    **{
        f"bench/{m.__name__.split('.')[-1]}.py": (
            lambda m=m: kernel_rows.build_parser(m.__doc__, m.add_arguments)
        )
        for m in (
            vision_kernels,
            lora_overhead,
            fp8_frozen_linear,
            host_embedding_lookup,
            lora_add,
            lora_add_fidelity,
            lora_add_training_split,
        )
    },
}
KNOWN_SWITCHES = {
    name
    for script in ("infer_speed.py", "train_speed.py", "device_chains.sh")
    for name in re.findall(r"\b(BENCH_[A-Z0-9_]+)", (ROOT / "bench" / script).read_text())
}


ASSIGNMENT = re.compile(r"([A-Z_][A-Z0-9_]*)=(\S*)")


def commands(chain: Path) -> list[tuple[dict[str, str], list[str]]]:
    """The chain's commands as (environment assignments, program and arguments): comments and
    blank lines dropped, `a && b` and `a; b` split, `timeout N` taken off the front."""
    out = []
    for line in chain.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        parts: list[list[str]] = [[]]
        for token in lexer:  # quotes respected: a ; inside them stays in its word
            if token in ("&&", ";", "||"):
                parts.append([])
            else:
                parts[-1].append(token)
        for words in filter(None, parts):
            env = {}
            while words and ASSIGNMENT.fullmatch(words[0]):
                name, value = ASSIGNMENT.fullmatch(words.pop(0)).groups()
                env[name] = value
            if words[:1] == ["timeout"]:
                words = words[2:] if words[1:2] != ["-k"] else words[4:]
            out.append((env, words))
    return out


@pytest.mark.parametrize("chain", CHAINS, ids=lambda p: p.name)
def test_every_command_of_the_chain_would_start(chain: Path):
    assert commands(chain), f"{chain.name} has no commands"
    for env, program in commands(chain):
        unknown = sorted(k for k in env if k.startswith("BENCH_") and k not in KNOWN_SWITCHES)
        assert not unknown, f"{chain.name}: switches no bench reads: {unknown}"
        if program[:2] == ["python3", "-m"] and program[2:3] == ["pytest"]:
            paths = [w.split("::")[0] for w in program if w.startswith("tests/")]
            missing = [p for p in paths if not (ROOT / p).exists()]
            assert not missing, f"{chain.name}: no such tests: {missing}"
        elif program[:1] == ["python3"] and program[1:2] and program[1] in PARSERS:
            try:
                args = PARSERS[program[1]]().parse_args(program[2:])
            except SystemExit:
                pytest.fail(f"{chain.name}: {program[1]} refuses {' '.join(program[2:])}")
            if getattr(args, "set", None):
                raw = {
                    "model": {"name": "m"},
                    "data": {"source": "d"},
                    "train": {"engine": "unsloth"},
                }
                parse_spec(apply_overrides(raw, args.set), f"{chain.name} --set")


def test_a_misspelt_argument_or_switch_is_caught(tmp_path: Path):
    chain = tmp_path / "typo.txt"
    chain.write_text("timeout 60 python3 bench/infer_speed.py --shape 2b --batchsize 512\n")
    with pytest.raises(pytest.fail.Exception, match="refuses --shape 2b --batchsize 512"):
        test_every_command_of_the_chain_would_start(chain)
    chain.write_text("BENCH_COMPILE_LANGAUGE=1 python3 bench/infer_speed.py --shape 2b\n")
    with pytest.raises(AssertionError, match="BENCH_COMPILE_LANGAUGE"):
        test_every_command_of_the_chain_would_start(chain)
    chain.write_text("python3 bench/train_speed.py --shape 7b --set train.cuda_graph=true\n")
    with pytest.raises(SpecError, match=r"train\.cuda_graph"):
        test_every_command_of_the_chain_would_start(chain)


def test_the_fast_training_example_is_the_benchmark_s_fastest_line():
    """examples/qwen2_vl_7b_fast_train.yaml quotes run 25's figures, so it must train as that
    line did: every --set of the chain's first stage line, its batch and its loader workers."""
    from vlm_ray.config import load_spec

    chain = ROOT / "bench" / "chains" / "train_7b_fp8_label_span_best_batch.txt"
    stage = next(p for _, p in commands(chain) if "stage" in p and "--modes" in p)
    args = train_speed.build_parser().parse_args(stage[2:])
    example = load_spec(ROOT / "examples" / "qwen2_vl_7b_fast_train.yaml")

    assert args.set, "the line sets the settings it measures"
    for assignment in args.set:
        key, _, value = assignment.partition("=")
        section, field = key.split(".")
        assert str(getattr(getattr(example, section), field)).lower() == value.lower(), key
    assert example.train.per_device_train_batch_size == args.batch
    assert example.train.dataloader_num_workers == args.workers
    assert example.data.image_min_size == example.data.image_max_size == args.image
    assert example.model.load_in_4bit is False  # the bench's model loads in 16 bits
