"""Exporting a training checkpoint as a shippable model: weights kept, optimizer state dropped."""
import torch

from n2n_core import Adam, build_model, load_checkpoint, save_checkpoint
from pipeline.assets import export_model


def test_export_keeps_weights_and_config_drops_optimizer(tmp_path):
    model = build_model("unet", depth=2, width=4, generator=torch.Generator().manual_seed(3))
    optimizer = Adam(model.parameters())
    for p in model.parameters():
        p.grad.normal_()
    optimizer.step()
    save_checkpoint(tmp_path / "train.n2n", model, optimizer, step=7, config={"noise": "gaussian:0-50"})
    exported = export_model(tmp_path / "train.n2n", tmp_path / "model.n2n", note="25.1 dB")
    loaded = load_checkpoint(exported)
    assert loaded.optimizer_state is None and loaded.step == 7 and loaded.config == {"noise": "gaussian:0-50"}
    assert loaded.extra == {"exported_from_step": 7, "note": "25.1 dB"}
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    assert exported.stat().st_size < (tmp_path / "train.n2n").stat().st_size
