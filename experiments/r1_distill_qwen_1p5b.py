"""The paper's DeepSeek-R1-Distill-Qwen-1.5B (Table 1) run: 8192-token responses, 4 epochs, 256 prompts x 8 rollouts,
lr 2e-6, tau 10, M 0.01, alpha 0.3.

    conspo train --config experiments/r1_distill_qwen_1p5b.py --workdir runs/r1_distill_qwen_1p5b \
        --config.model.path=/path/to/hf/checkpoint --config.data.train=/path/to/train.json

Arguments (comma-separated): 'random' for random weights of the same architecture (dry runs),
or an objective name (e.g. 'grpo', 'disco', 'conspo_no_margin') to run that baseline or ablation.
"""

from conspo_jax.train.config_base import paper_config


def get_config(arg=None):
    return paper_config("r1-distill-qwen-1.5b", response_len=8192, epochs=4, arg=arg)
