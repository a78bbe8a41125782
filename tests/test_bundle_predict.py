import ast

import numpy as np
import pytest
from PIL import Image

from core import bundle_predict
from core.backbones import Preprocessing, get_spec
from core.export import preprocess_config

LITE0 = get_spec("efficientnet_lite0").preprocessing
BICUBIC = Preprocessing(160, 168, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bicubic")


@pytest.mark.parametrize("preprocessing", [LITE0, BICUBIC], ids=["bilinear", "bicubic"])
@pytest.mark.parametrize("size", [(500, 375), (333, 501), (256, 300), (97, 61), (224, 224)])
def test_numpy_preprocessing_equals_the_training_transform(preprocessing, size):
    rng = np.random.default_rng(sum(size))
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    ours = bundle_predict.preprocess(image, preprocess_config(preprocessing))
    theirs = preprocessing.eval_transform()(image).numpy()
    assert ours.shape == theirs.shape == (3, preprocessing.input_size, preprocessing.input_size)
    assert np.abs(ours - theirs).max() < 1e-5


def test_transparent_images_are_flattened_onto_white(tmp_path):
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    assert bundle_predict.load_rgb(tmp_path / "clear.png").getpixel((0, 0)) == (255, 255, 255)


def test_the_predictor_imports_only_onnxruntime_numpy_and_pillow():
    tree = ast.parse(open(bundle_predict.__file__).read())
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module.split(".")[0])
    third_party = modules - {"__future__", "argparse", "csv", "json", "sys", "zipfile", "dataclasses", "pathlib"}
    assert third_party == {"numpy", "onnxruntime", "PIL"}
