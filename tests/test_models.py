"""Registry-parametrised model tests on tiny inputs."""

from __future__ import annotations

import pytest
import torch

from perception.models import get_model, list_models, load, register_model, save
from perception.models.io import ModelCard
from perception.models.registry import model_config
from perception.models.pretrained import load_encoder as load_vgg16_bn_encoder

# Table 1 of the paper (K = 11) and the SegNet figure from section 3.
PAPER_PARAMS = {
    "segnet": 29.5e6,
    "bayesian_segnet": 29.5e6,
    "segnet_basic": 1.425e6,
    "bayesian_segnet_basic": 1.425e6,
    "segnet_basic_encoder_addition": 1.425e6,
    "segnet_basic_single_channel_decoder": 0.625e6,
    "bilinear_interpolation": 0.625e6,
    "fcn_basic": 0.65e6,
    "fcn_basic_no_addition": 0.65e6,
    "fcn_basic_no_dim_reduction": 1.625e6,
    "fcn_basic_no_addition_no_dim_reduction": 1.625e6,
}


def test_registry_lists_every_paper_variant():
    assert set(PAPER_PARAMS) <= set(list_models())


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_parameter_count_within_3_percent_of_paper(name):
    n = sum(p.numel() for p in get_model(name, num_classes=11).parameters())
    assert abs(n - PAPER_PARAMS[name]) / PAPER_PARAMS[name] < 0.03, f"{name}: {n}"


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("hw", [(32, 32), (45, 61)])
def test_forward_backward_finite(name, hw):
    model = get_model(name, num_classes=4)
    x = torch.randn(2, 3, *hw)
    out = model(x)
    assert out.shape == (2, 4, *hw)
    out.square().mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), pname
    assert torch.isfinite(out).all()


def test_reference_size_pyramid():
    """360x480 pools to 180x240, 90x120, 45x60, 23x30, 12x15 (ceil mode), and comes back."""
    model = get_model("segnet", num_classes=3).eval()
    sizes = []
    x = torch.randn(1, 3, 360, 480)
    with torch.no_grad():
        for enc in model.encoders:
            x, _ = enc(x)
            sizes.append(tuple(x.shape[-2:]))
    assert sizes == [(180, 240), (90, 120), (45, 60), (23, 30), (12, 15)]


def test_registry_rejects_duplicates_and_unknown_names():
    with pytest.raises(ValueError, match="already registered"):
        register_model("segnet")(lambda *, num_classes: None)
    with pytest.raises(ValueError, match="unknown model"):
        get_model("segnet_nope", num_classes=3)
    with pytest.raises(TypeError, match="keyword-only"):
        register_model("positional_builder_for_test")(lambda num_classes: None)


def test_no_accidentally_shared_modules():
    model = get_model("segnet", num_classes=3)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    # 13 encoder + 13 decoder convs (the last is the classifier, conv1_1_D)
    assert len({id(m.weight) for m in convs}) == len(convs) == 26


def test_bayesian_models_have_dropout_and_mc_prediction():
    from perception.models import has_dropout, mc_dropout_predict

    assert not has_dropout(get_model("segnet_basic", num_classes=3))
    model = get_model("bayesian_segnet_basic", num_classes=3)
    assert sum(isinstance(m, torch.nn.Dropout) for m in model.modules()) == 4
    assert sum(isinstance(m, torch.nn.Dropout) for m in get_model("bayesian_segnet", num_classes=3).modules()) == 6
    x = torch.randn(1, 3, 32, 48)
    pred = mc_dropout_predict(model, x, samples=6)
    assert pred.probs.shape == (1, 3, 32, 48)
    torch.testing.assert_close(pred.probs.sum(1), torch.ones(1, 32, 48))
    assert pred.labels.shape == pred.uncertainty.shape == (1, 32, 48)
    assert (pred.uncertainty > 0).any(), "dropout sampling produced no variance"
    # BN stayed in eval mode during sampling: same seed, same result.
    a = mc_dropout_predict(model, x, samples=3, generator_seed=1)
    b = mc_dropout_predict(model, x, samples=3, generator_seed=1)
    assert torch.equal(a.probs, b.probs)
    # A model without dropout is refused rather than silently giving zero uncertainty.
    with pytest.raises(ValueError, match="no dropout"):
        mc_dropout_predict(get_model("segnet_basic", num_classes=3), x, samples=2)


def test_mc_uncertainty_matches_float64_reference():
    from perception.models import mc_dropout_predict

    model = get_model("bayesian_segnet_basic", num_classes=3)
    x = torch.randn(1, 3, 32, 32)
    pred = mc_dropout_predict(model, x, samples=4, generator_seed=7)
    torch.manual_seed(7)
    from perception.models.bayesian import mc_dropout_mode

    with torch.no_grad(), mc_dropout_mode(model):
        samples = torch.stack([torch.softmax(model(x).double(), 1) for _ in range(4)])
    torch.testing.assert_close(pred.probs.double(), samples.mean(0), rtol=0, atol=1e-6)
    torch.testing.assert_close(pred.uncertainty.double(), samples.var(0, unbiased=False).mean(1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["segnet_basic", "fcn_basic", "bayesian_segnet_basic"])
def test_model_folder_round_trip(tmp_path, name):
    model = get_model(name, num_classes=3, lrn=True).eval()
    card = ModelCard(id="t", architecture=model_config(model), classes=["a", "b", "c"], palette=[[0, 0, 0]] * 3)
    save(model, tmp_path / "m", card)
    loaded = load(tmp_path / "m")
    assert loaded.card.architecture == {"name": name, "num_classes": 3, "kwargs": {"lrn": True}}
    x = torch.randn(1, 3, 32, 40)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_load_rejects_mismatched_weights(tmp_path):
    model = get_model("segnet_basic", num_classes=3)
    card = ModelCard(id="t", architecture=model_config(model), classes=["a", "b", "c"], palette=[[0, 0, 0]] * 3)
    save(model, tmp_path / "m", card)
    (tmp_path / "m" / "model.json").write_text(
        (tmp_path / "m" / "model.json").read_text().replace('"segnet_basic"', '"fcn_basic"')
    )
    with pytest.raises(ValueError, match="does not fit"):
        load(tmp_path / "m")
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "nowhere")


def _fake_vgg16_bn_state():
    """A state dict laid out like torchvision's vgg16_bn.features (conv, bn, relu, ... pool)."""
    state, i, in_ch = {}, 0, 3
    for stage in ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)):
        for w in stage:
            state[f"features.{i}.weight"] = torch.randn(w, in_ch, 3, 3)
            state[f"features.{i}.bias"] = torch.randn(w)
            state[f"features.{i + 1}.weight"] = torch.rand(w)
            state[f"features.{i + 1}.bias"] = torch.randn(w)
            state[f"features.{i + 1}.running_mean"] = torch.randn(w)
            state[f"features.{i + 1}.running_var"] = torch.rand(w)
            state[f"features.{i + 1}.num_batches_tracked"] = torch.tensor(5)
            i += 3
            in_ch = w
        i += 1  # max pool
    state["classifier.0.weight"] = torch.randn(10, 10)
    return state


def test_encoder_init_from_local_vgg16_bn(tmp_path):
    state = _fake_vgg16_bn_state()
    path = tmp_path / "vgg16_bn.pth"
    torch.save(state, path)
    model = get_model("segnet", num_classes=11, encoder_weights=str(path))
    first, last = model.encoders[0].convs[0], model.encoders[4].convs[2]
    assert torch.equal(first[0].weight, state["features.0.weight"])
    assert torch.equal(first[1].running_var, state["features.1.running_var"])
    assert torch.equal(last[0].weight, state["features.40.weight"])
    assert torch.equal(last[1].bias, state["features.41.bias"])
    assert "encoder_weights" not in model_config(model)["kwargs"]  # init-only, not architecture
    bad = tmp_path / "bad.pth"
    torch.save({"features.0.weight": torch.randn(64, 3, 3, 3)}, bad)
    with pytest.raises(ValueError, match="vgg16_bn"):
        load_vgg16_bn_encoder(model, bad)


def _stage_by_stage(model, x):
    """SegNet / SegNet-Basic written out layer by layer through their submodules, independently of
    their ``forward`` (which composes ``forward_to_dropout`` and ``forward_from_dropout``)."""
    from perception.models.segnet import SegNet

    if isinstance(model, SegNet):
        switches = []
        for enc in model.encoders:
            x, sw = enc.pool(enc.convs(x))
            x = enc.dropout(x)
            switches.append(sw)
        for dec, sw in zip(model.decoders, reversed(switches)):
            x = dec.dropout(dec.convs(dec.unpool(x, sw)))
        return model.classifier(x)
    enc, feats = model.encoder, []
    x = enc.lrn(x)
    for conv, pool, drop in zip(enc.stages, enc.pools, enc.dropouts):
        pre = conv(x)
        x, sw = pool(pre)
        x = drop(x)
        feats.append((pre, x, sw))
    x = feats[-1][1]
    for dec, (pre, _, sw) in zip(model.decoders, reversed(feats)):
        x = dec(x, pre, sw)
    return model.classifier(x)


SPLIT_MODELS = [n for n in list_models() if hasattr(get_model(n, num_classes=3), "forward_to_dropout")]


def test_split_models_cover_segnet_and_segnet_basic_families():
    assert {"segnet", "bayesian_segnet", "segnet_basic", "bayesian_segnet_basic", "bilinear_interpolation"} <= set(SPLIT_MODELS)


@pytest.mark.parametrize("name", SPLIT_MODELS)
def test_forward_is_the_stage_by_stage_pass_with_dropout_sampling(name):
    """forward = forward_from_dropout(forward_to_dropout(x)) draws the same dropout masks in the same
    order as the pass written out stage by stage (training mode, same seed), in float64."""
    model = get_model(name, num_classes=4).double().train()
    x = torch.randn(2, 3, 33, 47, dtype=torch.float64)
    with torch.no_grad():
        torch.manual_seed(11)
        got = model(x)
        torch.manual_seed(11)
        want = _stage_by_stage(model, x)
    assert torch.equal(got, want)


@pytest.mark.parametrize("name", ["bayesian_segnet", "bayesian_segnet_basic"])
def test_mc_reusing_the_prefix_equals_whole_passes_in_float64(name):
    """MC dropout computes the part before the first dropout once; its samples are still exactly those
    of whole stage-by-stage passes with the same seed (no random draw there, nothing reused mutated)."""
    from perception.models import mc_dropout_predict
    from perception.models.bayesian import mc_dropout_mode

    model = get_model(name, num_classes=4).double()
    with torch.no_grad():  # non-trivial running statistics, so eval-mode BN is not the identity
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(1, 3, 33, 47, dtype=torch.float64)
    pred = mc_dropout_predict(model, x, samples=4, generator_seed=3)

    def whole_passes(seed):
        torch.manual_seed(seed)
        with torch.no_grad(), mc_dropout_mode(model):
            return torch.stack([torch.softmax(_stage_by_stage(model, x), 1) for _ in range(4)])

    ref = whole_passes(3)
    torch.testing.assert_close(pred.probs.double(), ref.mean(0), rtol=0, atol=1e-6)
    torch.testing.assert_close(pred.uncertainty.double(), ref.var(0, unbiased=False).mean(1), rtol=0, atol=1e-6)
    # The comparison can fail: other masks give probabilities far outside its tolerance.
    assert (pred.probs.double() - whole_passes(4).mean(0)).abs().max() > 100 * 1e-6


@pytest.mark.parametrize("name", ["bayesian_segnet", "bayesian_segnet_basic"])
def test_mc_runs_the_prefix_once_per_frame(name):
    from perception.models import mc_dropout_predict

    model = get_model(name, num_classes=3)
    first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    last_conv = model.classifier
    calls = {"first": 0, "last": 0}
    first_conv.register_forward_hook(lambda *_: calls.__setitem__("first", calls["first"] + 1))
    last_conv.register_forward_hook(lambda *_: calls.__setitem__("last", calls["last"] + 1))
    mc_dropout_predict(model, torch.randn(1, 3, 32, 48), samples=5)
    assert calls == {"first": 1, "last": 5}


def test_bench_mc_reports_each_sample_count_and_refuses_a_model_without_dropout(capsys):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_mc", Path(__file__).parents[1] / "tools" / "bench_mc.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    # No --threads: it sets the process's torch threads, which later tests' bit-exact comparisons
    # between this process and subprocesses depend on.
    assert tool.main(["--model", "bayesian_segnet_basic", "--size", "24x32", "--samples", "1", "3",
                      "--rounds", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("bayesian_segnet_basic, one 24x32 frame")
    rows = {int(line.split()[0]): line.split() for line in lines[2:]}
    assert set(rows) == {1, 3} and all(r[-1].endswith("x") and float(r[-1][:-1]) > 0 for r in rows.values())
    assert tool.main(["--model", "segnet_basic", "--size", "24x32"]) == 2
    assert "has no dropout layers" in capsys.readouterr().err
