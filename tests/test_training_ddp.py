"""``mosear-train`` under ``torchrun --nproc_per_node 2`` (gloo, CPU) fits the same adapter as one process
with the same global batch: with DDP, and with FSDP2 through the Trainer (accelerate). The load-balance
loss is on (a large coefficient): its statistics are all-reduced over the ranks (``MoSEAdapter._regularizers``),
so it is the global batch's, as in one process. Also runnable as the worker itself:
``python tests/test_training_ddp.py OUT PER_DEVICE_BATCH {ddp,fsdp,fsdp-as-is,regularizers,hf}`` (``hf``: a
Hugging Face model folder, ``--model DIR --train-data ROWS`` after the mode).

FSDP on the CPU: accelerate 1.15 enables FSDP only for multi-accelerator runs (``AcceleratorState``
switches to ``DistributedType.FSDP`` in its MULTI_GPU/XPU/NPU/... branch); a ``use_cpu`` gloo run is
MULTI_CPU and the Trainer's FSDP plugin is dropped without a word (the run would be DDP; ``MoSETrainer``
refuses it). The worker lifts that gate (:func:`lift_accelerate_cpu_gate`) so accelerate takes its FSDP2
path on the CPU: ``fully_shard`` on a gloo device mesh, sharded (DTensor) parameters, the full state
dict gathered for the save -- the code path a GPU run takes.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ["--synthetic-samples", "64", "--backbone-sizes", '{"n_visual": 6, "hidden": 32, "intermediate": 64}',
            "--rank", "4", "--num-experts", "3", "--max-steps", "6", "--learning-rate", "1e-2", "--seed", "0",
            "--load-balance-coef", "0.5", "--logging-steps", "100", "--progress", "false", "--ar", "false"]


def lift_accelerate_cpu_gate() -> None:
    """Let accelerate run its FSDP path in a CPU (gloo) run: a state that got an FSDP plugin but came out
    MULTI_CPU becomes FSDP (in both of accelerate's shared states, which copy each other)."""
    import accelerate.state as state
    from accelerate.utils import DistributedType

    original = state.AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    state.AcceleratorState.__init__ = init


def record_wrapping(path: str) -> None:
    """Write (rank 0) how the Trainer wrapped the model: FSDP enabled, and whether parameters are sharded."""
    from mosear_fast.training.trainer import MoSETrainer

    train = MoSETrainer.train

    def recording_train(self, *args, **kwargs):
        result = train(self, *args, **kwargs)
        if self.args.process_index == 0:
            from torch.distributed.tensor import DTensor

            sharded = [n for n, p in self.model.named_parameters() if isinstance(p, DTensor)]
            record = {"fsdp": self.is_fsdp_enabled, "wrapper": type(self.model_wrapped).__name__,
                      "sharded": len(sharded), "params": len(list(self.model.parameters()))}
            Path(path).write_text(json.dumps(record))
        return result

    MoSETrainer.train = recording_train


def run_training(out: Path, per_device_batch: int, mode: str, world: int, *extra: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable] if world == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world)]
    subprocess.run([*launcher, __file__, str(out), str(per_device_batch), mode, *extra], check=True, env=env,
                   cwd=ROOT, timeout=300)
    from safetensors.torch import load_file

    return load_file(str(out / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def one_process_adapter(tmp_path_factory):
    return run_training(tmp_path_factory.mktemp("one") / "out", 8, "ddp", world=1)


def assert_same_adapter(one: dict, two: dict) -> None:
    import torch

    assert one.keys() == two.keys()
    for name in one:
        assert torch.allclose(one[name], two[name], rtol=1e-4, atol=1e-5), (name, (one[name] - two[name]).abs().max())
    assert any((one[n].abs() > 0).any() for n in one if n.endswith(".B"))  # the adapter did train


def test_two_process_ddp_equals_one_process(tmp_path, one_process_adapter):
    assert_same_adapter(one_process_adapter, run_training(tmp_path / "out", 4, "ddp", world=2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # published; no staging folder left


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp") / "out"
    return out, run_training(out, 4, "fsdp", 2, "--save-steps", "3")  # checkpoint-3 for the resume test


def test_two_process_fsdp_equals_one_process(fsdp_run, one_process_adapter):
    out, two = fsdp_run
    wrapping = json.loads(out.with_name("out.wrapping.json").read_text())
    assert wrapping["fsdp"] and wrapping["sharded"] == wrapping["params"] > 0, wrapping  # really FSDP2
    assert_same_adapter(one_process_adapter, two)


@pytest.mark.slow
def test_fsdp_run_resumed_from_a_checkpoint_equals_the_uninterrupted_run(tmp_path, fsdp_run):
    # The checkpoint holds full adapter tensors; resuming loads them into FSDP2's sharded parameters.
    out, uninterrupted = fsdp_run
    resumed = run_training(tmp_path / "out", 4, "fsdp", 2, "--save-steps", "3", "--resume",
                           str(out / "checkpoint-3"))
    assert json.loads((tmp_path / "out" / "trainer_state.json").read_text())["global_step"] == 6
    for name in uninterrupted:
        assert torch_equal(uninterrupted[name], resumed[name]), name


@pytest.mark.slow
def test_two_process_ddp_on_a_hugging_face_model_equals_one_process(tmp_path):
    from mosear_fast.training.example_model import write_example

    example = write_example(tmp_path / "example")  # every row has the same length: the ranks' token counts agree
    model = ["--model", str(example["model"]), "--train-data", str(example["train"])]
    one = run_training(tmp_path / "one", 8, "hf", 1, *model)
    assert_same_adapter(one, run_training(tmp_path / "two", 4, "hf", 2, *model))


def torch_equal(a, b) -> bool:
    import torch

    return torch.allclose(a, b, rtol=1e-6, atol=1e-7)


def regularizers_across_ranks(out: str) -> None:
    """Worker: the router regularizers of a batch split unevenly over the ranks (rank 1 has no unit of
    modality 0) against one process on the whole batch: values on every rank, and the gradient as DDP
    averages it (sum over ranks / W)."""
    import copy

    import torch
    import torch.distributed as dist

    from mosear_fast.mose_layer import MoSEAdapter

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    adapter = MoSEAdapter(8, 6, num_modalities=3, adapted=(0, 1), r=2, scale=1.0, num_experts=3, top_k=2,
                          load_balance_coef=1.0, z_loss_coef=1.0).train()
    x, base = torch.randn(30, 8), torch.randn(30, 6)
    modality = torch.tensor([0] * 6 + [1] * 4 + [1] * 17 + [-1] * 3)
    mine = slice(0, 10) if rank == 0 else slice(10, 30)

    def step(module, *part):
        module.zero_grad()
        module(*part)
        regs = module.last_regularizers
        (regs["load_balance"] + regs["z_loss"]).backward()
        grads = [p.grad.clone() for p in (module.router_weight, module.router_bias)]
        return {k: float(v) for k, v in regs.items()}, grads

    reference = copy.deepcopy(adapter)
    reference.load_balance_coef = reference.z_loss_coef = 0.0  # no all_reduce: one process, whole batch
    want_values, want_grads = step(reference, x, base, modality)
    values, grads = step(adapter, x[mine], base[mine], modality[mine])
    for g in grads:
        dist.all_reduce(g)
        g /= world
    errors = {"value_" + k: abs(values[k] - want_values[k]) for k in values}
    errors.update({f"grad_{i}": float((g - w).abs().max()) for i, (g, w) in enumerate(zip(grads, want_grads))})
    errors["grad_scale"] = float(want_grads[0].abs().max())
    Path(f"{out}.rank{rank}.json").write_text(json.dumps(errors))
    dist.destroy_process_group()


def test_fsdp_that_accelerate_drops_on_the_cpu_is_refused(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          __file__, str(tmp_path / "out"), "4", "fsdp-as-is"], env=env, cwd=ROOT, timeout=300,
                         capture_output=True, text=True)
    assert run.returncode != 0
    lines = [line for line in run.stderr.splitlines() if line.startswith("mosear-train: error:")]
    assert len(lines) == 2, run.stderr[-3000:]  # one per rank
    assert all("fsdp: accelerate did not enable FSDP for this run (MULTI_CPU)" in line for line in lines)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written


def test_regularizers_of_a_split_batch_equal_one_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
                    str(tmp_path / "r"), "0", "regularizers"], check=True, env=env, cwd=ROOT, timeout=300)
    for rank in (0, 1):
        errors = json.loads((tmp_path / f"r.rank{rank}.json").read_text())
        assert errors.pop("grad_scale") > 1e-3  # the gradient is not trivially zero
        assert max(errors.values()) < 1e-6, (rank, errors)


if __name__ == "__main__":
    out, per_device_batch, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    if mode == "regularizers":
        sys.exit(regularizers_across_ranks(out))
    from mosear_fast.training import train_cli

    extra = ["--fsdp", "true"] if mode.startswith("fsdp") else []
    if mode == "fsdp":
        lift_accelerate_cpu_gate()
        record_wrapping(f"{out}.wrapping.json")
    settings = SETTINGS[4:] if mode == "hf" else SETTINGS  # (the built-in model's data and sizes)
    sys.exit(train_cli.main(["--output-dir", out, "--batch-size", per_device_batch, *settings, *extra,
                             *sys.argv[4:]]))
