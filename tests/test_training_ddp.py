"""``torchrun --nproc_per_node 2`` (gloo, CPU) fits the same adapter as one process with the same
global batch. Also runnable as the torchrun worker itself: ``python tests/test_training_ddp.py OUT BATCH``."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train(out: str, per_device_batch: int) -> None:
    from mosear_fast import MoSEConfig
    from mosear_fast.av_model import build_demo_model
    from mosear_fast.training.fit import default_training_arguments, fit_mose, prepare_mose
    from mosear_fast.training.synthetic import generate_camer
    from mosear_fast.training.trained_folder import backbone_reference

    sizes = {"n_visual": 6, "hidden": 32, "intermediate": 64}
    model, _ = build_demo_model(0, **sizes)
    # The load-balance loss is a batch statistic (fractions routed per expert): each rank computes it on
    # its half of the batch, as in every data-parallel MoE, so it is off here. Everything else -- the
    # task loss, the z-loss, and the dynamic weights (EMAs synced over ranks) -- matches one process.
    mose = MoSEConfig(r=4, num_experts=3, load_balance_coef=0.0)
    prepare_mose(model, mose, seed=0)
    args = default_training_arguments(out, max_steps=6, per_device_train_batch_size=per_device_batch,
                                      learning_rate=1e-2, seed=0, logging_steps=100,
                                      ddp_backend="gloo" if "WORLD_SIZE" in os.environ else None)
    data = generate_camer(n_samples=64, n_visual_tokens=sizes["n_visual"], seed=0)
    fit_mose(model, data, args, mose=mose, backbone=backbone_reference(0, sizes, None))


def test_two_process_ddp_equals_one_process(tmp_path):
    import torch
    from safetensors.torch import load_file

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, __file__, str(one), "8"], check=True, env=env, cwd=ROOT, timeout=300)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                    "29533", __file__, str(two), "4"], check=True, env=env, cwd=ROOT, timeout=300)
    a, b = load_file(str(one / "adapter.safetensors")), load_file(str(two / "adapter.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-5), name
    assert any((a[n].abs() > 0).any() for n in a if n.endswith(".B"))  # the adapter did train


if __name__ == "__main__":
    train(sys.argv[1], int(sys.argv[2]))
