"""What the service feeds and computes is what training fed and computed.

The service decodes uploads with Pillow and NumPy only (no torch) and runs the ONNX graph; training
decodes files into its torch cache and evaluates the torch network. Same pixels, same outputs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from app.bundle import read_manifest
from app.inference import AttributeModel
from app.preprocess import decode_image, images_to_batch
from app.runtimes import OnnxRuntime
from tests.service.helpers import encode
from tests.synthetic import make_identities, render
from training.data.cache import cached_images
from training.data.transforms import to_model_input
from training.export import export_run
from training.onnx_export import OnnxExportError, add_onnx

SIZE = (64, 32)


@pytest.fixture(scope="module")
def crops(tmp_path_factory):
    """Synthetic crops at sizes other than the input size, as files in the formats clients send."""
    folder = tmp_path_factory.mktemp("crops")
    rng = np.random.default_rng(5)
    paths = []
    for i, person in enumerate(make_identities(6, seed=11)):
        image = render(person, 1 + i % 3, rng, (97 + 7 * i, 41 + 3 * i))
        fmt = ("PNG", "JPEG")[i % 2]
        path = folder / f"{i:02d}.{fmt.lower()}"
        path.write_bytes(encode(image, fmt))
        paths.append(path)
    return paths


def service_batch(paths, size=SIZE) -> np.ndarray:
    return images_to_batch([decode_image(p.read_bytes()) for p in paths], size)


def test_service_preprocessing_is_training_preprocessing(crops):
    training = cached_images(crops, SIZE, None, progress=False)
    service = service_batch(crops)
    assert service.dtype == np.uint8 and service.shape == (len(crops), 3, *SIZE)
    assert torch.equal(training, torch.from_numpy(service))


def test_exported_graph_computes_what_training_evaluated(attribute_run, crops, tmp_path):
    bundle = export_run(attribute_run, store=tmp_path, command="test")
    manifest = read_manifest(bundle)
    assert manifest.onnx is not None and manifest.onnx.opset >= 17
    assert manifest.onnx.max_abs_diff <= 1e-4 and len(manifest.onnx.sha256) == 64
    assert manifest.onnx.outputs == [g["name"] for g in manifest.attribute_schema]

    from app.nets.bundles import load_bundle

    _, net = load_bundle(bundle)
    with torch.no_grad():
        expected = net(to_model_input(cached_images(crops, SIZE, None, progress=False), torch.device("cpu")))
    got = OnnxRuntime(bundle, manifest, threads=1).run(service_batch(crops))
    for name, logits in zip(manifest.onnx.outputs, got, strict=True):
        np.testing.assert_allclose(logits, expected[name].numpy(), atol=1e-4, rtol=0)


def test_a_graph_that_differs_from_torch_fails_the_export(attribute_run, tmp_path, monkeypatch):
    """A broken exporter (here: the graph of other weights) is caught and leaves no graph behind."""
    import training.onnx_export as onnx_export

    bundle = export_run(attribute_run, store=tmp_path, command="test")
    recorded = read_manifest(bundle).onnx
    (bundle / "model.onnx").unlink()
    real = onnx_export.to_onnx

    def other_weights(net, manifest, opset):
        perturbed = type(net)(net.config).eval()  # same architecture, fresh random weights
        return real(perturbed, manifest, opset)

    monkeypatch.setattr(onnx_export, "to_onnx", other_weights)
    with pytest.raises(OnnxExportError, match="differs from the torch network"):
        add_onnx(bundle)
    assert not (bundle / "model.onnx").exists()
    assert read_manifest(bundle).onnx == recorded  # the manifest was not touched


def test_add_onnx_gives_an_old_bundle_its_graph(attribute_run, crops, tmp_path):
    """The path the shipped bundles took: a bundle without graph gets one, and the service loads it."""
    from typer.testing import CliRunner

    from training.cli import app

    bundle = export_run(attribute_run, store=tmp_path, command="test")
    (bundle / "model.onnx").unlink()
    manifest = read_manifest(bundle).model_copy(update={"onnx": None})
    (bundle / "manifest.json").write_text(manifest.model_dump_json())
    result = CliRunner().invoke(app, ["add-onnx", str(bundle)])
    assert result.exit_code == 0, result.output
    assert "max |onnx - torch|" in result.output
    manifest = read_manifest(bundle)
    model = AttributeModel(manifest, OnnxRuntime(bundle, manifest, threads=1))
    (predicted,) = model.predict([decode_image(crops[0].read_bytes())])
    assert set(predicted) == set(model.groups) and all(0 < v.score <= 1 for v in predicted.values())
