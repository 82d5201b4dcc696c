"""The paper's Qwen3-4B-Base (Table 3) run: 4096-token responses, 2 epochs, 256 prompts x 8 rollouts,
lr 2e-6, tau 10, M 0.01, alpha 0.3.

    conspo train --config experiments/qwen3_4b_base.py --workdir runs/qwen3_4b_base \
        --config.model.path=/path/to/hf/checkpoint --config.data.train=/path/to/train.json

Arguments (comma-separated): 'random' for random weights of the same architecture (dry runs),
or an objective name (e.g. 'grpo', 'disco', 'conspo_no_margin') to run that baseline or ablation.
"""

from conspo_jax.train.config_base import paper_config


def get_config(arg=None):
    return paper_config("qwen3-4b-base", response_len=4096, epochs=2, arg=arg)
