"""``python -m conspo_jax train ...`` is the same as ``conspo train ...``."""

from conspo_jax.cli import entry

if __name__ == "__main__":
    entry()
