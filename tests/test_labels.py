"""Label maps (--labels, label_map.pbtxt beside a graph), VOC mapping by name, pipeline.config as protobuf text
format with every value checked, and the NMS flags' ranges (issue 14, items 1-3)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import IMAGES_DIR, REPO_ROOT, WORKSPACE
from utils import pbtxt
from utils.errors import UserError
from utils.evaluation import check_detectable, detectable_classes
from utils.labels import (COCO_LABELS, PERSON_LABELS, label_file_beside, load_label_file, resolve_labels,
                          voc_class)
from utils.spec_reader import read_config

LABEL_MAP = "item {\n  id: 1\n  name: 'person'\n  display_name: 'person'\n}\n"


def run(script: str, *args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO_ROOT / script), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or REPO_ROOT, timeout=600)


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith(("error", "warning"))]


# --- the protobuf text-format reader ----------------------------------------------------------------

def test_pbtxt_reads_fields_on_one_line_comments_nesting_strings_and_lists():
    text = """# a comment
    model { ssd { num_classes: 1  # trailing comment
      post_processing { batch_non_max_suppression { iou_threshold: 0.45 max_total_detections: 20 }
                        score_converter: SIGMOID }
      feature_extractor: { type: 'ssd_' "mobilenet" }
      anchor_generator < ssd_anchor_generator { aspect_ratios: [1.0, 2, 0.5] aspect_ratios: 3.0 } >
    } }
    eval_input_reader { label_map_path: "data/label_map.pbtxt" };
    """
    doc = pbtxt.parse(text)
    ssd = pbtxt.message(doc, "model", "ssd")
    nms = pbtxt.message(ssd, "post_processing", "batch_non_max_suppression")
    assert pbtxt.last(nms, "iou_threshold") == 0.45 and pbtxt.last(nms, "max_total_detections") == 20
    assert pbtxt.last(pbtxt.message(ssd, "post_processing"), "score_converter") == "SIGMOID"
    assert pbtxt.last(pbtxt.message(ssd, "feature_extractor"), "type") == "ssd_mobilenet"
    assert pbtxt.values(pbtxt.message(ssd, "anchor_generator", "ssd_anchor_generator"), "aspect_ratios") == \
        [1.0, 2, 0.5, 3.0]
    assert pbtxt.last(pbtxt.message(doc, "eval_input_reader"), "label_map_path") == "data/label_map.pbtxt"


@pytest.mark.parametrize("text, line", [("a {\n b: 1\n", 3), ("a: }", 1), ("a: 'open", 1), ("\n1: 2", 2),
                                        ("a b", 1), ("a: [1 2]", 1)])
def test_pbtxt_refuses_malformed_text_with_its_line(text, line):
    with pytest.raises(pbtxt.PbtxtError, match=f"^line {line}:"):
        pbtxt.parse(text)


def test_one_line_nms_block_is_read_not_defaulted(tmp_path):
    """The bug of the line-by-line reader: this block was read as IoU 0.6 / 100 detections."""
    config = tmp_path / "pipeline.config"
    config.write_text("model { ssd { num_classes: 1 post_processing { batch_non_max_suppression "
                      "{ iou_threshold: 0.45 max_total_detections: 20 } } } }")
    assert read_config(config) == {"num_classes": 1, "iou_threshold": 0.45, "keep_top_k": 20}


# --- every config value checked where it is read ------------------------------------------------------

NMS = "post_processing {{ batch_non_max_suppression {{ {} }} }}"
ANCHOR = "anchor_generator {{ ssd_anchor_generator {{ {} }} }}"
RESIZER = "image_resizer {{ fixed_shape_resizer {{ {} }} }}"
BAD_CONFIG_VALUES = [
    ("num_classes: 0", "num_classes", "0"), ("num_classes: 1.5", "num_classes", "1.5"),
    (NMS.format("iou_threshold: 0"), "iou_threshold", "0"), (NMS.format("iou_threshold: 1.5"), "iou_threshold", "1.5"),
    (NMS.format("score_threshold: 1.0"), "score_threshold", "1.0"),
    (NMS.format("score_threshold: -0.1"), "score_threshold", "-0.1"),
    (NMS.format("max_detections_per_class: 0"), "max_detections_per_class", "0"),
    (NMS.format("max_total_detections: -1"), "max_total_detections", "-1"),
    (RESIZER.format("height: 0 width: 300"), "height", "0"), (RESIZER.format("width: -3"), "width", "-3"),
    (ANCHOR.format("min_scale: 0"), "min_scale", "0"), (ANCHOR.format("max_scale: -1"), "max_scale", "-1"),
    (ANCHOR.format("aspect_ratios: 1.0 aspect_ratios: 0"), "aspect_ratios", "0"),
    ("box_coder { faster_rcnn_box_coder { y_scale: 0 } }", "y_scale", "0"),
    (ANCHOR.format("reduce_boxes_in_lowest_layer: maybe"), "reduce_boxes_in_lowest_layer", "maybe"),
    # fields whose anchors this converter does not compute: refused rather than converted with wrong anchors
    (ANCHOR.format("scales: 0.1 scales: 0.3"), "scales", "[0.1, 0.3]"),
    (ANCHOR.format("base_anchor_height: 0.5"), "base_anchor_height", "0.5"),
    (ANCHOR.format("height_stride: 16 width_stride: 16"), "height_stride", "16"),
]


@pytest.mark.parametrize("body, field, value", BAD_CONFIG_VALUES)
def test_bad_config_value_is_one_line_naming_field_value_and_file(tmp_path, body, field, value):
    config = tmp_path / "pipeline.config"
    config.write_text(f"model {{ ssd {{ {body} }} }}")
    with pytest.raises(UserError) as caught:
        read_config(config)
    message = str(caught.value)
    assert "\n" not in message and field in message and repr(value).strip("'") in message and str(config) in message
    assert caught.value.exit_code == 2


def test_bad_config_value_stops_model_py_before_converting(pedestrian_model, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "frozen_inference_graph.pb").symlink_to(pedestrian_model.graph_path)
    (folder / "pipeline.config").write_text("model { ssd { num_classes: 1\n post_processing { "
                                            "batch_non_max_suppression { iou_threshold: 2 } } } }")
    result = run("model.py", "-m", folder, "-w", tmp_path / "ws")
    assert result.returncode == 2, result.stderr
    assert error_lines(result) == [f"error: '{folder / 'pipeline.config'}': "
                                   f"post_processing.batch_non_max_suppression.iou_threshold is 2, must be in (0, 1]; "
                                   f"fix the model's pipeline.config"]
    assert not list((tmp_path / "ws").rglob("*.onnx")) and not list((tmp_path / "ws").rglob("*.json"))


@pytest.mark.parametrize("flag, value", [("--iou-threshold", "2"), ("--iou-threshold", "0"), ("--keep-top-k", "-1"),
                                         ("--top-k", "0"), ("--score-threshold", "1"), ("--top-k", "1.5")])
@pytest.mark.parametrize("script", ["model.py", "detect_objects.py", "voc_evaluation.py"])
def test_bad_nms_flag_is_refused_at_parse_time(tmp_path, script, flag, value):
    inputs = [str(IMAGES_DIR / "person.jpg")] if script == "detect_objects.py" else []
    result = run(script, *inputs, "-m", "ssdlite_mobilenet_v2_pedestrian", "-w", tmp_path / "ws", flag, value)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and flag in errors[0] and value in errors[0]
    assert not (tmp_path / "ws").exists()


def test_nms_overrides_out_of_range_are_refused_by_the_api(pedestrian_model, tmp_path):
    from utils.converter import convert
    from utils.plan import Plan
    from utils.ssd_spec import NmsOverrides

    with pytest.raises(UserError, match=r"iou_threshold 2 must be in \(0, 1\]"):
        convert(pedestrian_model, nms=NmsOverrides(iou_threshold=2.0), output=tmp_path / "x.onnx")
    with pytest.raises(UserError, match="keep_top_k -1 must be at least 1"):
        Plan.resolve(model=pedestrian_model.name, workspace=tmp_path, backend="onnxruntime",
                     nms=NmsOverrides(keep_top_k=-1))
    assert not list(tmp_path.iterdir())


# --- label maps --------------------------------------------------------------------------------------

def test_label_map_pbtxt_prefers_display_name(tmp_path):
    path = tmp_path / "mscoco_label_map.pbtxt"
    path.write_text("item {\n name: '/m/01g317'\n id: 1\n display_name: 'person'\n}\n"
                    "item { name: \"/m/0199g\" id: 2 display_name: \"bicycle\" }\nitem { id: 3 name: 'car' }\n")
    assert load_label_file(path) == {1: "person", 2: "bicycle", 3: "car"}


def test_text_labels_one_per_line_skip_background(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text("background\nperson\nbicycle\n\n")
    assert load_label_file(path) == {1: "person", 2: "bicycle"}
    path.write_text("person\n")
    assert load_label_file(path) == {1: "person"}


@pytest.mark.parametrize("text, match", [("", "names no class"), ("item { id: 1 }", "no name"),
                                         ("item { id: -1 name: 'a' }", "id is -1"),
                                         ("item { id: 1 name: 'a' } item { id: 1 name: 'b' }", "given twice"),
                                         ("item { id: 1 name: 'a'", "not a valid label map")])
def test_bad_label_map_is_one_line_error(tmp_path, text, match):
    path = tmp_path / "label_map.pbtxt"
    path.write_text(text)
    with pytest.raises(UserError, match=match) as caught:
        load_label_file(path)
    assert "\n" not in str(caught.value)


def test_label_resolution_order(tmp_path):
    graph = tmp_path / "frozen_inference_graph.pb"
    graph.write_bytes(b"")
    given = tmp_path / "given.txt"
    given.write_text("dog\n")
    assert resolve_labels(2, None, graph, None, "person") == PERSON_LABELS          # the registry's
    assert resolve_labels(91, None, graph) == COCO_LABELS                            # COCO for 91 classes
    assert resolve_labels(2, None, graph) == {}                                      # none
    config = tmp_path / "pipeline.config"
    config.write_text("model { ssd { num_classes: 1 } }\n"
                      "eval_input_reader { label_map_path: 'PATH_TO_BE_CONFIGURED/my_map.pbtxt' }")
    (tmp_path / "my_map.pbtxt").write_text("item { id: 1 name: 'cat' }")
    assert resolve_labels(2, None, graph, config, "person") == {1: "cat"}            # pipeline.config's, by file name
    (tmp_path / "pets_label_map.pbtxt").write_text("item { id: 1 name: 'horse' }")
    assert resolve_labels(2, None, graph, config, "person") == {1: "horse"}          # *label_map*.pbtxt
    (tmp_path / "label_map.pbtxt").write_text(LABEL_MAP)
    assert resolve_labels(2, None, graph, config, "coco") == {1: "person"}           # label_map.pbtxt first
    assert resolve_labels(2, given, graph, config, "coco") == {1: "dog"}             # --labels over everything
    (tmp_path / "label_map.pbtxt").unlink()
    (tmp_path / "other_label_map.pbtxt").write_text(LABEL_MAP)
    with pytest.raises(UserError, match="--labels"):
        label_file_beside(graph)


def test_voc_classes_by_name_case_insensitive_with_coco_renames():
    assert [voc_class(name) for name in ("Person", "AIRPLANE", "tv", "Dining Table", "potted_plant", "aeroplane",
                                         "tvmonitor", "giraffe", "class_1")] == \
        ["person", "aeroplane", "tvmonitor", "diningtable", "pottedplant", "aeroplane", "tvmonitor", None, None]
    assert detectable_classes({1: "Person", 2: "Dog"}) == {"person", "dog"}
    with pytest.raises(UserError, match=r"none of the classes of mine \(class_1, class_2\).*--labels"):
        check_detectable({}, "mine", 3)


# --- end to end: the pedestrian graph as a user's bare path ------------------------------------------

@pytest.fixture(scope="module")
def user_graphs(tmp_path_factory, pedestrian_model):
    """The pedestrian graph given as a path: once with a label_map.pbtxt beside it, once alone."""
    root = tmp_path_factory.mktemp("user")
    for name in ("with_map", "alone"):
        (root / name).mkdir()
        shutil.copy(pedestrian_model.graph_path, root / name / "frozen_inference_graph.pb")
    (root / "with_map" / "label_map.pbtxt").write_text(LABEL_MAP)
    return root


def test_bare_path_with_label_map_prints_names(user_graphs):
    result = run("detect_objects.py", IMAGES_DIR / "person.jpg", "-m", user_graphs / "with_map" /
                 "frozen_inference_graph.pb", "-w", user_graphs / "ws", "--backend", "onnxruntime",
                 "-o", user_graphs / "with_map.jpg")
    assert result.returncode == 0, result.stderr
    assert "Detected person with confidence" in result.stdout and not error_lines(result)


@pytest.mark.slow   # > 9 s: converts the graph again
def test_bare_path_without_label_map_warns_once_and_prints_class_1(user_graphs):
    graph = user_graphs / "alone" / "frozen_inference_graph.pb"
    result = run("detect_objects.py", IMAGES_DIR / "person.jpg", "-m", graph, "-w", user_graphs / "ws",
                 "--backend", "onnxruntime", "-o", user_graphs / "alone.jpg")
    assert result.returncode == 0, result.stderr
    assert "Detected class_1 with confidence" in result.stdout
    (warning,) = error_lines(result)
    assert warning.startswith("warning: alone has no class names") and "--labels" in warning
    # --labels names them (stored in the ONNX: a different conversion), and the ONNX alone prints them
    labels = user_graphs / "labels.txt"
    labels.write_text("background\nperson\n")
    named = run("model.py", "-m", graph, "-w", user_graphs / "ws", "--labels", labels, "-o", user_graphs / "named.onnx")
    assert named.returncode == 0, named.stderr
    deployed = user_graphs / "deployed"
    deployed.mkdir()
    shutil.copy(user_graphs / "named.onnx", deployed / "model.onnx")
    alone = run("detect_objects.py", IMAGES_DIR / "person.jpg", "--onnx", deployed / "model.onnx",
                "-w", user_graphs / "ws", "--backend", "onnxruntime", "-o", user_graphs / "deployed.jpg", cwd=deployed)
    assert alone.returncode == 0 and "Detected person with confidence" in alone.stdout and not error_lines(alone)


def test_voc_evaluation_of_an_unnamed_model_is_one_line_exit_2(user_graphs, shared_dir):
    result = run("voc_evaluation.py", "onnxruntime", "-m", user_graphs / "alone" / "frozen_inference_graph.pb",
                 "-w", user_graphs / "ws", "-d", shared_dir / "data" / "VOCdevkit" / "VOC2007", "--limit", "5")
    assert result.returncode == 2
    (error,) = error_lines(result)
    assert error.startswith("error: none of the classes of alone (class_1)") and "--labels" in error
    assert "mAP" not in result.stdout and not (user_graphs / "ws" / "results" / "alone").exists()


def _person_ap(stdout: str) -> str:
    return next(line for line in stdout.splitlines() if line.startswith("person")).split(":")[1].strip()


def test_voc_person_ap_of_bare_path_with_label_map_equals_registry_name(user_graphs, shared_dir, pedestrian_model):
    voc = shared_dir / "data" / "VOCdevkit" / "VOC2007"
    bare = run("voc_evaluation.py", "onnxruntime", "-m", user_graphs / "with_map" / "frozen_inference_graph.pb",
               "-w", user_graphs / "ws", "-d", voc, "--limit", "60")
    registry = run("voc_evaluation.py", "onnxruntime", "-m", pedestrian_model.name, "-w", WORKSPACE, "-d", voc,
                   "--limit", "60")
    assert bare.returncode == 0 and registry.returncode == 0, bare.stderr + registry.stderr
    assert _person_ap(bare.stdout) == _person_ap(registry.stdout) != "n/a"


def test_labels_flag_on_a_file_overrides_its_names_and_the_results_key(pedestrian_onnx, tmp_path):
    from utils.plan import Plan

    path = tmp_path / "names.txt"
    path.write_text("pedestrian\n")
    own = Plan.resolve(onnx=pedestrian_onnx.onnx_path, workspace=tmp_path, backend="onnxruntime", decode="cpu")
    renamed = Plan.resolve(onnx=pedestrian_onnx.onnx_path, workspace=tmp_path, backend="onnxruntime", decode="cpu",
                           labels=load_label_file(path))
    assert own.prepare().labels == {1: "person"} and renamed.prepare().labels == {1: "pedestrian"}
    assert own.key(own.prepare()) != renamed.key(renamed.prepare())
    assert renamed.key(pedestrian_onnx.artifact)["labels"] == {"1": "pedestrian"}


@pytest.mark.slow   # > 9 s: converts the graph again
def test_labels_are_part_of_the_conversion_key(pedestrian_model, tmp_path):
    from utils.converter import convert

    target = tmp_path / "named.onnx"
    first = convert(pedestrian_model, output=target)
    renamed = convert(pedestrian_model, output=target, labels={1: "human"})
    again = convert(pedestrian_model, output=target, labels={1: "human"})
    assert first.artifact.labels == {1: "person"} and renamed.built and not again.built
    assert again.artifact.labels == {1: "human"}
