"""The paper's DeepSeek-R1-Distill-Llama-8B (Table 2) run: 8192-token responses, 4 epochs, 256 prompts x 8 rollouts,
lr 2e-6, tau 10, M 0.01, alpha 0.3.

    conspo train --config experiments/r1_distill_llama_8b.py --workdir runs/r1_distill_llama_8b \
        --config.model.path=/path/to/hf/checkpoint --config.data.train=/path/to/train.json

Arguments (comma-separated): 'random' for random weights of the same architecture (dry runs),
or an objective name (e.g. 'grpo', 'disco', 'conspo_no_margin') to run that baseline or ablation.
"""

from conspo_jax.train.config_base import paper_config


def get_config(arg=None):
    return paper_config("r1-distill-llama-8b", response_len=8192, epochs=4, arg=arg)
