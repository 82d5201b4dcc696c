"""The paper's prompt (Appendix C), used for both rollouts and evaluation.

The problem is followed by one instruction sentence; with a chat model the result is the single user
turn of the model's own chat template, ending in the assistant header (``add_generation_prompt``).
"""

from __future__ import annotations

INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."


def _has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None)) and hasattr(tokenizer, "apply_chat_template")


def build_prompt(problem: str, tokenizer=None) -> str:
    """``problem`` + the instruction, wrapped in ``tokenizer``'s chat template when it has one."""
    if not isinstance(problem, str) or not problem.strip():
        raise ValueError(f"build_prompt: problem must be a non-empty string, got {problem!r:.80}")
    text = f"{problem.strip()} {INSTRUCTION}"
    if tokenizer is not None and _has_chat_template(tokenizer):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
    return text


def encode_prompt(problem: str, tokenizer) -> list[int]:
    """Token ids of ``build_prompt(problem, tokenizer)``.

    A chat template already writes any BOS token into the text, so special tokens are not added a
    second time; a plain prompt gets the tokenizer's usual special tokens (e.g. Llama's BOS).
    """
    if tokenizer is None:
        raise ValueError("encode_prompt: a tokenizer is required")
    chat = _has_chat_template(tokenizer)
    text = build_prompt(problem, tokenizer)
    if callable(tokenizer) and hasattr(tokenizer, "apply_chat_template"):  # HF tokenizer
        ids = tokenizer(text, add_special_tokens=not chat)["input_ids"]
    else:
        ids = tokenizer.encode(text)
    return [int(i) for i in ids]
