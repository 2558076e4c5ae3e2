"""glm5_ref.devices and --device: which device "auto" picks, clear errors, the CPU path unchanged bit for bit,
the autocast paths free of dtype mixing (checked with CPU bf16 autocast), tensors made on the model's device."""

import json
import sys
import types

import pytest
import torch

from glm5_ref import devices
from glm5_ref.__main__ import DEVICES as CLI_DEVICES
from glm5_ref.__main__ import main
from glm5_ref.config import GLM5Config
from glm5_ref.model import GLM5ForCausalLM
from glm5_ref.training import run as tr

TRAIN = ["--config", "tiny", "--batch-size", "2", "--seq-len", "16", "--no-progress"]

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def machine(monkeypatch, cuda: bool, mps: bool, bf16: bool = True) -> None:
    """Pretend this machine has (or lacks) a CUDA GPU and an MPS device."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)


@pytest.mark.parametrize("cuda, mps, picked", [(False, False, "cpu"), (True, False, "cuda"), (False, True, "mps"),
                                               (True, True, "cuda")])
def test_auto_picks_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, picked):
    machine(monkeypatch, cuda, mps)
    assert devices.resolve_device() == devices.resolve_device("auto") == devices.resolve_device(None)
    assert devices.resolve_device("auto").type == picked
    assert devices.resolve_device("cpu") == torch.device("cpu")
    assert devices.available_devices()[0] == "cpu"


def test_an_explicit_device_must_be_there(monkeypatch):
    machine(monkeypatch, cuda=False, mps=False)
    for name, what in (("cuda", "no usable CUDA GPU"), ("mps", "no usable Apple MPS device")):
        with pytest.raises(ValueError, match=f"--device: {name} was asked for, but this machine has {what} "
                                             r"\(available: cpu;"):
            devices.resolve_device(name, argument="--device")
    machine(monkeypatch, cuda=True, mps=True)
    assert devices.resolve_device("cuda") == torch.device("cuda")
    assert devices.resolve_device("mps") == torch.device("mps")


@pytest.mark.parametrize("bad", ["tpu", "CUDA", "", 3, torch.device("meta")])
def test_an_unknown_device_lists_the_choices(bad):
    with pytest.raises(ValueError, match="device: expected one of auto, cpu, cuda, mps, got"):
        devices.resolve_device(bad)
    assert CLI_DEVICES == devices.DEVICES  # the CLI spells them out (it must not import torch early)


def test_autocast_is_bf16_on_gpus_and_nothing_on_the_cpu(monkeypatch):
    assert devices.autocast_dtype("cpu") is None
    with devices.autocast(torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    machine(monkeypatch, cuda=True, mps=True, bf16=True)
    assert devices.autocast_dtype("cuda") is torch.bfloat16 and devices.autocast_dtype("mps") is torch.bfloat16
    machine(monkeypatch, cuda=True, mps=False, bf16=False)  # an old GPU: fp32, no fp16 loss scaling
    assert devices.autocast_dtype("cuda") is None and devices.autocast_dtype("mps") is None
    assert "fp32" in devices.describe(torch.device("cpu"))


def test_to_cpu_and_model_device():
    state = {"a": torch.ones(2), "b": [torch.zeros(1), (torch.ones(1), 3)], "c": "x"}
    out = devices.to_cpu(state)
    assert out["c"] == "x" and isinstance(out["b"][1], tuple) and out["b"][1][1] == 3
    assert torch.equal(out["a"], state["a"]) and out["a"].device.type == "cpu"
    assert devices.model_device(torch.nn.Linear(2, 2)) == torch.device("cpu")
    assert devices.model_device(torch.nn.ReLU()) == torch.device("cpu")  # no parameters: the CPU


def test_device_cpu_training_equals_the_default_bit_for_bit(tmp_path, capsys):
    a, b = tmp_path / "default", tmp_path / "cpu"
    assert main(["train", *TRAIN, "--steps", "3", "--out", str(a)]) == 0
    assert main(["train", *TRAIN, "--steps", "3", "--out", str(b), "--device", "cpu"]) == 0
    ma, mb = (GLM5ForCausalLM.from_pretrained(p / "checkpoint") for p in (a, b))
    sa, sb = ma.state_dict(), mb.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    la, lb = (tr.read_log(p) for p in (a, b))
    assert [r.get("loss") for r in la] == [r.get("loss") for r in lb]
    assert [r.get("val_loss") for r in la] == [r.get("val_loss") for r in lb]
    info = json.loads((b / "checkpoint" / "trainer_state.json").read_text())
    assert info["device"] == "cpu" and info["args"]["device"] == "cpu"
    tensors = []

    def walk(x):
        if isinstance(x, torch.Tensor):
            tensors.append(x)
        elif isinstance(x, dict):
            [walk(v) for v in x.values()]
        elif isinstance(x, (list, tuple)):
            [walk(v) for v in x]
    walk(torch.load(b / "checkpoint" / "training_state.pt", weights_only=False))
    assert tensors and all(t.device.type == "cpu" for t in tensors)  # loads on a machine without a GPU


def test_run_device_under_data_parallel_is_the_ranks(monkeypatch):
    dp = types.SimpleNamespace(device=torch.device("cpu"), backend="gloo")
    assert tr.run_device(None, None) == tr.run_device("cpu", None) == torch.device("cpu")
    assert tr.run_device(None, dp) == tr.run_device("auto", dp) == tr.run_device("cpu", dp) == dp.device
    machine(monkeypatch, cuda=True, mps=False)
    with pytest.raises(ValueError, match="device: data parallel trains every rank on its own device"):
        tr.run_device("cuda", dp)


@pytest.mark.parametrize("argv", [
    ["train", *TRAIN, "--steps", "1", "--out", "x"],
    ["generate", "--ckpt", "x", "--prompt", "y"],
    ["bench", "decode"],
    ["recipe", "base"],
])
def test_a_bad_device_exits_2_naming_device(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv + ["--device", "tpu"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --device: invalid choice: 'tpu'" in err and "'cuda'" in err


def test_an_unavailable_device_exits_2(monkeypatch, tmp_path, capsys):
    machine(monkeypatch, cuda=False, mps=False)
    assert main(["generate", "--ckpt", str(tmp_path), "--prompt", "y", "--device", "cuda"]) == 2
    assert capsys.readouterr().err.startswith("error: --device: cuda was asked for")
    assert main(["train", *TRAIN, "--steps", "1", "--out", str(tmp_path / "r"), "--device", "mps"]) == 2
    assert "error: --device: mps was asked for" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_benchmarks_report_their_device_or_refuse_one(monkeypatch, capsys):
    from glm5_ref.apps import bench

    seen = {}
    fake = types.ModuleType("glm5_ref.apps.bench.fake_dev")

    def run(quick=False, device=torch.device("cpu")):
        seen["device"] = device
        return [{"x": 1}]

    fake.run = run
    monkeypatch.setitem(sys.modules, "glm5_ref.apps.bench.fake_dev", fake)
    monkeypatch.setitem(bench.BENCHMARKS, "fake-dev", "a test")
    assert bench.run_benchmark("fake-dev", quick=True) == [{"x": 1, "device": "cpu"}]
    assert seen["device"] == torch.device("cpu")
    machine(monkeypatch, cuda=True, mps=False)
    with pytest.raises(ValueError, match="--device cuda: benchmark 'rl-async' does not take a device"):
        bench.run_benchmark("rl-async", device="cuda")
    for name in ("decode", "train-step", "moe", "mla-decode", "dsa-decode", "spec-decode", "muon"):  # both sides
        module = __import__(f"glm5_ref.apps.bench.{name.replace('-', '_')}", fromlist=["run"])
        assert "device" in module.run.__code__.co_varnames, name


def tiny(seed: int = 0) -> GLM5ForCausalLM:
    torch.manual_seed(seed)
    return GLM5ForCausalLM(GLM5Config.preset("tiny")).eval()


@pytest.mark.parametrize("grouped", [True, False])
def test_the_autocast_paths_mix_no_dtypes(monkeypatch, grouped):
    """What runs under bf16 autocast on CUDA / MPS, run under the CPU's bf16 autocast: training forward and
    backward (dense and sparse), cached generation and speculative decoding. grouped=False: the experts' loop
    fallback, the path CUDA / MPS take with fp32 weights (torch's GPU grouped GEMM is bf16-only)."""
    from glm5_ref import moe
    from glm5_ref.speculative import speculative_generate

    if not grouped:
        monkeypatch.setattr(moe, "grouped_mm_supported", lambda *a: False)
    model = tiny()
    ids = torch.randint(0, model.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    for sparse in (False, True):
        model.set_execution(sparse=sparse, detach_indexer_input=sparse)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(ids, labels=ids, indexer_loss=True)
        out.loss.backward()
        assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.generate(ids[:, :5], 4).shape == (2, 9)
        spec, _ = speculative_generate(model, ids[:1, :5], 4, 2)
    assert spec.shape == (1, 9)


def test_generation_makes_its_tensors_on_the_models_device():
    """The prompt moves to the model's device and the caches are made there (the model is placed on
    torch.device("cpu") explicitly; every forward must see its inputs and caches on the parameters' device)."""
    from glm5_ref.speculative import speculative_generate

    model = tiny().to(torch.device("cpu"))
    where = devices.model_device(model)
    seen = []
    real = model.forward

    def spy(input_ids, *args, cache=None, **kwargs):
        seen.append(input_ids.device)
        if cache is not None:
            seen.extend(t.device for layer in cache.layers for t in (layer.latent, layer.k_rope))
        return real(input_ids, *args, cache=cache, **kwargs)

    model.forward = spy
    prompt = torch.tensor([[1, 2, 3, 4]])
    plain = model.generate(prompt, 5, temperature=0.8, seed=0)
    spec, _ = speculative_generate(model, prompt, 5, 2)
    assert seen and all(d == where for d in seen) and plain.device == spec.device == where
    assert torch.equal(model.generate(prompt.to(where), 5, temperature=0.8, seed=0), plain)


def test_evaluate_takes_the_device_from_the_model(monkeypatch):
    from glm5_ref.training import data

    model = tiny().to(torch.device("cpu"))
    asked = []
    monkeypatch.setattr(data, "model_device", lambda m: asked.append(m) or torch.device("cpu"))
    windows = torch.randint(0, 256, (3, 9), generator=torch.Generator().manual_seed(0))
    lengths = torch.ones(model.config.vocab_size, dtype=torch.long)
    result = data.evaluate(model, windows, batch_size=2, byte_lengths=lengths)
    assert asked == [model] and result["tokens"] == 3 * 8
