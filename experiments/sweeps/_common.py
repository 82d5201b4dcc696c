"""Argument parsing shared by the sweep modules: ``quick``, ``seeds=N``, ``steps=N``, ``methods=A+B`` (a subset of
the rows), comma-separated."""

QUICK_OVERRIDES = {"train.num_steps": 4, "train.ckpt_every": 2, "eval.every": 2}
# Figure 1 (left): the GRPO and ConSPO runs dump per-rollout credit every this many steps (6 dumps of 240 steps).
CREDIT_EVERY = {"quick": 2, "full": 40}


def credit_overrides(method, opts):
    """train.diagnostics_every for the methods Figure 1 compares; nothing for the others."""
    if method not in ("grpo", "conspo"):
        return {}
    return {"train.diagnostics_every": CREDIT_EVERY["quick" if opts["quick"] else "full"]}


def parse_arg(arg, *, default_seeds, extra=None):
    """``extra``: a module's own keys, {name: (type, default)}, parsed as ``name=value``."""
    extra = extra or {}
    opts = {"quick": False, "seeds": default_seeds, "steps": 0, "methods": ()}
    opts.update({k: default for k, (_, default) in extra.items()})
    for opt in filter(None, (arg or "").split(",")):
        key, _, value = opt.partition("=")
        if key in extra and value:
            try:
                opts[key] = extra[key][0](value)
            except ValueError:
                kind = {int: "an integer", float: "a number"}.get(extra[key][0], extra[key][0].__name__)
                raise ValueError(f"sweep argument {opt!r}: {key} must be {kind}") from None
        elif key == "quick" and not value:
            opts["quick"] = True
        elif key in ("seeds", "steps") and value.isdigit():
            opts[key] = int(value)
        elif key == "methods" and value:
            opts["methods"] = tuple(value.split("+"))
        else:
            own = "".join(f", {k}=X" for k in extra)
            raise ValueError(
                f"unknown sweep argument {opt!r}: use quick, seeds=N, steps=N, methods=A+B{own} (comma-separated)"
            )
    return opts


def base_overrides(opts):
    out = dict(QUICK_OVERRIDES) if opts["quick"] else {}
    if opts["steps"]:
        out["train.num_steps"] = opts["steps"]
    return out
