# SPDX-License-Identifier: Apache-2.0
"""Every bundle in a real MONAI Label server: ``monailabel start_server`` with the ``monaibundle`` app, offline.

The server runs from the MONAI Label venv (``scripts/setup_monailabel.sh`` makes ``.venv-monailabel``; or set
``MONAILABEL_BIN``); without it the tests skip, and with ``REQUIRE_MONAILABEL=1`` (CI) they fail. It is set up the
way the README tells a user to: the app copied out of the installed wheel (``monailabel apps --download``), each
bundle linked into ``apps/monaibundle/model/<name>``, ``--conf zoo_source github --conf sam2 false``. The links
point at temporary copies of the bundles, each with a randomly initialised ``models/model.pt`` built from its
``network_def``, so the repository's own ``models/`` is never touched. HTTP(S) proxies point at a closed local
port, so any download the server tried would fail the start.

The studies folder holds real MSD Task04 hippocampus volumes: five with labels in ``labels/final/`` (what
``/train`` trains on), one without, and that one again with an oblique, anisotropic, flipped affine.
"""

from __future__ import annotations

import dataclasses
import email.parser
import email.policy
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from bundletools.data import case_name
from tests.utils import ALL_BUNDLES, BUNDLES, monailabel_executable, shared_data

pytestmark = [pytest.mark.monailabel, pytest.mark.slow, pytest.mark.realdata]

LABELLED_CASES = 5
START_TIMEOUT_S = 300
REQUEST_TIMEOUT_S = 300
TRAIN_TIMEOUT_S = 600
# no proxy handler: requests to 127.0.0.1 must not go through a proxy from the environment
HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def declared_labels(bundle: str) -> dict[str, int]:
    """Label name -> value from ``metadata.json`` (``outputs.pred.channel_def``), background excluded, as MONAI
    Label reads them."""
    meta = json.loads((BUNDLES / bundle / "configs" / "metadata.json").read_text())
    channels = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    return {name.lower(): int(value) for value, name in channels.items() if name.lower() != "background"}


def random_checkpoint(bundle_dir: Path) -> dict[str, torch.Tensor]:
    """Write ``models/model.pt``: the state dict of a randomly initialised ``network_def``."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle_dir / "configs" / "inference.json"))
    torch.manual_seed(0)
    state = {k: v.clone() for k, v in parser.get_parsed_content("network_def").state_dict().items()}
    (bundle_dir / "models").mkdir()
    torch.save(state, bundle_dir / "models" / "model.pt")
    return state


def make_studies(studies: Path) -> dict[str, Path]:
    """Real hippocampus volumes, the first ``LABELLED_CASES`` with their labels; returns the unlabelled images
    by role (``plain``, ``oblique``)."""
    data = shared_data("Task04_Hippocampus")
    names = sorted(p.name for p in (data / "labelsTr").glob("*.nii.gz"))[: LABELLED_CASES + 1]
    (studies / "labels" / "final").mkdir(parents=True)
    for name in names[:LABELLED_CASES]:
        shutil.copy(data / "imagesTr" / name, studies / name)
        shutil.copy(data / "labelsTr" / name, studies / "labels" / "final" / name)
    plain = studies / names[LABELLED_CASES]
    shutil.copy(data / "imagesTr" / plain.name, plain)
    # the same voxels with a geometry that the bundles' Orientationd/Spacingd change and Invertd must undo
    image = nib.load(str(plain))
    angle = np.deg2rad(25)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([-1.3, -0.9, 2.0])
    affine[:3, 3] = [40.0, -25.0, 12.0]
    oblique = studies / f"{case_name(plain)}_oblique.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), affine), str(oblique))
    return {"plain": plain, "oblique": oblique}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(url: str, method: str = "GET", body: dict | None = None, timeout: float = REQUEST_TIMEOUT_S):
    """(status, content type, body bytes); HTTP errors are returned, not raised."""
    data = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
    req = urllib.request.Request(url, data=data, method=method)
    if body is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with HTTP.open(req, timeout=timeout) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read()


@dataclasses.dataclass
class Server:
    url: str
    log: Path  # the server's stdout and stderr
    bundles: Path  # the bundle copies linked into the app's model folder
    images: dict[str, Path]  # unlabelled studies by role

    def log_tail(self, chars: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def get_json(self, path: str):
        status, _, body = request(self.url + path)
        assert status == 200, f"GET {path}: HTTP {status}: {body[:2000]!r}\n{self.log_tail()}"
        return json.loads(body)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    executable = monailabel_executable()
    root = tmp_path_factory.mktemp("monailabel")
    images = make_studies(root / "studies")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update({
        "PATH": f"{executable.parent}{os.pathsep}{env.get('PATH', '')}",
        "MONAILABEL_PYEXE": str(executable.parent / "python"),  # the `monailabel` script runs `python` otherwise
        "MONAI_LABEL_SESSION_PATH": str(root / "sessions"),
        "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
        "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
        "no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost",
    })
    env.setdefault("OMP_NUM_THREADS", "2")
    download = subprocess.run([str(executable), "apps", "--download", "--name", "monaibundle", "--output",
                               str(root / "apps")], env=env, cwd=root, capture_output=True, text=True,
                              encoding="utf-8", errors="replace", timeout=300)
    assert download.returncode == 0, f"monailabel apps --download failed:\n{download.stdout}\n{download.stderr}"
    model_dir = root / "apps" / "monaibundle" / "model"
    model_dir.mkdir(exist_ok=True)
    for name in ALL_BUNDLES:
        copy = root / "bundles" / name
        shutil.copytree(BUNDLES / name, copy,
                        ignore=shutil.ignore_patterns("models", "eval", "runs", "segmentations", "__pycache__"))
        random_checkpoint(copy)
        os.symlink(copy, model_dir / name)

    url = f"http://127.0.0.1:{free_port()}"
    log = root / "server.log"
    cmd = [str(executable), "start_server", "--app", str(root / "apps" / "monaibundle"),
           "--studies", str(root / "studies"), "--conf", "models", ",".join(ALL_BUNDLES),
           "--conf", "zoo_source", "github", "--conf", "sam2", "false",
           "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1]]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        started = time.monotonic()
        while True:
            if proc.poll() is not None:
                pytest.fail(f"monailabel start_server exited with {proc.returncode}:\n{log.read_text()[-6000:]}")
            try:
                if request(url + "/info/", timeout=10)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() - started > START_TIMEOUT_S:
                pytest.fail(f"no answer from {url}/info/ within {START_TIMEOUT_S} s:\n{log.read_text()[-6000:]}")
            time.sleep(1)
        print(f"MONAI Label server with {len(ALL_BUNDLES)} bundles answered after {time.monotonic() - started:.0f} s")
        yield Server(url, log, root / "bundles", images)
    finally:
        # the server, its training subprocesses and their data loader workers share one process group
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 30)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        try:  # anything of the group still alive after the server itself ended
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def infer(server: Server, bundle: str, image: Path) -> tuple[dict, Path]:
    """POST /infer/<bundle>?image=<id> as a client does (multipart answer): (params, label file)."""
    status, content_type, body = request(f"{server.url}/infer/{bundle}?image={case_name(image)}", method="POST")
    assert status == 200, f"/infer/{bundle}: HTTP {status}: {body[:3000]!r}\n{server.log_tail()}"
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    parts = {part.get_param("name", header="content-disposition"): part for part in message.iter_parts()}
    assert set(parts) == {"params", "image"}, f"unexpected answer parts {sorted(parts)}"
    params = json.loads(parts["params"].get_payload(decode=True))
    label = server.bundles.parent / f"{bundle}_{case_name(image)}_{time.monotonic_ns()}.nii.gz"
    label.write_bytes(parts["image"].get_payload(decode=True))
    return params, label


def assert_label_volume_on_image_grid(label: Path, image: Path, bundle: str) -> None:
    img, seg = nib.load(str(image)), nib.load(str(label))
    assert seg.shape == img.shape
    np.testing.assert_allclose(seg.affine, img.affine, atol=1e-4)
    ref, out = sitk.ReadImage(str(image)), sitk.ReadImage(str(label))
    assert out.GetSize() == ref.GetSize()
    np.testing.assert_allclose(out.GetSpacing(), ref.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(out.GetOrigin(), ref.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(out.GetDirection(), ref.GetDirection(), atol=1e-5)
    values = np.unique(np.asarray(seg.dataobj))
    assert set(values.tolist()) <= {0, *declared_labels(bundle).values()}, f"label values {values}"


def test_info_lists_every_bundle_with_its_labels(server):
    info = server.get_json("/info/")
    assert sorted(info["models"]) == ALL_BUNDLES, "SAM2 or a bundle too many/few: " + str(sorted(info["models"]))
    assert sorted(info["trainers"]) == ALL_BUNDLES
    for bundle in ALL_BUNDLES:
        model = info["models"][bundle]
        assert model["type"] == "segmentation"
        assert model["labels"] == declared_labels(bundle) and model["labels"], f"{bundle}: {model['labels']}"
    assert info["datastore"]["total"] == LABELLED_CASES + 2
    assert info["datastore"]["completed"] == LABELLED_CASES
    assert "Ignore" not in server.log_tail(10**7), "MONAI Label ignored a bundle"


@pytest.mark.parametrize("bundle", ALL_BUNDLES)
def test_infer_returns_a_label_volume_on_the_image_grid(server, bundle):
    offset = server.log.stat().st_size
    params, label = infer(server, bundle, server.images["oblique"])
    assert params["label_names"] == declared_labels(bundle)
    assert_label_volume_on_image_grid(label, server.images["oblique"], bundle)
    # model.pt fits network_def exactly (MONAI Label loads bundles non-strictly and only warns)
    assert "Checkpoint keys don't match" not in server.log.read_bytes()[offset:].decode(errors="replace")


@pytest.mark.parametrize("bundle", ALL_BUNDLES)
def test_short_training_writes_a_model_that_the_server_then_uses(server, bundle):
    from monai.bundle import ConfigParser

    model_path = server.bundles / bundle / "models" / "model.pt"
    before = torch.load(model_path, weights_only=True)
    status, _, body = request(f"{server.url}/train/{bundle}", method="POST",
                              body={"max_epochs": 1, "val_split": 0.2, "multi_gpu": False})
    assert status == 200, f"/train/{bundle}: HTTP {status}: {body[:2000]!r}\n{server.log_tail()}"
    task_id = json.loads(body)["id"]
    deadline = time.monotonic() + TRAIN_TIMEOUT_S
    while True:
        task = next(t for t in server.get_json("/train/?all=true") if t["id"] == task_id)
        if task["status"] not in ("SUBMITTED", "RUNNING"):
            break
        assert time.monotonic() < deadline, f"training {bundle} still {task['status']} after {TRAIN_TIMEOUT_S} s"
        time.sleep(2)
    details = "\n".join(task.get("details") or [])
    assert task["status"] == "DONE", f"training {bundle} ended {task['status']}:\n{details}\n{server.log_tail()}"

    after = torch.load(model_path, weights_only=True)
    parser = ConfigParser()
    parser.read_config(str(BUNDLES / bundle / "configs" / "inference.json"))
    parser.get_parsed_content("network_def").load_state_dict(after)  # strict: every key and shape fits
    assert any(not torch.equal(before[k], after[k]) for k in before), "model.pt was not rewritten by training"
    state = torch.load(server.bundles / bundle / "models" / "training_state.pt", weights_only=True)
    assert state["epoch"] == 1

    # the server picks up the new model.pt for the next request
    offset = server.log.stat().st_size
    params, label = infer(server, bundle, server.images["plain"])
    assert params["label_names"] == declared_labels(bundle)
    assert_label_volume_on_image_grid(label, server.images["plain"], bundle)
    assert "Reload model from cache" in server.log.read_bytes()[offset:].decode(errors="replace")
