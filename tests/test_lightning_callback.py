"""The Lightning callback `fabricq.callbacks.GPTQ` in a real `L.Trainer` on CPU: at the end of fit
it quantizes the LightningModule's causal LM to exactly the command line's checkpoint for the same
calibration tokens (float64 Hessians), in one process and in two DDP processes (gloo); tensor and
dict batches, padding left out; bad input is one FabricqError and leaves the weights unchanged."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import lightning as L
import pytest
import torch
from cli_reference import API_OVERRIDES, assert_same_tensors
from conftest import REPO_ROOT
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

from fabricq.errors import FabricqError


class CausalLM(L.LightningModule):
    def __init__(self, path):
        super().__init__()
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    def training_step(self, batch, index):
        ids = batch["input_ids"] if isinstance(batch, dict) else batch
        return self.model(input_ids=ids, labels=ids).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)  # fit runs; the weights stay the CLI's


def make_trainer(callback, devices=1, **kwargs):
    return L.Trainer(max_steps=1, accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                     callbacks=[callback], enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, **kwargs)


class Recorder:
    """A Lightning logger that keeps what it is given."""

    def __new__(cls):
        from lightning.pytorch.loggers.logger import DummyLogger

        logger = DummyLogger()
        logger.metrics = {}
        logger.log_metrics = lambda metrics, step=None: logger.metrics.update(metrics)
        return logger


def test_fit_end_quantizes_to_the_cli_checkpoint(cli_w4_reference, stories260k_path, tmp_path):
    from fabricq.callbacks import GPTQ
    from fabricq.checkpoint.compressed_tensors import load_dequantized_state_dict

    windows, expected = cli_w4_reference
    module = CausalLM(stories260k_path)
    logger = Recorder()
    callback = GPTQ(num_samples=13, seq_len=64, output_dir=tmp_path / "w4", overrides=API_OVERRIDES)
    make_trainer(callback, logger=logger).fit(module, DataLoader(list(windows), batch_size=3))
    assert_same_tensors(load_file(tmp_path / "w4" / "model.safetensors"), expected)
    # The LightningModule now holds the dequantized weights the checkpoint stores.
    dequantized = load_dequantized_state_dict(tmp_path / "w4")
    for name, module_ in module.model.named_modules():
        if isinstance(module_, nn.Linear) and ".layers." in name:
            assert torch.equal(module_.weight, dequantized[f"{name}.weight"].float()), name
    assert {f"gptq/loss_layer_{k}" for k in range(5)} | {"gptq/wall_s"} <= set(logger.metrics)
    losses = callback.result.stats
    assert logger.metrics["gptq/loss_layer_1"] == pytest.approx(
        sum(s["loss"] for n, s in losses.items() if ".layers.1." in n))


def test_dict_batches_with_padding_give_the_tensor_batches_weights(cli_w4_reference, stories260k_path):
    """Batches as dicts whose rows end in padding (attention_mask 0, arbitrary tokens): the
    padding is left out, so the windows (and weights) are those of the unpadded tokens."""
    from fabricq.callbacks import GPTQ

    windows, _ = cli_w4_reference
    windows = windows[:6]
    g = torch.Generator().manual_seed(0)
    padded = torch.cat([windows, torch.randint(3, 500, (6, 16), generator=g)], dim=1)
    mask = torch.cat([torch.ones(6, 64), torch.zeros(6, 16)], dim=1).long()
    rows = [{"input_ids": i, "attention_mask": m} for i, m in zip(padded, mask)]
    results = []
    for loader in (DataLoader(rows, batch_size=2), DataLoader(list(windows), batch_size=2)):
        callback = GPTQ(num_samples=6, seq_len=64, overrides=API_OVERRIDES, when="train_end", model_attr="model")
        make_trainer(callback, logger=False).fit(CausalLM(stories260k_path), loader)
        results.append(callback.result)
    assert results[0].report["calibration"] == results[1].report["calibration"]
    assert all(torch.equal(qw.dequantize(), results[1].quantized[n].dequantize()) for n, qw in results[0].quantized.items())


class NoDecoder(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = nn.Sequential(nn.Linear(4, 4))

    def training_step(self, batch, index):
        return self.model(batch.float()).sum()


@pytest.mark.parametrize("callback_args, data, message", [
    ({"model_attr": "lm"}, None, "model_attr='lm': the CausalLM has no such attribute"),
    ({"num_samples": 50}, None, "gave 832 tokens, fewer than num_samples × seq_len = 50 × 64 = 3200: lower"),
    ({}, [torch.rand(2, 64)], "batch 0 is a torch.float32 tensor"),
    ({}, [{"ids": torch.ones(2, 64, dtype=torch.long)}], "batch 0 is a dict without input_ids"),
    ({}, None, "the trainer has no train dataloader"),
])
def test_bad_input_is_one_error_and_the_weights_stay(cli_w4_reference, stories260k_path, callback_args, data, message):
    from fabricq.callbacks import GPTQ

    windows, _ = cli_w4_reference
    module = CausalLM(stories260k_path)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    loader = data if data is not None else list(windows[:16].split(2))
    if "no train dataloader" in message:
        loader = None
    callback = GPTQ(**{"num_samples": 4, "seq_len": 64, "dataloader": loader, **callback_args})
    with pytest.raises(FabricqError, match=message):
        callback.quantize(make_trainer(callback, logger=False), module)  # a trainer that did not fit
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_bad_arguments_and_modules_are_refused():
    from fabricq.callbacks import GPTQ

    with pytest.raises(FabricqError, match="recipe=nope: there is no such recipe"):
        GPTQ(recipe="nope")
    with pytest.raises(FabricqError, match="unknown setting quant.bitz"):
        GPTQ(overrides=["quant.bitz=2"])
    with pytest.raises(FabricqError, match="when must be one of"):
        GPTQ(when="validation_end")
    callback = GPTQ(num_samples=1, seq_len=4, dataloader=[torch.ones(1, 8, dtype=torch.long)])
    with pytest.raises(FabricqError, match="has no decoder layers"):
        callback.quantize(make_trainer(callback, logger=False), NoDecoder())


DDP_SCRIPT = """
import sys
import torch
from torch.utils.data import DataLoader
from fabricq.callbacks import GPTQ
from test_lightning_callback import CausalLM, make_trainer
windows = torch.load(sys.argv[1])
callback = GPTQ(num_samples=13, seq_len=64, output_dir=sys.argv[2], overrides=%r)
make_trainer(callback, devices=2, logger=False).fit(CausalLM(sys.argv[3]), DataLoader(list(windows), batch_size=2))
# Every rank ends with the same weights: rank 1 writes its own for the test to compare.
if callback.result.ranks.global_rank == 1:
    torch.save({n: p for n, p in callback.result.model.state_dict().items()}, sys.argv[4])
"""


def test_two_ddp_processes_quantize_to_the_cli_checkpoint(cli_w4_reference, stories260k_path, tmp_path):
    """Trainer(strategy="ddp", devices=2): the DistributedSampler gives each rank every other
    window; each calibrates its own, the Hessians are reduced over the Trainer's process group."""
    from fabricq.checkpoint.compressed_tensors import load_dequantized_state_dict

    windows, expected = cli_w4_reference
    (tmp_path / "ddp.py").write_text(textwrap.dedent(DDP_SCRIPT % (API_OVERRIDES,)))
    torch.save(windows, tmp_path / "windows.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{REPO_ROOT / 'tests'}"}
    done = subprocess.run([sys.executable, str(tmp_path / "ddp.py"), str(tmp_path / "windows.pt"), str(tmp_path / "w4"),
                           str(stories260k_path), str(tmp_path / "rank1.pt")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_tensors(load_file(tmp_path / "w4" / "model.safetensors"), expected)
    rank1 = torch.load(tmp_path / "rank1.pt")
    dequantized = load_dequantized_state_dict(tmp_path / "w4")
    name = "model.layers.4.self_attn.o_proj.weight"
    assert torch.equal(rank1[name], dequantized[name].float())
