"""`conspo eval --hf DIR` end to end: a tiny random Qwen2 checkpoint (written by our HF exporter) with a
byte-level chat tokenizer, sampled by the JAX engine on real MATH500 and AIME 2024 rows, verified,
tabulated. It needs neither torch nor network."""

import json
import os

import pytest

from tests.conftest import SHARED_DATA

transformers = pytest.importorskip("transformers")

CHAT = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(specials + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", additional_special_tokens=specials[1:2]
    )
    fast.chat_template = CHAT
    return fast


@pytest.mark.skipif(not os.path.isdir(SHARED_DATA), reason=f"shared data not found at {SHARED_DATA}")
def test_eval_command_on_tiny_random_policy(tmp_path):
    from conspo_jax.data.math_data import load_benchmark
    from conspo_jax.evals import run_eval_command
    from conspo_jax.train.config_base import base_config

    ckpt = str(tmp_path / "tiny")
    tok = _byte_tokenizer()
    from conspo_jax.models import get_model_config, init_policy
    from conspo_jax.models.hf_io import save_hf_policy

    arch = get_model_config(
        "tiny-qwen2",
        vocab_size=320,
        num_layers=1,
        max_position_embeddings=2048,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
    )
    save_hf_policy(init_policy(arch, seed=0), ckpt)  # replaces the directory atomically: tokenizer after
    tok.save_pretrained(ckpt)

    config = base_config()
    config.model.path = ckpt
    config.rollout.max_new_tokens = 6
    config.rollout.prompt_bucket = 1024  # both sets in one bucket: one sampler compile
    config.eval.benchmarks = "math500,aime24"
    config.eval.limit = 2
    config.eval.k = 2  # instead of the paper's 32, to keep the test small
    os.environ.setdefault("CONSPO_DATA_DIR", SHARED_DATA)
    out = run_eval_command(config, hf=ckpt, workdir=str(tmp_path / "eval"))

    math, aime = out["benchmarks"]["math500"], out["benchmarks"]["aime24"]
    assert (math["num_problems"], math["k"], aime["num_problems"], aime["k"]) == (2, 2, 2, 2)
    assert math["metric"] == aime["metric"] == "avg@2"
    assert 0 <= math["score"] <= 100 and 0 <= aime["score"] <= 100
    assert out["settings"]["temperature"] == 0.6 and out["settings"]["max_new_tokens"] == 6
    lines = [json.loads(x) for x in open(tmp_path / "eval" / "samples.jsonl")]
    assert len(lines) == 2 * 2 + 2 * 2
    assert all(1 <= x["num_tokens"] <= 6 for x in lines)
    assert [x["answer"] for x in lines if x["benchmark"] == "aime24"][::2] == [
        r["answer"] for r in load_benchmark("aime24", SHARED_DATA, limit=2)
    ]
    assert os.path.isfile(tmp_path / "eval" / "results.json")
    # Random weights answer nothing right; the row fills exactly the two columns that ran.
    row = out["table"].splitlines()[2].split(" | ")
    assert row[0] == "| tiny" and row[1] == f"{aime['score']:.1f}" and row[5] == f"{math['score']:.1f}"
    assert row[2] == row[3] == row[4] == row[6] == row[7] == "-"


@pytest.mark.skipif(not os.path.isdir(SHARED_DATA), reason=f"shared data not found at {SHARED_DATA}")
def test_math_training_path_end_to_end(tmp_path):
    """`conspo train` on the math task: HF checkpoint load, real GSM8K training rows through the chat
    prompt, math_reward in worker processes, a ConSPO step, benchmark evaluation during training, and
    the HF export of the trained policy."""
    from conspo_jax.models import get_model_config, init_policy, save_hf_policy
    from conspo_jax.train.config_base import base_config
    from conspo_jax.train.metrics import read_metrics
    from conspo_jax.train.trainer import train

    ckpt = str(tmp_path / "tiny")
    tok = _byte_tokenizer()
    arch = get_model_config(
        "tiny-qwen2",
        vocab_size=320,
        num_layers=1,
        max_position_embeddings=2048,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
    )
    save_hf_policy(init_policy(arch, seed=0), ckpt)
    tok.save_pretrained(ckpt)

    os.environ.setdefault("CONSPO_DATA_DIR", SHARED_DATA)
    c = base_config()
    c.model.path = ckpt
    c.model.dtype = "float32"
    c.data.train = "gsm8k_train"
    c.data.max_prompt_len = 512
    c.rollout.prompts_per_step, c.rollout.n, c.rollout.max_new_tokens = 2, 2, 4
    c.rollout.prompt_bucket = 512
    c.train.num_steps, c.train.ckpt_every, c.train.progress_bar = 1, 1, False
    c.eval.benchmarks, c.eval.limit, c.eval.k, c.eval.every = "aime24", 1, 2, 1
    workdir = str(tmp_path / "run")
    train(c, workdir)

    rows = read_metrics(workdir)
    assert [r["step"] for r in rows] == [0, 1]
    assert rows[1]["reward/mean"] == 0.0  # a random policy does not box the right answer in 4 tokens
    assert "eval/aime24" in rows[0] and "eval/aime24" in rows[1]
    assert os.path.exists(os.path.join(workdir, "eval", "step_1", "samples.jsonl"))
    assert os.path.exists(os.path.join(workdir, "hf", "config.json"))


def test_math_task_held_out_set_reports_accuracy_and_boxed_rate(tmp_path):
    """data.eval on the math task: a held-out set evaluated with math-verify like the synthetic task's, with the
    boxed-answer rate beside the accuracy; 'arith_nl' (the synthetic problems in words) keeps its splits apart."""
    from conspo_jax.data.arith import make_arith_nl_records
    from conspo_jax.models import get_model_config, init_policy, save_hf_policy
    from conspo_jax.run import build
    from conspo_jax.train.config_base import base_config
    from conspo_jax.train.metrics import read_metrics
    from conspo_jax.train.trainer import train

    train_recs, eval_recs = (make_arith_nl_records(s, num=50, seed=3, max_operand=20) for s in ("train", "eval"))
    assert not {r["problem"] for r in train_recs} & {r["problem"] for r in eval_recs}
    for r in train_recs[:20]:
        a, op, b = r["problem"].removeprefix("What is ").removesuffix("?").split()
        assert int(r["answer"]) == (int(a) + int(b) if op == "plus" else int(a) - int(b)), r

    ckpt = str(tmp_path / "tiny")
    tok = _byte_tokenizer()
    arch = get_model_config(
        "tiny-qwen2", vocab_size=320, num_layers=1, max_position_embeddings=512, eos_token_id=tok.eos_token_id
    )
    save_hf_policy(init_policy(arch, seed=0), ckpt)
    tok.save_pretrained(ckpt)
    c = base_config()
    c.model.path, c.model.dtype = ckpt, "float32"
    c.data.train, c.data.eval, c.data.num_train, c.data.max_operand = "arith_nl", "arith_nl", 40, 20
    c.data.max_prompt_len = c.rollout.prompt_bucket = 256
    c.rollout.prompts_per_step, c.rollout.n, c.rollout.max_new_tokens = 2, 2, 4
    c.train.num_steps, c.train.ckpt_every, c.train.progress_bar = 1, 1, False
    c.eval.benchmarks, c.eval.num_problems, c.eval.every = "", 6, 1
    task = build.build_task(c, tok)
    assert len(task.eval_records) == 6 and task.eval_records[0]["problem"].startswith("What is ")
    workdir = str(tmp_path / "run")
    train(c, workdir)
    rows = read_metrics(workdir)
    assert [r["step"] for r in rows] == [0, 1]
    for r in (rows[0], rows[1]):
        assert 0.0 <= r["eval/accuracy"] <= r["eval/boxed_rate"] <= 1.0, r  # a right answer is a boxed one
    samples = [json.loads(line) for line in open(os.path.join(workdir, "eval", "step_1", "samples.jsonl"))]
    assert len(samples) == 6


def test_conspo_eval_grades_benchmarks_by_the_configs_answer_format():
    """A math config trained on last-number answers (data.answer_format) is scored the same way on its
    benchmarks; the arithmetic task and a 'boxed' config keep the paper's boxed-only rule."""
    from conspo_jax.run import build
    from conspo_jax.train.config_base import base_config

    c = base_config()
    c.task = "math"
    unboxed, boxed = ["So 23 + 45 = 68.", "The sum is \\boxed{68}."], ["68", "68"]
    c.data.answer_format = "boxed_or_last_number"
    assert [v.score > 0 for v in build.benchmark_verifier(c)(unboxed, boxed)] == [True, True]
    c.data.answer_format = "boxed"
    assert [v.score > 0 for v in build.benchmark_verifier(c)(unboxed, boxed)] == [False, True]
    c.task, c.data.answer_format = "arith", "boxed_or_last_number"
    assert [v.score > 0 for v in build.benchmark_verifier(c)(unboxed, boxed)] == [False, True]
