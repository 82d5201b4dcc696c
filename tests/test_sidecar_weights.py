"""Weight directories (export, path confinement, cleanup after acknowledgement) and the engine/trainer
log-prob correction functions."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conspo_jax.objectives.correction import logprob_mismatch, mismatch_metrics, tis_weights
from conspo_jax.rollout.sidecar_client import SidecarClient, SidecarError
from conspo_jax.rollout.wire.weights import WeightStore, default_weights_dir, resolve_inside, version_dirname
from conspo_jax.sidecar.engines import build_engine
from conspo_jax.sidecar.options import SidecarOptions
from conspo_jax.sidecar.server import serve


def fake_saver(policy, path):
    """Stands in for conspo_jax.models.save_hf_policy: writes a config and a 'weights' file."""
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"policy": policy}, f)
    with open(os.path.join(path, "model.safetensors"), "wb") as f:
        f.write(b"\0" * 64)


def test_resolve_inside(tmp_path):
    root = tmp_path / "w"
    (root / "v000001").mkdir(parents=True)
    (tmp_path / "other").mkdir()
    os.symlink(tmp_path / "other", root / "link")
    assert resolve_inside(str(root), "v000001") == os.path.realpath(root / "v000001")
    assert resolve_inside(str(root), str(root / "v000001")) == os.path.realpath(root / "v000001")
    for bad in ("", "..", str(root), "v000001/../..", str(tmp_path / "other"), "link", "link/x", "a\x00b"):
        with pytest.raises(ValueError):
            resolve_inside(str(root), bad)


def test_default_dir_is_private_per_user():
    d = default_weights_dir()
    assert d.endswith(f"conspo-weights-{os.getuid()}")
    assert d.startswith("/dev/shm/") or not os.path.isdir("/dev/shm")
    assert version_dirname(12) == "v000012"
    with pytest.raises(ValueError, match="must be >= 0"):
        version_dirname(-1)


def test_export_is_atomic_and_replaces(tmp_path):
    store = WeightStore(str(tmp_path), saver=fake_saver)
    p = store.export("a", 3)
    assert p == str(tmp_path / "v000003") and json.load(open(os.path.join(p, "config.json"))) == {"policy": "a"}
    store.export("b", 3)  # re-export of a version replaces it
    assert json.load(open(os.path.join(p, "config.json"))) == {"policy": "b"}

    def broken(policy, path):
        fake_saver(policy, path)
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        WeightStore(str(tmp_path), saver=broken).export("c", 4)
    assert store.versions() == [3]  # the failed export left nothing a reader could load
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]


def test_old_versions_are_deleted_once_a_newer_one_is_acknowledged(tmp_path):
    srv = serve(handle=build_engine("mock"), options=SidecarOptions(weights_dir=str(tmp_path), workers=0))
    try:
        store = WeightStore(str(tmp_path), saver=fake_saver)
        with SidecarClient(srv.target, weights=store) as client:
            client.push_policy("p1", 1)
            assert store.versions() == [1] and client.health().weight_version == 1
            store.export("p2", 2)  # exported but not yet acknowledged: both must still exist
            assert store.versions() == [1, 2]
            client.push_policy("p3", 3)
            assert store.versions() == [3] and client.version == 3 and client.health().weight_version == 3
            srv.stop(grace=0)
            with pytest.raises(SidecarError):  # no acknowledgement: nothing is deleted
                SidecarClient(srv.target, weights=store, max_retries=0, deadline_s=0.5).push_policy("p4", 4)
            assert store.versions() == [3, 4]
    finally:
        srv.stop(grace=0)


def test_tis_weights_and_mismatch():
    trainer = np.array([[-1.0, -2.0, -0.5], [-3.0, -1.0, 0.0]], np.float32)
    engine = np.array([[-1.5, -1.0, -0.5], [-1.0, -1.0, -9.0]], np.float32)
    mask = np.array([[1, 1, 1], [1, 1, 0]], bool)

    @jax.jit  # one compile for every value checked below; also proves the functions are jit-able
    def everything(t, e, m):
        grad = jax.grad(lambda x: jnp.sum(tis_weights(x, e, m, 2.0)))(t)
        return (
            tis_weights(t, e, m, 1.5),
            logprob_mismatch(t, e, m),
            logprob_mismatch(t, e, jnp.zeros_like(m)),
            mismatch_metrics(t, e, m, cap=1.5),
            grad,
            tis_weights(jnp.full((1, 1), 500.0), jnp.zeros((1, 1)), jnp.ones((1, 1), bool), 2.0),
        )

    w, mean_abs, empty, m, grad, huge = jax.device_get(everything(trainer, engine, mask))
    ratio = np.exp(trainer - engine)
    np.testing.assert_allclose(w, np.where(mask, np.minimum(ratio, 1.5), 0.0), rtol=1e-6)
    assert w[0, 0] == pytest.approx(1.5) and w[1, 2] == 0.0  # truncated; masked
    assert float(mean_abs) == pytest.approx(np.abs(trainer - engine)[mask].mean())
    assert float(empty) == 0.0
    assert float(m["rollout/logp_mismatch_max"]) == pytest.approx(2.0)
    assert float(m["rollout/tis_clip_frac"]) == pytest.approx(1 / 5)
    assert float(m["rollout/tis_mean_weight"]) == pytest.approx(w.sum() / 5)
    assert float(np.abs(grad).sum()) == 0.0  # no gradient flows through the weights
    assert huge[0, 0] == pytest.approx(2.0)  # a huge ratio is capped, not inf/nan
    with pytest.raises(ValueError, match="cap must be > 0"):
        tis_weights(trainer, engine, mask, cap=0.0)
