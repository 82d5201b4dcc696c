"""The training config schema shared by every experiment module, with the paper's defaults.

Experiment modules call ``base_config()`` and change what differs. Every objective in the registry
gets its own section ``objective.<name>`` holding its keyword defaults, so switching
``--config.objective.name=grpo`` picks GRPO's hyper-parameters and ``--config.objective.grpo.eps_high=0.28``
overrides one of them; a key that does not exist is an error, never silently ignored.
"""

from __future__ import annotations

import inspect

import ml_collections

# Section 5.1 / Tables 7-8 of the paper.
PAPER = dict(
    prompts_per_step=256,
    n=8,
    temperature=1.0,
    lr=2e-6,
    tau=10.0,
    max_margin=0.01,
    warmup_ratio=0.3,
    eval_temperature=0.6,
    eval_top_p=0.95,
    max_prompt_len=1024,
)


def objective_defaults(name: str) -> dict:
    """Keyword hyper-parameters (with non-None scalar defaults) of a registered objective."""
    from conspo_jax.objectives import get_objective

    fn = get_objective(name)
    out = {}
    for p in inspect.signature(fn).parameters.values():
        if p.kind == p.KEYWORD_ONLY and p.name not in ("num_groups", "progress"):
            if isinstance(p.default, (bool, int, float, str)):
                out[p.name] = p.default
    return out


def base_config() -> ml_collections.ConfigDict:
    from conspo_jax.objectives import list_objectives

    c = ml_collections.ConfigDict()
    c.seed = 0
    c.xla_cache_dir = "~/.cache/conspo_jax/xla"  # persistent compilation cache; '' disables
    c.task = "math"  # 'math' (math_reward on \boxed{}) or 'arith' (the synthetic task)

    c.model = ml_collections.ConfigDict(
        dict(
            arch="",  # a named architecture (conspo_jax.models.get_model_config) for random init
            path="",  # a local HF checkpoint directory
            random_init=False,  # True: random weights of path's / arch's architecture (dry runs)
            dtype="bfloat16",
            param_dtype="float32",
            remat="none",
            logprob_chunk=0,
            overrides=ml_collections.ConfigDict(),  # ModelConfig fields to replace (tiny models)
            # LoRA (conspo_jax/models/lora.py): rank 0 trains every weight; rank > 0 trains adapters on the
            # targets (of q,k,v,o,gate,up,down) with scale alpha / rank and freezes the rest. All seven at a
            # small rank is the setting "LoRA Without Regret" (Thinking Machines, 2025) finds matches full RL.
            lora=ml_collections.ConfigDict(dict(rank=0, alpha=16.0, targets="q,k,v,o,gate,up,down")),
        )
    )
    c.tokenizer = ""  # defaults to model.path; 'arith' builds the synthetic task's tokenizer
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))  # -1: all remaining devices
    # Multi-process runs (conspo_jax/base/distributed.py; BUILD.md "Many hosts"). Unset values fall back to
    # JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, then to JAX's cluster detection.
    c.distributed = ml_collections.ConfigDict(
        dict(enabled=False, coordinator="", num_processes=0, process_id=-1, init_timeout_s=300)
    )

    c.data = ml_collections.ConfigDict(
        dict(
            train="",
            train_format="",
            # math task: a held-out set evaluated every eval.every steps (eval.num_problems of it), beside
            # or instead of eval.benchmarks; 'arith_nl' is the synthetic task in words, for chat models
            eval="",
            # math task: what is graded, 'boxed' (the paper) or 'boxed_or_last_number' (the last number when a
            # response has no box, for small models; eval/boxed_rate still counts boxes alone)
            answer_format="boxed",
            max_prompt_len=PAPER["max_prompt_len"],
            num_epochs=4,
            shuffle=True,
            # the synthetic arithmetic task
            num_train=4000,
            max_operand=99,
            ops="+-",
            pad_operands=False,
        )
    )
    c.rollout = ml_collections.ConfigDict(
        dict(
            backend="jax",
            prompts_per_step=PAPER["prompts_per_step"],
            n=PAPER["n"],
            temperature=PAPER["temperature"],
            top_p=1.0,
            top_k=0,
            max_new_tokens=8192,
            prompt_bucket=64,
            # embedded sampler: device rows decoding at once (0: every (prompt, sample) pair; fewer rows
            # refill finished ones with pending pairs) and decode steps per jitted chunk
            decode_rows=0,
            decode_chunk=16,
            # 1: generate step t+1's rollouts (with step t's weights) while step t trains: one step off-policy
            async_steps=0,
            # > 0: truncated importance sampling, min(pi_trainer / pi_engine, cap) per token, for rollouts
            # that are stale (async_steps) or come from another engine (sidecar, SGLang)
            tis_cap=0.0,
            # DAPO's dynamic sampling (conspo_jax/train/collect.py): 'auto' = on for objective dapo only,
            # 'on' / 'off' for any objective. Rounds of fresh prompts until prompts_per_step groups with
            # varied rewards are found; at the cap the batch is padded with masked groups.
            dynamic_sampling="auto",
            max_sampling_rounds=10,  # generation rounds per step at most, the first included (DAPO: 10)
            oversample=1,  # data batches of prompts_per_step prompts per round (DAPO's recipe: 3)
            # DAPO's overlong reward shaping (Eq. 13): L_cache in tokens, L_max = max_new_tokens.
            # -1 = auto (max_new_tokens // 5 for dapo, DAPO's 4096 of 20480; 0 otherwise); 0 = off.
            overlong_buffer=-1,
            overlong_penalty=1.0,  # the penalty at L_max (verl's overlong_buffer.penalty_factor)
            sidecar=ml_collections.ConfigDict(
                dict(
                    address="127.0.0.1:50051",
                    token="",
                    weights_dir="",
                    max_staleness=0,
                    deadline_s=600.0,
                    verifier="",  # '': the task's (math or arith)
                    # read by the sidecar process (conspo sidecar --config ...)
                    workers=2,  # verifier processes
                    chunk_prompts=0,  # prompts per engine call; 0: a request's prompts in one call
                    max_message_mb=64,
                    version_wait_s=5.0,  # how long a request waits for its min weight version
                    sglang=ml_collections.ConfigDict(),  # keyword arguments of sglang.Engine
                )
            ),
        )
    )
    c.objective = ml_collections.ConfigDict(dict(name="conspo"))
    for name in list_objectives():
        c.objective[name] = ml_collections.ConfigDict(objective_defaults(name))
    c.optim = ml_collections.ConfigDict(
        dict(lr=PAPER["lr"], warmup_steps=0, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, grad_clip=1.0)
    )
    c.train = ml_collections.ConfigDict(
        dict(
            num_steps=0,  # 0: derived from data size, prompts_per_step and data.num_epochs
            mini_batches=1,  # optimizer updates per rollout batch (groups split evenly)
            micro_batch_groups=0,  # groups per micro-batch for gradient accumulation; 0 = whole mini-batch
            ckpt_every=50,
            keep_ckpts=2,
            stop_after=0,
            max_nonfinite=20,
            progress_bar=True,
            export_hf=True,  # write the final policy + tokenizer to <workdir>/hf
            # every K RL steps write <workdir>/diagnostics/step_<s>.npz: per-rollout credit vs score gap
            # (Figure 1, left; conspo_jax/train/diagnostics.py); 0 = never
            diagnostics_every=0,
        )
    )
    c.sft = ml_collections.ConfigDict(
        # cache_dir: reuse one warm start across runs of the same seed (see conspo_jax/train/sft.py).
        # target_pass: stop once the probe's pass rate at T=1 reaches it (steps is then the cap); 0 = run all steps.
        dict(steps=0, lr=1e-3, batch_size=64, warmup_steps=10, cache_dir="", target_pass=0.0, check_every=5)
    )
    c.eval = ml_collections.ConfigDict(
        dict(
            every=100,
            at_start=True,
            n=1,
            temperature=PAPER["eval_temperature"],
            top_p=PAPER["eval_top_p"],
            max_new_tokens=0,  # 0: rollout.max_new_tokens (the paper evaluates at the training length)
            k=0,  # samples per problem; 0: the paper's protocol (avg@32 on AIME/HMMT/AMC, pass@1 elsewhere)
            benchmarks="aime24,aime25,aime26,hmmt25,math500,amc23,olympiadbench",
            limit=0,
            num_problems=200,
        )
    )
    return c


def paper_config(arch: str, *, response_len: int, epochs: int, arg: str | None) -> ml_collections.ConfigDict:
    """Section 5.1 / Tables 7-8 settings for one backbone.

    ``arg`` is a comma-separated list of options: ``random`` swaps in random weights of the same
    architecture (dry runs; the tokenizer still comes from model.path), and any objective name
    (``grpo``, ``dapo``, ``conspo_no_margin``, ...) selects that objective instead of ConSPO.
    """
    from conspo_jax.objectives import list_objectives

    c = base_config()
    c.model.arch = arch
    # GPU runs: save the named projections (BENCHMARKS.md, CPU proof at 1.5B, 8 x 2048: 1.088x the model
    # FLOPs, as 'none', at 39.6 GiB instead of 83.5; 'full' fits in 24.4 GiB but costs 1.29x).
    c.model.remat = "names"
    c.rollout.max_new_tokens = response_len
    c.data.num_epochs = epochs
    c.data.train = "deepscaler"
    c.eval.every = 100
    for opt in filter(None, (arg or "").split(",")):
        if opt == "random":
            c.model.random_init = True
        elif opt in list_objectives():
            c.objective.name = opt
        else:
            raise ValueError(f"unknown config argument {opt!r}: use 'random' or one of {list_objectives()}")
    return c
