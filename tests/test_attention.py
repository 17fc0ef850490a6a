import logging

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from genreg import attention
from genreg.attention import (
    AttentionRecorder,
    RecordingProcessor,
    attention_layers,
    attention_map_energy,
    efficient_processor,
    recording,
    select_layers,
    use_efficient_attention,
)
from genreg.injection import CrossAttentionInjection, InjectionProcessor, injecting
from genreg.testing import tiny_sd_components, tiny_sdxl_components


@pytest.fixture(scope="module")
def sd_unet():
    return tiny_sd_components()["unet"]


@pytest.fixture(scope="module")
def xl_unet():
    return tiny_sdxl_components()["unet"]


def unet_inputs(unet, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    kwargs = {"encoder_hidden_states": torch.randn(batch, 7, unet.config.cross_attention_dim, generator=g)}
    if unet.config.addition_embed_type == "text_time":
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, 32, generator=g),
            "time_ids": torch.randn(batch, 6, generator=g),
        }
    return torch.randn(batch, 4, 16, 16, generator=g), torch.tensor(500), kwargs


def run(unet, inputs):
    sample, t, kwargs = inputs
    return unet(sample, t, **kwargs).sample


def naive_energy(q_ref, k_ref, q_cur, k_cur, scale):
    a_ref = torch.softmax(q_ref @ k_ref.transpose(-1, -2) * scale, dim=-1)
    a_cur = torch.softmax(q_cur @ k_cur.transpose(-1, -2) * scale, dim=-1)
    return (a_ref - a_cur).square().sum()


# --- naming and selecting layers -------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["sd", "sdxl"])
def test_layers_know_their_block_resolution_and_kind(which, sd_unet, xl_unet):
    unet = sd_unet if which == "sd" else xl_unet
    layers = attention_layers(unet)
    assert {layer.name for layer in layers} == set(unet.attn_processors)
    recorder = AttentionRecorder(keep="probs")
    with torch.no_grad(), recording(unet, layers, recorder), recorder.capture():
        run(unet, unet_inputs(unet))
    for layer in layers:
        (record,) = recorder.records[layer.name]
        tokens = (16 // 2**layer.level) ** 2  # a 16x16 latent
        assert record.probs.shape[-2] == tokens
        assert record.probs.shape[-1] == (7 if layer.cross else tokens)
        assert layer.cross == layer.name.endswith("attn2.processor")


def test_selection_by_kind_block_and_level(sd_unet):
    self_layers = select_layers(sd_unet)
    assert self_layers and all(not layer.cross for layer in self_layers)
    assert all(layer.cross for layer in select_layers(sd_unet, "cross"))
    assert len(select_layers(sd_unet, "all")) == len(sd_unet.attn_processors)
    up = select_layers(sd_unet, blocks=("up",))
    assert up and all(layer.name.startswith("up_blocks.") for layer in up)
    one = select_layers(sd_unet, blocks=("up_blocks.0.attentions.1",))
    assert [layer.name for layer in one] == ["up_blocks.0.attentions.1.transformer_blocks.0.attn1.processor"]
    assert select_layers(sd_unet, levels=(1,)) == self_layers  # this tiny UNet attends at level 1 only
    with pytest.raises(ValueError, match=r"no self-attention layer matches .*\(block, level\)"):
        select_layers(sd_unet, levels=(0,))
    with pytest.raises(ValueError, match="unknown attention kind"):
        select_layers(sd_unet, "both")


# --- recording -------------------------------------------------------------------------------------------------------


def test_only_selected_layers_record_and_outputs_stay_bit_identical(sd_unet):
    inputs = unet_inputs(sd_unet)
    before = dict(sd_unet.attn_processors)
    with torch.no_grad():
        plain = run(sd_unet, inputs)
    selected = select_layers(sd_unet, blocks=("up",))
    names = {layer.name for layer in selected}
    recorder = AttentionRecorder(keep=("qk", "probs"))
    with torch.no_grad(), recording(sd_unet, selected, recorder), recorder.capture():
        during = dict(sd_unet.attn_processors)
        recorded = run(sd_unet, inputs)
    assert set(recorder.records) == names
    for name, processor in during.items():
        if name in names:
            assert isinstance(processor, RecordingProcessor)
        else:
            assert processor is before[name]  # the other layers keep their own (SDPA) processor
    torch.testing.assert_close(recorded, plain, rtol=0, atol=0)
    assert all(sd_unet.attn_processors[name] is before[name] for name in before)


def test_processors_are_restored_exactly_after_an_exception(sd_unet):
    before = dict(sd_unet.attn_processors)
    with pytest.raises(RuntimeError, match="boom"):
        with recording(sd_unet, select_layers(sd_unet, "all"), AttentionRecorder()):
            run(sd_unet, unet_inputs(sd_unet))
            raise RuntimeError("boom")
    assert all(sd_unet.attn_processors[name] is processor for name, processor in before.items())


def test_a_custom_processor_is_refused_and_the_layers_already_switched_are_restored(sd_unet):
    layers = select_layers(sd_unet, "all")
    before = dict(sd_unet.attn_processors)

    class Custom:  # e.g. an IP-Adapter processor: not plain attention
        def __call__(self, attn, hidden_states, *args, **kwargs):
            return hidden_states

    custom = Custom()
    layers[-1].module.set_processor(custom)
    try:
        with pytest.raises(ValueError, match=f"{layers[-1].name} uses Custom"):
            with recording(sd_unet, layers, AttentionRecorder()):
                pass
        after = dict(sd_unet.attn_processors)
        assert after[layers[-1].name] is custom
        assert all(after[layer.name] is before[layer.name] for layer in layers[:-1])
    finally:
        layers[-1].module.set_processor(before[layers[-1].name])


def test_nothing_is_recorded_outside_capture_and_rows_pick_the_batch_rows(sd_unet):
    inputs = unet_inputs(sd_unet, batch=3)
    layers = select_layers(sd_unet)
    recorder = AttentionRecorder(keep="qk")
    with torch.no_grad(), recording(sd_unet, layers, recorder):
        run(sd_unet, inputs)
        assert recorder.take() == {}
        with recorder.capture():
            run(sd_unet, inputs)
        full = recorder.take()
        with recorder.capture(rows=slice(1, 2)):
            run(sd_unet, inputs)
        row = recorder.take()
    for name in full:
        assert row[name][0].query.shape[0] == 1
        torch.testing.assert_close(row[name][0].query, full[name][0].query[1:2], rtol=0, atol=0)
        torch.testing.assert_close(row[name][0].key, full[name][0].key[1:2], rtol=0, atol=0)


@pytest.mark.parametrize("grad", [False, True])
def test_probabilities_are_softmax_maps_kept_with_gradient_only_when_asked(sd_unet, grad):
    sample, t, kwargs = unet_inputs(sd_unet)
    sample.requires_grad_(True)
    recorder = AttentionRecorder(keep="probs", grad=grad)
    with recording(sd_unet, select_layers(sd_unet), recorder), recorder.capture():
        sd_unet(sample, t, **kwargs)
    probs = [r[0].probs for r in recorder.records.values()]
    for p in probs:
        assert p.dtype == torch.float32
        torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:-1]))
        assert p.requires_grad == grad
    if grad:
        (g,) = torch.autograd.grad(sum(p[:, :, 0, 0].sum() for p in probs), sample)
        assert g.abs().sum() > 0


def test_recorder_refuses_unknown_things_to_keep():
    with pytest.raises(ValueError, match="keep must be"):
        AttentionRecorder(keep="maps")


# --- efficient processors --------------------------------------------------------------------------------------------


def test_xformers_falls_back_to_sdpa_with_one_log_line(monkeypatch, caplog):
    monkeypatch.setattr(attention, "_logged", set())
    with caplog.at_level(logging.INFO, logger="genreg.attention"):
        first = efficient_processor("cpu", "xformers")
        second = efficient_processor("cpu", "xformers")
        auto = efficient_processor("cpu")
    assert all(isinstance(p, AttnProcessor2_0) for p in (first, second, auto))
    messages = [r.getMessage() for r in caplog.records if r.name == "genreg.attention"]
    assert len(messages) == 1 and "using PyTorch SDPA attention" in messages[0]
    with pytest.raises(ValueError, match="unknown attention backend"):
        efficient_processor("cpu", "flash")


def test_use_efficient_attention_replaces_plain_processors():
    unet = tiny_sd_components()["unet"]
    unet.set_attn_processor(AttnProcessor())
    assert use_efficient_attention(unet) == "AttnProcessor2_0"
    assert all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())


# --- the chunked energy ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 7, 50, 1000])
def test_chunked_energy_equals_the_materialised_maps_value_and_gradient(chunk_size):
    g = torch.Generator().manual_seed(0)
    shape = (2, 3, 50, 8)  # rows, heads, tokens, head dim
    q_ref, k_ref = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    q_cur = q_ref + 0.5 * torch.randn(shape, generator=g)
    k_cur = k_ref + 0.5 * torch.randn(shape, generator=g)
    tensors = [x.double().requires_grad_() for x in (q_ref, k_ref, q_cur, k_cur)]
    expected = naive_energy(*tensors, 8**-0.5)
    expected_grads = torch.autograd.grad(expected, tensors)
    tensors = [x.detach().float().requires_grad_() for x in tensors]
    energy = attention_map_energy(*tensors, 8**-0.5, chunk_size=chunk_size)
    grads = torch.autograd.grad(energy, tensors)
    assert energy.dtype == torch.float32
    torch.testing.assert_close(energy.double(), expected, rtol=1e-5, atol=0)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-7)


def test_chunked_energy_saves_only_its_inputs_for_backward():
    """What autograd keeps between forward and backward: the materialised path keeps maps (heads x L x L), the
    chunked path keeps only the query/key inputs of each chunk (a chunk's maps are rebuilt in backward)."""
    heads, length, dim = 4, 256, 8
    g = torch.Generator().manual_seed(0)
    q_ref, k_ref = torch.randn(2, heads, length, dim, generator=g)
    q_cur, k_cur = (x + 0.1 for x in (q_ref, k_ref))

    def saved_elements(fn):
        sizes = {}

        def pack(t):
            sizes[t.data_ptr(), t.shape] = t.numel()
            return t

        q, k = q_cur.clone().requires_grad_(), k_cur.clone().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(q_ref, k_ref, q, k, dim**-0.5)
        return sum(sizes.values())

    naive = saved_elements(naive_energy)
    chunked = saved_elements(lambda *a: attention_map_energy(*a, chunk_size=32))
    assert naive >= 2 * heads * length * length  # at least both probability maps
    assert chunked <= 4 * heads * length * dim  # the four query/key tensors, nothing of size L x L
    print(f"saved for backward: materialised {naive} elements, chunked {chunked} ({naive / chunked:.0f}x fewer)")


def test_chunked_energy_checks_its_inputs():
    q = torch.randn(1, 4, 8)
    with pytest.raises(ValueError, match="differ in shape"):
        attention_map_energy(q, q, q[:, :2], q, 1.0)
    with pytest.raises(ValueError, match="chunk_size"):
        attention_map_energy(q, q, q, q, 1.0, chunk_size=0)


@pytest.mark.slow
def test_chunked_energy_peak_memory_is_far_below_the_materialised_one():
    """Measured peak (resident set of fresh processes) at 8 heads, HW 1024; see scripts/bench_attention_energy.py."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "scripts" / "bench_attention_energy.py"
    args = [sys.executable, str(script), "--hw", "1024", "--chunk", "64", "--device", "cpu"]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    print(out)
    ratio = float(out.split("ratio ")[1].split("x")[0])
    assert ratio >= 4, out


# --- injection -------------------------------------------------------------------------------------------------------


def test_injection_replaces_the_target_rows_maps_except_fresh_tokens(sd_unet):
    """Row 1 takes row 0's cross-attention maps for tokens 0-4 and keeps its own for 5-6: row 1 changes, row 0 does
    not; all-fresh or inactive injection changes nothing."""
    inputs = unet_inputs(sd_unet, batch=2)
    with torch.no_grad():
        plain = run(sd_unet, inputs)
    columns, fresh = torch.arange(7), torch.tensor([False] * 5 + [True] * 2)
    with torch.no_grad(), injecting(sd_unet, CrossAttentionInjection([0], [1], columns, torch.ones(7, dtype=bool))):
        torch.testing.assert_close(run(sd_unet, inputs), plain, rtol=1e-5, atol=1e-5)
    injection = CrossAttentionInjection([0], [1], columns, fresh)
    with torch.no_grad(), injecting(sd_unet, injection):
        injected = run(sd_unet, inputs)
    torch.testing.assert_close(injected[0], plain[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(injected[1], plain[1], atol=1e-4)
    injection.active = False
    with torch.no_grad(), injecting(sd_unet, injection):
        torch.testing.assert_close(run(sd_unet, inputs), plain, rtol=1e-5, atol=1e-5)


def test_injected_maps_are_the_sources_columns(sd_unet):
    """One layer's output is that of attention whose target maps hold the source's columns (shuffled by ``columns``)
    on the injected tokens and their own on the fresh ones."""
    layer = select_layers(sd_unet, "cross")[0]
    attn = layer.module
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 16, attn.to_q.in_features, generator=g)
    text = torch.randn(2, 7, attn.to_k.in_features, generator=g)
    columns = torch.tensor([0, 2, 1, 3, 4, 5, 6])
    fresh = torch.tensor([False, False, False, True, True, True, True])
    for normalize in (False, True):
        injection = CrossAttentionInjection([0], [1], columns, fresh, normalize=normalize)
        with torch.no_grad():
            out = InjectionProcessor(injection)(attn, hidden, text)
            q = attn.to_q(hidden).view(2, 16, attn.heads, -1).transpose(1, 2)
            k = attn.to_k(text).view(2, 7, attn.heads, -1).transpose(1, 2)
            v = attn.to_v(text).view(2, 7, attn.heads, -1).transpose(1, 2)
            probs = (q @ k.transpose(-1, -2) * attn.scale).softmax(-1)
            probs[1] = torch.where(fresh, probs[1], probs[0][..., columns])
            if normalize:
                probs[1] = probs[1] / probs[1].sum(-1, keepdim=True)
            expected = attn.to_out[0]((probs @ v).transpose(1, 2).reshape(2, 16, -1))
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_injection_refuses_unpaired_rows_and_mismatched_tokens(sd_unet):
    with pytest.raises(ValueError, match="pair them"):
        CrossAttentionInjection([0, 1], [2], torch.arange(7), torch.zeros(7, dtype=bool))
    injection = CrossAttentionInjection([0], [1], torch.arange(5), torch.zeros(5, dtype=bool))
    with torch.no_grad(), injecting(sd_unet, injection), pytest.raises(ValueError, match="maps 5 tokens"):
        run(sd_unet, unet_inputs(sd_unet))
