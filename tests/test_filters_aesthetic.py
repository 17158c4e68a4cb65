"""The LAION aesthetic predictor v2: hand-computed score with planted weights, a float64 reference
with random weights, loading the original key names from .pth and .safetensors."""

import numpy as np
import pytest
import torch

from filters.aesthetic import AestheticMLP, aesthetic_input_size, aesthetic_scores, load_aesthetic_mlp


def planted_state(input_size=4):
    """Weights that route x[0] through one unit of every layer: score = ((x0 + 0.5) * 2) * 1 * 1 + 5."""
    mlp = AestheticMLP(input_size)
    state = {k: torch.zeros_like(v) for k, v in mlp.state_dict().items()}
    state["layers.0.weight"][0, 0] = 1.0
    state["layers.0.bias"][0] = 0.5
    state["layers.2.weight"][0, 0] = 2.0
    state["layers.4.weight"][0, 0] = 1.0
    state["layers.6.weight"][0, 0] = 1.0
    state["layers.7.weight"][0, 0] = 1.0
    state["layers.7.bias"][0] = 5.0
    return state


def test_original_layout_keys():
    keys = set(AestheticMLP(768).state_dict())
    assert keys == {f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")}
    widths = [m.out_features for m in AestheticMLP(768).layers if isinstance(m, torch.nn.Linear)]
    assert widths == [1024, 128, 64, 16, 1]
    dropouts = [m.p for m in AestheticMLP(768).layers if isinstance(m, torch.nn.Dropout)]
    assert dropouts == [0.2, 0.2, 0.1]


def test_hand_computed_score_from_pth(tmp_path):
    path = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(planted_state(), path)
    mlp = load_aesthetic_mlp(str(path))
    # [3, 4, 0, 0] normalises to [0.6, 0.8, 0, 0]: ((0.6 + 0.5) * 2) + 5 = 7.2; dropout is off in eval
    x = np.array([[3.0, 4.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0]], np.float32)
    np.testing.assert_allclose(aesthetic_scores(mlp, x), [7.2, 6.0], atol=1e-6)
    np.testing.assert_allclose(aesthetic_scores(mlp, x), aesthetic_scores(mlp, x))  # deterministic
    assert aesthetic_input_size(str(path)) == 4


def test_safetensors_and_prefixed_keys(tmp_path):
    # x = e0: ((1 + 0.5) * 2) + 5 = 8
    from safetensors.torch import save_file

    save_file(planted_state(), str(tmp_path / "w.safetensors"))
    assert aesthetic_scores(load_aesthetic_mlp(str(tmp_path / "w.safetensors")), np.eye(4)[:1]) == pytest.approx([8.0])
    torch.save({"state_dict": {f"model.{k}": v for k, v in planted_state().items()}}, tmp_path / "lightning.ckpt")
    assert aesthetic_scores(load_aesthetic_mlp(str(tmp_path / "lightning.ckpt")), np.eye(4)[:1]) == pytest.approx([8.0])


def test_random_weights_match_float64_reference(tmp_path):
    torch.manual_seed(0)
    mlp = AestheticMLP(16)
    torch.save(mlp.state_dict(), tmp_path / "w.pth")
    loaded = load_aesthetic_mlp(str(tmp_path / "w.pth"))
    x = np.random.default_rng(0).normal(size=(5, 16))
    ref = x / np.linalg.norm(x, axis=1, keepdims=True)
    for i in (0, 2, 4, 6, 7):  # affine chain, no activation (the released model's ReLUs are commented out)
        ref = ref @ mlp.state_dict()[f"layers.{i}.weight"].double().numpy().T + mlp.state_dict()[f"layers.{i}.bias"].double().numpy()
    np.testing.assert_allclose(aesthetic_scores(loaded, x), ref[:, 0], rtol=1e-4, atol=1e-5)


def test_relu_variant_recognised(tmp_path):
    torch.manual_seed(1)
    mlp = AestheticMLP(8, relu=True)
    assert {k.split(".")[1] for k in mlp.state_dict()} == {"0", "3", "6", "9", "11"}
    torch.save(mlp.state_dict(), tmp_path / "relu.pth")
    x = np.random.default_rng(1).normal(size=(3, 8)).astype(np.float32)
    with torch.no_grad():
        expected = mlp.eval()(torch.from_numpy(x / np.linalg.norm(x, axis=1, keepdims=True)))[:, 0].numpy()
    np.testing.assert_allclose(aesthetic_scores(load_aesthetic_mlp(str(tmp_path / "relu.pth")), x), expected, rtol=1e-5)


def test_bad_weights_are_named(tmp_path):
    torch.save({"fc.weight": torch.zeros(1, 4)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="other.pth.*layers"):
        load_aesthetic_mlp(str(tmp_path / "other.pth"))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_aesthetic_mlp(str(tmp_path / "missing.pth"))
    torch.save(planted_state(), tmp_path / "w.pth")
    with pytest.raises(ValueError, match=r"\(n, 4\)"):
        aesthetic_scores(load_aesthetic_mlp(str(tmp_path / "w.pth")), np.zeros((2, 768)))
