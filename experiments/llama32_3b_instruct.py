"""The paper's Llama-3.2-3B-Instruct (Table 4) run: 4096-token responses, 4 epochs, 256 prompts x 8 rollouts,
lr 2e-6, tau 10, M 0.01, alpha 0.3.

    conspo train --config experiments/llama32_3b_instruct.py --workdir runs/llama32_3b_instruct \
        --config.model.path=/path/to/hf/checkpoint --config.data.train=/path/to/train.json

Arguments (comma-separated): 'random' for random weights of the same architecture (dry runs),
or an objective name (e.g. 'grpo', 'disco', 'conspo_no_margin') to run that baseline or ablation.
"""

from conspo_jax.train.config_base import paper_config


def get_config(arg=None):
    return paper_config("llama-3.2-3b-instruct", response_len=4096, epochs=4, arg=arg)
