"""Training a half-precision model: float32 master weights, exact resume, half checkpoints load."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from ifp_compile.train import config_from_dict, run, setup
from ifp_compile.train.master_weights import MasterWeights
from ifp_compile.train.trainer import load_trained
from tests.train.conftest import make_config


def _adamw_steps(w: torch.Tensor, grad: torch.Tensor, master: bool, steps: int = 3) -> torch.Tensor:
    w = w.clone().requires_grad_(True)
    mw = MasterWeights([w]) if master else None
    opt = torch.optim.AdamW([mw.stand_in(w) if mw is not None else w], lr=1e-5)
    for _ in range(steps):
        w.grad = grad.clone()
        if mw is not None:
            mw.grads_to_master()
        opt.step()
        if mw is not None:
            mw.to_model()
    return w.detach()


def test_adamw_on_float16_weights_breaks_and_master_weights_fix_it():
    """Why the trainer steps float32 copies: small gradients make AdamW divide by zero in float16."""
    w = torch.full((4,), 0.02, dtype=torch.float16)
    grad = torch.full((4,), 1e-4, dtype=torch.float16)
    assert not torch.isfinite(_adamw_steps(w, grad, master=False)).all()
    fixed = _adamw_steps(w, grad, master=True)
    reference = _adamw_steps(w.float(), grad.float(), master=False)  # the same steps in float32
    assert torch.isfinite(fixed).all() and fixed.dtype == torch.float16
    torch.testing.assert_close(fixed, reference.half(), rtol=0, atol=0)


def test_bfloat16_weights_keep_updates_smaller_than_their_resolution():
    w = torch.full((4,), 1.0, dtype=torch.bfloat16)
    grad = torch.full((4,), 1.0, dtype=torch.bfloat16)
    assert torch.equal(_adamw_steps(w, grad, master=False), w)  # 3 x 1e-5 is rounded away every step
    mw = MasterWeights([w.clone()])
    assert len(mw.swap({"w": w})) == 1 and mw.swap({"w": w})["w"] is w  # another tensor passes through
    p = w.clone().requires_grad_(True)
    mw = MasterWeights([p])
    opt = torch.optim.AdamW([mw.stand_in(p)], lr=1e-5)
    for _ in range(300):  # 300 x 1e-5 = 0.003, about one bfloat16 step at 1.0 (2^-8 = 0.0039)
        p.grad = grad.clone()
        mw.grads_to_master()
        assert p.grad is None  # zero_grad only reaches the copy: the model's gradient must not pile up
        opt.step()
        mw.to_model()
    assert mw.stand_in(p)[0].item() == pytest.approx(1.0 - 300 * 1e-5 * (1 + 0.01), abs=1e-5)
    assert (p < 1.0).all()  # the accumulated update reached the model


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_joint_training_in_half_precision_learns_and_resumes_exactly(tiny_model_dir, data_dir, tmp_path, dtype):
    kw = dict(steps=6, batch_size=2, train_llm=True, llm_lr=1e-3, save_every=2, dtype=dtype)
    cfg = lambda out: config_from_dict(make_config(tiny_model_dir, data_dir / "text.jsonl", tmp_path / out, **kw))  # noqa: E731
    whole = run(cfg("whole"))
    assert all(torch.isfinite(torch.tensor(whole.losses))) and sum(whole.losses[-2:]) < sum(whole.losses[:2])
    run(cfg("part"), stop_after=3)
    resumed = run(cfg("part"))
    assert resumed.losses == whole.losses
    for f in ("predictor.safetensors", "optimizer.safetensors", "llm.safetensors"):
        assert (tmp_path / "whole" / "checkpoint" / f).read_bytes() == (tmp_path / "part" / "checkpoint" / f).read_bytes()
    with safe_open(str(tmp_path / "whole" / "checkpoint" / "llm.safetensors"), "pt") as f:
        saved = {n: f.get_tensor(n) for n in f.keys()}
    assert {t.dtype for t in saved.values()} == {torch.float32}  # the master copies, for exact resume
    # a fresh half-precision setup loads the checkpoint rounded, as the trained model ran
    s = setup(cfg("fresh"))
    before = {n: p.detach().clone() for n, p in s.model.named_parameters()}
    load_trained(tmp_path / "whole" / "checkpoint", s)
    params = dict(s.model.named_parameters())
    assert {p.dtype for p in params.values()} == {getattr(torch, dtype)}
    assert all(torch.equal(params[n], saved[n].to(params[n].dtype)) for n in params)
    assert any(not torch.equal(before[n], params[n]) for n in params)  # the LLM did train


def test_a_float16_run_that_overflows_says_what_to_do(tiny_model_dir, data_dir, tmp_path):
    from ifp_compile.train import TrainError

    cfg = config_from_dict(make_config(tiny_model_dir, data_dir / "text.jsonl", tmp_path / "o", steps=4, train_llm=True,
                                       llm_lr=1e6, dtype="float16"))
    with pytest.raises(TrainError, match=r"step 2: the (loss|gradient norm) is .*in float16 this is usually an "
                                         r"overflow: train in bfloat16 or float32"):
        run(cfg)
    assert not (tmp_path / "o" / "checkpoint").exists()  # nothing half-written
