"""Bad input through the real CLI entry point (`raysweep.cli.main`): each case is exit 2 with one
message naming what is wrong, never a traceback (an unexpected exception fails the test)."""
import json
import subprocess
import sys

import pytest
import yaml
from conftest import make_cfg

from raysweep.cli import main
from raysweep.core.checkpoint import MANIFEST_FILE, WEIGHTS_FILE, save_checkpoint
from raysweep.core.ensemble import Ensemble
from raysweep.core.models import build_member


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = make_cfg()
    members = [build_member("lenet5", (1, 28, 28), 4, [0.5], [0.5]) for _ in range(2)]
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint", Ensemble(members, None, "probability"),
                           cfg, (1, 28, 28), 4, [0.5], [0.5])


def _damaged(checkpoint, tmp_path, damage) -> str:
    copy = tmp_path / "damaged"
    copy.mkdir()
    for name in (MANIFEST_FILE, WEIGHTS_FILE):
        (copy / name).write_bytes((checkpoint / name).read_bytes())
    damage(copy)
    return str(copy)


def _edit_manifest(**changes):
    def damage(path):
        m = json.loads((path / MANIFEST_FILE).read_text())
        for key, value in changes.items():
            if value is None:
                del m[key]
            else:
                m[key] = value
        (path / MANIFEST_FILE).write_text(json.dumps(m))
    return damage


def _cli(capsys, *args):
    code = main(list(args))
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize("damage, message", [
    (lambda p: (p / WEIGHTS_FILE).write_bytes((p / WEIGHTS_FILE).read_bytes()[:1000]), "not a readable safetensors"),
    (lambda p: (p / WEIGHTS_FILE).write_bytes(b"garbage" * 100), "not a readable safetensors"),
    (lambda p: (p / MANIFEST_FILE).write_text("{not json"), "not valid JSON"),
    (_edit_manifest(arch="vgg99"), "arch 'vgg99' is unknown"),
    (_edit_manifest(arch="small_cnn"), "disagrees with its stored config"),
    (_edit_manifest(k=5, weights=[0.2] * 5), "the manifest says k = 5"),
    (_edit_manifest(k=3), "does not match its 2 member weights"),
    (_edit_manifest(num_classes=None), "field 'num_classes' is missing"),
    (_edit_manifest(image_shape=[3, 32, 32]), "do not fit a lenet5"),
])
def test_damaged_checkpoint_is_one_clear_error(checkpoint, tmp_path, capsys, damage, message):
    code, err = _cli(capsys, "evaluate", _damaged(checkpoint, tmp_path, damage), "--quiet", "--out",
                     str(tmp_path / "ev"))
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("sets, raw, message", [
    (["train.lr=.inf"], {}, "train.lr: Input should be a finite number"),
    (["train.epochs=[1,"], {}, "the value is not valid YAML"),
    ([], {"data": {"synthetic": {"image_shape": [1, 8, 8]}}}, "too small for it"),
    (["--out /proc/raysweep-cannot"], {}, "cannot write there"),
])
def test_bad_train_input_is_one_clear_error(tmp_path, capsys, sets, raw, message):
    cfg = make_cfg(**raw).model_dump(mode="json")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    args = [a for s in sets for a in (s.split(" ") if s.startswith("--") else ["--set", s])]
    code, err = _cli(capsys, "train", str(path), "--no-mlflow", "--quiet", *(["--out", str(tmp_path / "r")]
                                                                             if "--out" not in args else []), *args)
    assert code == 2 and message in err, err
    assert not (tmp_path / "r" / "checkpoint").exists()


@pytest.mark.parametrize("address, message", [
    ("not-an-address", "expected HOST:PORT"),
    ("127.0.0.1:9", "no Ray head answers there"),
])
def test_bad_ray_address_fails_at_once(tmp_path, address, message):
    cfg = {**make_cfg().model_dump(mode="json"),
           "search": {"objective": "clean_acc", "samples": 1, "params": {"train.lr": {"uniform": [0.001, 0.01]}}}}
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(cfg))
    res = subprocess.run([sys.executable, "-m", "raysweep", "sweep", str(tmp_path / "space.yaml"), "--out",
                          str(tmp_path / "o"), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}", "--address",
                          address], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr, res.stderr[-3000:]
    # Checked before any side effect: no sweep folder and no MLflow store left behind (and no 5 s migration)
    assert not (tmp_path / "o").exists() and not (tmp_path / "m.db").exists()
