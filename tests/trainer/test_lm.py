import pytest
import torch

from trainer.errors import HSAEError
from trainer.lm import DEFAULT_MODEL, load_language_model


def test_bundled_model_loads_offline(lm):
    assert lm.name == DEFAULT_MODEL
    assert lm.n_layers == 30 and lm.d_model == 576
    assert lm.hook_name == "blocks.6.hook_resid_post"


def test_residual_equals_full_forward_hidden_state(lm):
    ids = torch.tensor(lm.tokenizer(["The quick brown fox jumps over the lazy dog"] * 2,
                                    add_special_tokens=False)["input_ids"])
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # right padding must not change the real tokens
    resid = lm.residual(ids, mask)
    assert resid.shape == (2, ids.shape[1], 576) and resid.dtype == torch.float32
    with torch.inference_mode():
        full = lm.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    # hidden_states[0] is the embedding output, so block L's output is hidden_states[L + 1].
    torch.testing.assert_close(resid[0], full[lm.layer + 1][0], rtol=0, atol=0)
    torch.testing.assert_close(resid[1, :5], full[lm.layer + 1][1, :5], rtol=0, atol=0)
    assert not torch.allclose(resid[0], full[lm.layer + 2][0])  # and not some other layer


def test_forward_stops_after_hooked_layer(lm):
    calls = []
    later = lm.model.model.layers[lm.layer + 1]
    handle = later.register_forward_hook(lambda *a: calls.append(1))
    try:
        lm.residual(torch.tensor([[1, 2, 3]]))
    finally:
        handle.remove()
    assert calls == []


def test_ce_loss_zero_ablation_is_worse_than_clean(lm):
    ids = torch.tensor([lm.tokenizer("The capital of France is Paris. The capital of Germany is Berlin.",
                                     add_special_tokens=False)["input_ids"]])
    clean = lm.ce_loss(ids)
    ablated = lm.ce_loss(ids, replace_fn=torch.zeros_like)
    identity = lm.ce_loss(ids, replace_fn=lambda h: h)
    assert clean < ablated
    assert identity == pytest.approx(clean, abs=1e-5)


@pytest.mark.parametrize("layer", [-1, 30, 99])
def test_layer_out_of_range(layer):
    with pytest.raises(HSAEError, match=r"layer .* out of range .* 0\.\.29"):
        load_language_model(layer=layer, device="cpu")


def test_unknown_model_path_or_name():
    with pytest.raises(HSAEError, match="cannot load model '/nonexistent/model'"):
        load_language_model("/nonexistent/model", device="cpu")
    with pytest.raises(HSAEError, match="cannot load model 'no-such-org/no-such-model'"):
        load_language_model("no-such-org/no-such-model", device="cpu")


def test_unknown_device():
    with pytest.raises(HSAEError, match="unknown device"):
        load_language_model(device="tpu")
