import ast
import csv
import json
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from core import bundle_predict
from core.backbones import Preprocessing, get_spec
from core.errors import LoupeError
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


def tiny_onnx(classes: int = 2, input_size: int = 16) -> onnx.ModelProto:
    """input (N x 3 x S x S) -> global average -> 3 x classes weights -> softmax -> probabilities."""
    weights = onnx.numpy_helper.from_array(np.arange(3 * classes, dtype=np.float32).reshape(3, classes) / 10, "w")
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
            onnx.helper.make_node("Flatten", ["pooled"], ["flat"]),
            onnx.helper.make_node("MatMul", ["flat", "w"], ["logits"]),
            onnx.helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ],
        "tiny",
        [onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["batch", 3, input_size, input_size])],
        [onnx.helper.make_tensor_value_info("probabilities", onnx.TensorProto.FLOAT, ["batch", classes])],
        [weights],
    )
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)], ir_version=9)


def tiny_config(**changes) -> dict:
    config = preprocess_config(Preprocessing(16, 16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear"))
    return {**config, "input_name": "input", "output_name": "probabilities", **changes}


def test_a_valid_bundle_predicts_each_file_and_reports_the_ones_it_cannot_read(tmp_path):
    predictor = bundle_predict.BundlePredictor.load(tiny_onnx().SerializeToString(), ["cat", "dog"], tiny_config())
    Image.new("RGB", (20, 30), (200, 10, 10)).save(tmp_path / "red.png")
    (tmp_path / "notes.png").write_text("not an image")
    outcomes = predictor.predict_files([tmp_path / "red.png", tmp_path / "notes.png", tmp_path / "red.png"])
    assert [o.error == "" for o in outcomes] == [True, False, True]
    assert "not an image" in outcomes[1].error and outcomes[1].probabilities is None
    assert np.allclose(outcomes[0].probabilities.sum(), 1.0)
    assert np.array_equal(outcomes[0].probabilities, outcomes[2].probabilities)


@pytest.mark.parametrize(
    "changes, complaint",
    [
        ({"input_size": 8, "resize_size": 8}, "input_size"),
        ({"input_size": 2048, "resize_size": 2048}, "input_size"),
        ({"input_size": "16"}, "input_size"),
        ({"input_size": True}, "input_size"),
        ({"resize_size": 12}, "resize_size"),
        ({"mean": [0.5, 0.5]}, "mean"),
        ({"mean": [0.5, 0.5, float("nan")]}, "mean"),
        ({"std": [0.5, 0.0, 0.5]}, "std must be above 0"),
        ({"std": "0.5"}, "std"),
        ({"interpolation": "cubic"}, "interpolation"),
        ({"input_name": 5}, "input_name"),
        ({"output_name": ""}, "output_name"),
        ({"decode_budget_bytes": -1}, "decode_budget_bytes"),
    ],
)
def test_a_preprocess_json_out_of_bounds_is_refused(changes, complaint):
    with pytest.raises(LoupeError, match=complaint):
        bundle_predict.BundlePredictor.load(tiny_onnx().SerializeToString(), ["cat", "dog"], tiny_config(**changes))


def test_a_preprocess_json_that_is_not_an_object_is_refused():
    with pytest.raises(LoupeError, match="JSON object"):
        bundle_predict.BundlePredictor.load(tiny_onnx().SerializeToString(), ["cat", "dog"], [tiny_config()])


def test_a_preprocess_json_naming_tensors_the_model_lacks_is_refused():
    with pytest.raises(LoupeError, match="lacks the input or output"):
        bundle_predict.BundlePredictor.load(
            tiny_onnx().SerializeToString(), ["cat", "dog"], tiny_config(output_name="x")
        )


@pytest.mark.parametrize(
    "labels",
    [
        {"0": "cat"},
        [],
        ["cat", 2],
        ["cat", ""],
        ["cat", "x" * 101],
        ["cat", "dog\x1b[2J"],
        ["cat", "cat"],
        [f"class {k}" for k in range(10_001)],
    ],
    ids=["not_a_list", "empty", "not_text", "empty_name", "too_long", "control_characters", "duplicates", "too_many"],
)
def test_labels_json_out_of_bounds_is_refused(labels):
    with pytest.raises(LoupeError, match="labels.json must be a list"):
        bundle_predict.BundlePredictor.load(tiny_onnx().SerializeToString(), labels, tiny_config())


def test_labels_that_do_not_match_the_model_outputs_are_refused():
    with pytest.raises(LoupeError, match="one output per class"):
        bundle_predict.BundlePredictor.load(tiny_onnx(classes=2).SerializeToString(), ["a", "b", "c"], tiny_config())


def test_a_model_of_another_input_size_is_refused():
    with pytest.raises(LoupeError, match="3 x 32 x 32"):
        bundle_predict.BundlePredictor.load(
            tiny_onnx().SerializeToString(), ["cat", "dog"], tiny_config(input_size=32, resize_size=32)
        )


def with_external_weights(model: onnx.ModelProto, folder) -> bytes:
    onnx.save_model(model, folder / "model.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    return (folder / "model.onnx").read_bytes()


def test_a_model_that_keeps_its_weights_outside_is_refused(tmp_path):
    data = with_external_weights(tiny_onnx(), tmp_path)
    assert bundle_predict.external_tensors(data) == 1
    with pytest.raises(LoupeError, match="weights in files outside it"):
        bundle_predict.BundlePredictor.load(data, ["cat", "dog"], tiny_config())


def test_external_data_is_found_inside_nested_graphs_and_node_attributes(tmp_path):
    model = tiny_onnx()
    shift = onnx.numpy_helper.from_array(np.zeros(2, dtype=np.float32), "shift")
    branch = onnx.helper.make_graph(
        [onnx.helper.make_node("Constant", [], ["shift"], value=shift)], "branch", [],
        [onnx.helper.make_tensor_value_info("shift", onnx.TensorProto.FLOAT, [2])],
    )
    flag = onnx.numpy_helper.from_array(np.array(True), "flag")
    model.graph.initializer.append(flag)
    model.graph.node.append(onnx.helper.make_node("If", ["flag"], ["chosen"], then_branch=branch, else_branch=branch))
    model.graph.output.append(onnx.helper.make_tensor_value_info("chosen", onnx.TensorProto.FLOAT, [2]))
    assert bundle_predict.external_tensors(model.SerializeToString()) == 0
    onnx.external_data_helper.convert_model_to_external_data(
        model, location="weights.bin", size_threshold=0, convert_attribute=True
    )
    # The two initializers, and the Constant's tensor in each branch of the If.
    assert bundle_predict.external_tensors(model.SerializeToString()) == 4


def test_a_model_that_is_not_protobuf_is_refused():
    with pytest.raises(LoupeError, match="not a valid ONNX file"):
        bundle_predict.BundlePredictor.load(b"\x0a\xff\xff\xff\xff\x0f", ["cat", "dog"], tiny_config())


def varint(value: int) -> bytes:
    out = b""
    while value >= 0x80:
        out += bytes([value & 0x7F | 0x80])
        value >>= 7
    return out + bytes([value])


def length_delimited(number: int, payload: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def test_a_protobuf_that_nests_without_end_is_refused_and_varints_are_never_followed():
    # A varint where ModelProto keeps its graph: not a message, so not walked into.
    assert bundle_predict.external_tensors(bytes([7 << 3 | 0, 0x00]) * 1000) == 0
    graph = b""
    for _ in range(120):  # graph -> node -> attribute -> graph -> ...
        graph = length_delimited(1, length_delimited(5, length_delimited(6, graph)))
    with pytest.raises(LoupeError, match="not a valid ONNX file"):
        bundle_predict.external_tensors(length_delimited(7, graph))


def bundle_zip(path, **members) -> None:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name.replace("_", ".", 1), data)


def test_an_oversized_or_unparsable_bundle_member_is_refused_before_use(tmp_path):
    model = tiny_onnx().SerializeToString()
    config = json.dumps(tiny_config())
    bundle_zip(tmp_path / "huge.zip", model_onnx=model, labels_json=" " * (3 * 2**20), preprocess_json=config)
    with pytest.raises(LoupeError, match="labels.json in huge.zip is larger"):
        bundle_predict.BundlePredictor.from_zip(tmp_path / "huge.zip")
    bundle_zip(tmp_path / "deep.zip", model_onnx=model, labels_json="[" * 100_000, preprocess_json=config)
    with pytest.raises(LoupeError, match="labels.json is not valid JSON"):
        bundle_predict.BundlePredictor.from_zip(tmp_path / "deep.zip")
    bundle_zip(tmp_path / "partial.zip", model_onnx=model, preprocess_json=config)
    with pytest.raises(LoupeError, match="lacks labels.json"):
        bundle_predict.BundlePredictor.from_zip(tmp_path / "partial.zip")


def test_spreadsheet_formulas_in_the_csv_are_neutralised(tmp_path):
    outcomes = [
        bundle_predict.FilePrediction("=HYPERLINK(\"http://x\").png", np.array([0.9, 0.1])),
        bundle_predict.FilePrediction("@SUM(A1).png", error="-not an image"),
        bundle_predict.FilePrediction("plain.png", np.array([0.2, 0.8])),
    ]
    bundle_predict.report(outcomes, ["+cat", "dog"], tmp_path / "out.csv")
    rows = list(csv.DictReader((tmp_path / "out.csv").open()))
    assert [r["file"] for r in rows] == ["'=HYPERLINK(\"http://x\").png", "'@SUM(A1).png", "plain.png"]
    assert [r["class"] for r in rows] == ["'+cat", "", "dog"] and rows[1]["error"] == "'-not an image"
    assert rows[0]["p_+cat"] == "0.9" and rows[2]["probability"] == "0.8"


def test_control_characters_never_reach_the_terminal(capsys):
    names = ["evil\x1b[2J\x1b]0;owned\x07.png", "carriage\rreturn.png", "bidi\u202etxt.png", "bad\udcffbyte.png"]
    outcomes = [bundle_predict.FilePrediction(name, np.array([1.0, 0.0])) for name in names]
    outcomes.append(bundle_predict.FilePrediction("x.png", error="decoder said \x1b[31mred"))
    bundle_predict.report(outcomes, ["cat", "dog"])
    printed = capsys.readouterr().out
    assert printed.splitlines() == [
        "evil?[2J?]0;owned?.png: cat (1.0000)",
        "carriage?return.png: cat (1.0000)",
        "bidi?txt.png: cat (1.0000)",
        "bad?byte.png: cat (1.0000)",
        "x.png: error: decoder said ?[31mred",
    ]


def test_the_predictor_imports_only_onnxruntime_numpy_pillow_and_the_shipped_decoder():
    tree = ast.parse(Path(bundle_predict.__file__).read_text())
    modules, relative = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            modules.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            relative |= {alias.name for alias in node.names}
    assert modules - set(sys.stdlib_module_names) == {"numpy", "onnxruntime", "PIL"}
    assert relative == {"images"}
