"""Failures and bad input (issue 16): nothing a user owns is destroyed, every expected failure is one line naming
the culprit with a non-zero exit, checks run before work, the promotion gate fails closed. Fast tests: the
built-in demo data, the shipped model, stage subprocesses without Ray or an MLflow server."""

from __future__ import annotations

import io
import json
import os
import resource
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from cs2fusion import storage
from cs2fusion.checkpoint import load_checkpoint
from cs2fusion.cli import app
from cs2fusion.config import ModelParams, Params, ParamsError, build, load_params
from cs2fusion.data.manifest import build_manifest, read_manifest
from cs2fusion.data.shards import iter_eval, read_samples, set_files, write_shards
from cs2fusion.inference import FuseOptions, Fuser
from cs2fusion.io import OUTPUT_MARKER, InputError, read_image
from cs2fusion.metrics import MAIN_METRICS, psnr
from cs2fusion.model import Backbone
from cs2fusion.pretrained import DEFAULT_MODEL
from tests.conftest import DATA, REPO, free_port, started, synth_pairs
from tests.tiny import env

DEMO = {"prepare": {"datasets": [{"name": "demo", "root": "data/demo", "ratio": {"train": 0.5, "test": 0.5}}]},
        "shard": {"train": ["demo/train"], "eval": ["demo/test"], "patch_size": 32, "stride": 32,
                  "max_samples_per_shard": 8, "shard_multiple": 2},
        "evaluate": {"primary_set": "demo/test"}, "fuse": {"published": ""}}


def _project(tmp: Path, **sections: dict) -> Path:
    """A tiny project: 4 demo pairs, its params.yaml, the manifest and the shards (through the library)."""
    assert CliRunner().invoke(app, ["synth", "--out", str(tmp / "data" / "demo"), "--pairs", "4", "--width", "64",
                                    "--height", "48"]).exit_code == 0
    params = {**DEMO, **sections}
    (tmp / "params.yaml").write_text(yaml.safe_dump(params))
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        p = load_params("params.yaml")
        manifest = build_manifest(p.prepare)
        (tmp / "data" / "manifest.json").write_text(json.dumps(manifest))
        write_shards(manifest, p.shard, tmp / "data" / "shards")
    finally:
        os.chdir(cwd)
    return tmp


def _stage(folder: Path, module: str, *args: str, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"pipeline.{module}", *args], cwd=folder, env=env(**extra),
                          capture_output=True, text=True, timeout=300)


def _one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-2000:]
    for needle in needles:
        assert needle in errors[0], errors[0]


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# 1, 2: outputs never alias, hold or replace what the stage did not write


def test_stage_out_never_replaces_inputs_or_foreign_folders(tmp_path: Path) -> None:
    proj = _project(tmp_path)
    model = str(DEFAULT_MODEL)
    before = _tree(proj / "data")
    _one_line_error(_stage(proj, "shard", "--manifest", "data/manifest.json", "--out", "data"), "data")
    _one_line_error(_stage(proj, "fuse", "--model", model, "--shards", "data/shards", "--out", "data/shards"),
                    "input")
    mine = proj / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    _one_line_error(_stage(proj, "fuse", "--model", model, "--shards", "data/shards", "--out", "mine"),
                    "not an earlier output of the fuse stage")
    assert _tree(proj / "data") == before and (mine / "notes.txt").read_text() == "keep me"
    # an earlier output of the same stage is replaced as a whole, with the modes the umask gives
    for _ in range(2):
        assert _stage(proj, "fuse", "--model", model, "--shards", "data/shards", "--out", "fused").returncode == 0
    assert (proj / "fused" / OUTPUT_MARKER).read_text().strip() == "fuse"
    png = next((proj / "fused").rglob("*.png"))
    mask = os.umask(0o022)
    os.umask(mask)
    assert png.stat().st_mode & 0o777 == 0o666 & ~mask and (proj / "fused").stat().st_mode & 0o777 == 0o777 & ~mask


def test_cli_write_failures_are_one_line_and_leave_nothing(tmp_path: Path) -> None:
    proj = _project(tmp_path)
    demo = proj / "data" / "demo"
    args = ["fuse", "--ir", str(demo / "ir"), "--vi", str(demo / "vi")]
    (tmp_path / "a_file").write_text("")
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "a_file")])
    assert result.exit_code == 2 and "not a folder" in result.output, result.output
    # the file system refuses a write midway (a file size limit here, as a full disk would): the small first
    # output was written, the next one fails; nothing of the run is left behind
    for kind in ("ir", "vi"):
        Image.fromarray(np.full((4, 4), 9, np.uint8)).save(demo / kind / "a0.png")
    out = tmp_path / "out"

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))

    proc = subprocess.run([sys.executable, "-m", "cs2fusion", *args, "--out", str(out)], env=env(),
                          capture_output=True, text=True, timeout=300, preexec_fn=small_files)
    _one_line_error(proc, str(out))
    assert not [p for p in out.rglob("*") if p.is_file()], list(out.rglob("*"))


# 3: ids that become file names, tar member names


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _sample(name: str, pair_id: str = "x") -> list[tuple[str, bytes]]:
    pixels = _png(np.zeros((8, 8), np.uint8))
    return [(f"{name}.ir.png", pixels), (f"{name}.json", json.dumps({"id": pair_id}).encode()),
            (f"{name}.vi.png", pixels)]


@pytest.mark.parametrize("members, named", [
    (_sample("k", "../../../../x/ESCAPED"), "unsafe id"),
    (_sample("/x/abs"), "unsafe member name"),
    (_sample("../../dd"), "unsafe member name"),
    ([*_sample("k"), *_sample("j"), *_sample("k")], "appears twice"),
])
def test_unsafe_shards_are_refused_naming_the_shard(members: list[tuple[str, bytes]], named: str,
                                                    tmp_path: Path) -> None:
    shard = tmp_path / "bad.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(InputError, match=named) as err:
        list(iter_eval([str(shard)]))
    assert str(shard) in str(err.value)


def test_colliding_ids_get_distinct_keys(tmp_path: Path) -> None:
    demo = tmp_path / "ids"
    for kind in ("ir", "vi"):
        (demo / kind).mkdir(parents=True)
        for name, level in (("p.1", 100), ("p_1", 200)):
            Image.fromarray(np.full((40, 40), level, np.uint8)).save(demo / kind / f"{name}.png")
    p = build(Params, {"prepare": {"datasets": [{"name": "d", "root": str(demo)}]}, "shard": {"eval": ["d/test"]}})
    write_shards(build_manifest(p.prepare), p.shard, tmp_path / "shards")
    samples = list(read_samples(set_files(tmp_path / "shards", "d/test")))
    assert len({s["__key__"] for s in samples}) == 2
    assert sorted(meta["id"] for meta, _, _ in iter_eval(set_files(tmp_path / "shards", "d/test"))) == ["p.1", "p_1"]


# 8: shard checksums


def test_a_flipped_bit_in_a_shard_is_caught_and_named(tmp_path: Path) -> None:
    proj = _project(tmp_path)
    shard = Path(set_files(proj / "data" / "shards", "demo/test")[0])
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(time.time_ns(), time.time_ns() + 1))
    with pytest.raises(InputError, match="sha256 differs") as err:
        set_files(proj / "data" / "shards", "demo/test")
    assert str(shard) in str(err.value)
    _one_line_error(_stage(proj, "fuse", "--model", str(DEFAULT_MODEL), "--shards", "data/shards", "--out", "fused"),
                    shard.name)


def _corrupt_member(shards: Path, set_name: str, suffix: str) -> str:
    """Breaks the body of the first ``suffix`` member of the set's first shard and records the new sha256 in
    shards.json (a shard written corrupt: its checksum matches). Returns the member's name."""
    import hashlib
    import tarfile

    shard = Path(set_files(shards, set_name)[0])
    data = bytearray(shard.read_bytes())
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(suffix))
    data[member.offset_data + 40:member.offset_data + member.size - 20] = bytes(member.size - 60)
    shard.write_bytes(bytes(data))
    index = json.loads((shards / "shards.json").read_text())
    for entry in index["sets"][set_name]["shards"]:
        if entry["file"] == shard.name:
            entry["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    (shards / "shards.json").write_text(json.dumps(index))
    return f"{shard.name}: member {member.name}"


def test_a_corrupt_member_whose_checksum_matches_is_one_line_from_every_stage(tmp_path: Path) -> None:
    """A member written corrupt passes the shard's checksum and fails on decoding: every stage that decodes it stops
    with one line naming the shard and the member (was: a raw exception repr from fuse and evaluate, a 33-line
    WorkerGroupError from train after the workers' retries)."""
    from ray.train import WorkerGroupError

    from pipeline.train import worker_input_error

    proj = _project(tmp_path, train={"val_set": "demo/test", "batch_size": 2})
    shards = proj / "data" / "shards"
    named = _corrupt_member(shards, "demo/test", ".vi.png")
    with pytest.raises(InputError) as err:
        list(iter_eval(set_files(shards, "demo/test")))
    assert named in str(err.value) and "not a readable PNG" in str(err.value)
    fuse = ("fuse", "--model", str(DEFAULT_MODEL), "--shards", "data/shards", "--out", "fused")
    _one_line_error(_stage(proj, *fuse), named)
    _one_line_error(_stage(proj, "train", "--shards", "data/shards", "--out", "m.safetensors"), named)  # preflight
    (proj / "fused").mkdir()
    _one_line_error(_stage(proj, "evaluate", "--fused", "fused", "--shards", "data/shards", "--model",
                           str(DEFAULT_MODEL), "--metrics", "m.json", "--report", "report"), named)
    # a training member fails inside a Ray worker: the stage re-raises the worker's one line, not Ray's report
    failed = WorkerGroupError("rank 0: Traceback …", {0: InputError(f"x/{named} is not a readable PNG")})
    assert str(worker_input_error(failed)) == f"x/{named} is not a readable PNG"
    assert worker_input_error(WorkerGroupError("rank 0: …", {0: RuntimeError("nan loss")})) is None


# 9: input_scale


@pytest.mark.parametrize("scale", [1.0, 255.0])
def test_inference_honours_input_scale(scale: float) -> None:
    torch.manual_seed(0)
    backbone = Backbone(ModelParams(input_scale=scale)).eval()
    vis_y, ir = synth_pairs(1, 40, 56)[0]
    with torch.no_grad():  # the training path's forward: [0, 1] in, the scale applied inside
        want = backbone(vis_y=torch.from_numpy(vis_y / 255.0)[None, None].float(),
                        ir=torch.from_numpy(ir / 255.0)[None, None].float()).fused[0, 0].numpy() * 255.0
    for fast in (False, True):
        got = Fuser(backbone, options=FuseOptions(fast=fast)).fuse_y(vis_y=vis_y, ir=ir)
        np.testing.assert_allclose(got, want, atol=2e-3 * max(1.0, float(np.abs(want).max())), err_msg=f"fast={fast}")


# 10: checkpoints


def _edit(src: Path, dst: Path, meta=None, tensors=None) -> Path:
    from safetensors import safe_open

    with safe_open(str(src), framework="pt") as f:
        raw = f.metadata()["cs2fusion"]
    t = load_file(str(src))
    if tensors:
        t = tensors(t)
    save_file(t, str(dst), metadata={"cs2fusion": meta(raw) if meta else raw})
    return dst


def _renamed(t: dict) -> dict:
    key = next(iter(t))
    return {**{k: v for k, v in t.items() if k != key}, key + "_x": t[key]}


def _nan(t: dict) -> dict:
    key = next(k for k in t if k.startswith("backbone.") and t[k].is_floating_point())
    bad = t[key].clone()
    bad.view(-1)[0] = float("nan")
    return {**t, key: bad}


@pytest.mark.parametrize("meta, tensors, named", [
    (lambda raw: raw[:-5], None, "not valid JSON"),
    (lambda raw: "[1, 2]", None, "model block"),
    (lambda raw: json.dumps({k: v for k, v in json.loads(raw).items() if k != "model"}), None, "model block"),
    (lambda raw: json.dumps({**json.loads(raw), "model": {**json.loads(raw)["model"], "channels": 32}}), None,
     "needs"),
    (lambda raw: json.dumps({**json.loads(raw), "model": {**json.loads(raw)["model"], "depth": 3}}), None,
     "unknown key"),
    (lambda raw: json.dumps({**json.loads(raw), "model": {**json.loads(raw)["model"], "norm_scope": "x"}}), None,
     "is not one of"),
    (None, _renamed, "do not match"),
    (None, _nan, "NaN"),
    (None, lambda t: {k: v.half() for k, v in t.items()}, "float16"),
])
def test_bad_checkpoints_are_one_line(meta, tensors, named: str, tmp_path: Path) -> None:
    bad = _edit(DEFAULT_MODEL, tmp_path / "bad.safetensors", meta, tensors)
    with pytest.raises(InputError, match=named):
        load_checkpoint(bad)
    demo = tmp_path / "demo"
    CliRunner().invoke(app, ["synth", "--out", str(demo), "--pairs", "1", "--width", "32", "--height", "32"])
    result = CliRunner().invoke(app, ["fuse", "--model", str(bad), "--ir", str(demo / "ir"), "--vi",
                                      str(demo / "vi"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "bad.safetensors" in result.output, \
        result.output


# 11, 14: params


@pytest.mark.parametrize("section, values, named", [
    ("train", {"epochs": -1}, "epochs"), ("train", {"epochs": 0}, "epochs"), ("train", {"batch_size": 0}, "batch"),
    ("train", {"scaling": {"num_workers": 0}}, "num_workers"),
    ("train", {"batch_size": 2, "scaling": {"num_workers": [1, 3]}}, "every worker holds a sample"),
    ("train", {"run_name": "../x"}, "run_name"), ("shard", {"stride": 0}, "stride"),
    ("shard", {"max_samples_per_shard": 0}, "max_samples"), ("shard", {"shard_multiple": 0}, "shard_multiple"),
    ("shard", {"patch_size": -5}, "patch_size"), ("train", {"val_set": "nope/test"}, "val_set"),
    ("evaluate", {"primary_set": "foo/bar"}, "primary_set"), ("register", {"gate_metrics": ["FOO"]}, "FOO"),
    ("register", {"gate_metrics": ["MSE"]}, "MSE"), ("register", {"min_wins": 99}, "min_wins"),
    ("model", {"input_scale": 0}, "input_scale"), ("train", {"val_every": 2, "checkpoint_every": 1}, "val_every"),
    ("train", {"select": "PSNR"}, "select"), ("train", {"keep": "first"}, "keep"),
    ("train", {"precision": "fp16"}, "precision"),
])
def test_nonsense_params_fail_at_load(section: str, values: dict, named: str, tmp_path: Path) -> None:
    params = {**DEMO, section: {**DEMO.get(section, {}), **values}}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(ParamsError, match=named):
        load_params(path)


@pytest.mark.parametrize("text, named", [("train: [unclosed", "not valid YAML"), (None, "no such params file")])
def test_params_file_problems_are_one_line(text: str | None, named: str, tmp_path: Path) -> None:
    if text is not None:
        (tmp_path / "p.yaml").write_text(text)
    _one_line_error(_stage(tmp_path, "prepare", "--params", "p.yaml", "--out", "m.json"), named)


def test_missing_list_file_and_stale_manifest_are_one_line(tmp_path: Path) -> None:
    proj = _project(tmp_path)
    params = {**DEMO, "prepare": {"datasets": [{"name": "demo", "root": "data/demo", "lists": {"train": "nope.txt"}}]}}
    (proj / "p.yaml").write_text(yaml.safe_dump(params))
    _one_line_error(_stage(proj, "prepare", "--params", "p.yaml", "--out", "m.json"), "nope.txt")
    (proj / "old.json").write_text(json.dumps({"version": 1, "datasets": {}}))
    with pytest.raises(InputError, match="rerun the prepare stage"):
        read_manifest(proj / "old.json")


def test_evaluate_checks_before_touching_its_report(tmp_path: Path) -> None:
    proj = _project(tmp_path)
    assert _stage(proj, "fuse", "--model", str(DEFAULT_MODEL), "--shards", "data/shards", "--out", "fused"
                  ).returncode == 0
    (proj / "report").mkdir()
    (proj / "report" / "mine.txt").write_text("keep")
    args = ["--fused", "fused", "--shards", "data/shards", "--model", str(DEFAULT_MODEL), "--metrics", "m.json",
            "--report", "report"]
    _one_line_error(_stage(proj, "evaluate", *args), "not an earlier output of the evaluate stage")
    assert (proj / "report" / "mine.txt").read_text() == "keep" and not (proj / "m.json").exists()


# 12: the leak check compares pixels


def test_reencoded_training_pairs_are_a_leak(tmp_path: Path) -> None:
    proj = _project(tmp_path)
    manifest = read_manifest(proj / "data" / "manifest.json")
    copy = proj / "copy"
    for entry in manifest["datasets"]["demo"]["pairs"]:  # every pair: whichever the split, two are training pairs
        for kind in ("ir", "vi"):
            (copy / kind).mkdir(parents=True, exist_ok=True)
            Image.open(proj / entry[kind]).save(copy / kind / f"c{entry['id']}.png", compress_level=1)
    assert (copy / "ir" / f"c{entry['id']}.png").read_bytes() != (proj / entry["ir"]).read_bytes()
    p = build(Params, {"prepare": {"datasets": [{"name": "demo", "root": str(proj / "data" / "demo"),
                                                 "ratio": {"train": 0.5, "test": 0.5}},
                                                {"name": "copy", "root": str(copy)}]},
                       "shard": {"train": ["demo/train"], "eval": ["copy/test"], "patch_size": 32, "stride": 32}})
    with pytest.raises(InputError, match="same pixels"):
        write_shards(build_manifest(p.prepare), p.shard, tmp_path / "shards")


# 13: no long waits on an unreachable tracking server


def test_unreachable_registry_fails_fast(tmp_path: Path) -> None:
    demo = tmp_path / "demo"
    CliRunner().invoke(app, ["synth", "--out", str(demo), "--pairs", "1", "--width", "32", "--height", "32"])
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "cs2fusion", "fuse", "--model", "models:/nope@champion", "--ir",
                           str(demo / "ir"), "--vi", str(demo / "vi"), "--out", str(tmp_path / "o")],
                          env=env(MLFLOW_TRACKING_URI=f"http://127.0.0.1:{free_port()}"), capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert time.monotonic() - start < 30
    _one_line_error(proc, "not reachable")
    proc = subprocess.run([sys.executable, "-m", "cs2fusion", "fuse", "--model", "models:/nope@champion", "--ir",
                           str(demo / "ir"), "--vi", str(demo / "vi"), "--out", str(tmp_path / "o")],
                          env=env(), capture_output=True, text=True, timeout=120, cwd=tmp_path)
    _one_line_error(proc, "MLFLOW_TRACKING_URI")
    assert not (tmp_path / "mlflow.db").exists()  # no store created by asking


def test_readme_serves_on_loopback() -> None:
    text = (REPO / "README.md").read_text()
    assert "0.0.0.0" not in text and "--host 127.0.0.1" in text


# 14: the rest


def test_dangling_symlink_is_named_as_such(tmp_path: Path) -> None:
    demo = tmp_path / "demo"
    CliRunner().invoke(app, ["synth", "--out", str(demo), "--pairs", "2", "--width", "32", "--height", "32"])
    (demo / "ir" / "demo002.png").unlink()
    (demo / "ir" / "demo002.png").symlink_to(tmp_path / "gone.png")
    result = CliRunner().invoke(app, ["fuse", "--ir", str(demo / "ir"), "--vi", str(demo / "vi"), "--out",
                                      str(tmp_path / "o")])
    assert result.exit_code == 2 and "broken symbolic link" in result.output and "demo002.png" in result.output


def test_psnr_of_a_black_image_does_not_crash() -> None:
    ir = np.full((8, 8), 50, np.uint8)
    assert psnr(np.zeros((8, 8), np.uint8), ir, ir) == -np.inf
    assert psnr(ir, ir, ir) == np.inf


def test_output_files_follow_the_umask(tmp_path: Path) -> None:
    demo = tmp_path / "demo"
    CliRunner().invoke(app, ["synth", "--out", str(demo), "--pairs", "1", "--width", "32", "--height", "32"])
    mask = os.umask(0o027)
    try:
        result = CliRunner().invoke(app, ["fuse", "--ir", str(demo / "ir"), "--vi", str(demo / "vi"), "--out",
                                          str(tmp_path / "o")])
    finally:
        os.umask(mask)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "o" / "demo001.png").stat().st_mode & 0o777 == 0o640
    assert read_image(tmp_path / "o" / "demo001.png").shape == (32, 32, 3)


# 6: the promotion gate fails closed


GOOD = {m: 1.0 for m in MAIN_METRICS}
ON = {"set": "rs40/test", "metrics": "mmif-cddfuse-1"}


def _champion(evaluation: dict | None = GOOD, judged_on: dict | None = ON, version: str = "1") -> tuple:
    tags = {}
    if evaluation is not None:
        tags["evaluation"] = json.dumps(evaluation)
    if judged_on is not None:
        tags["judged_on"] = json.dumps(judged_on)
    return version, tags


@pytest.mark.parametrize("champion, promoted, reason", [
    ((None, None), True, "no champion"),
    (_champion(), False, "won 0 of 9"),
    (_champion({m: 0.5 for m in MAIN_METRICS}), True, "won 9 of 9"),
    (_champion(evaluation=None), False, "no readable evaluation"),
    (_champion(evaluation={"EN": 0.1}), False, "no readable evaluation"),
    (("1", {"evaluation": "{not json", "judged_on": json.dumps(ON)}), False, "no readable evaluation"),
    (_champion({m: 0.5 for m in MAIN_METRICS}, judged_on=None), False, "no readable evaluation"),
    (_champion({m: 0.5 for m in MAIN_METRICS}, judged_on={**ON, "set": "other/test"}), False, "not comparable"),
])
def test_gate_fails_closed(champion: tuple, promoted: bool, reason: str) -> None:
    from pipeline.registry import judge

    decision = judge(GOOD, ON, champion, list(MAIN_METRICS), 5)
    assert decision["promoted"] is promoted and reason in decision["reason"], decision
    assert decision["judged_on"] == ON


def test_gate_metrics_are_checked_before_registering(tmp_path: Path) -> None:
    from pipeline.mlflow_adapter import Tracker
    from pipeline.registry import register

    tracker = Tracker(f"http://127.0.0.1:{free_port()}", "run")  # never reached: the check comes first
    with pytest.raises(InputError, match="no \\['SSIM'\\]"):
        register(tracker, DEFAULT_MODEL, name="m", evaluation={m: 1.0 for m in MAIN_METRICS if m != "SSIM"},
                 judged_on=ON, gate_metrics=list(MAIN_METRICS), min_wins=5, card="", tags={})


# 4, 5, 7: runs are moved aside, never deleted; logging that cannot reach the server is kept


@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.cluster)])
def test_previous_runs_are_resumed_or_moved_aside(where: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """The same on a local folder and in an object store (``train.storage_path: s3://…``)."""
    from pipeline.train import CODE_FILE, FINGERPRINT_FILE, RUN_ID_FILE, plan_run

    run = storage.join(tmp_path if where == "local" else request.getfixturevalue("s3"), "runs", "train")
    assert plan_run(run, "auto", "f1") == (False, None)
    with pytest.raises(InputError, match="nothing to resume"):
        plan_run(run, "must", "f1")
    storage.write_text(storage.join(run, RUN_ID_FILE), "r1")
    storage.write_text(storage.join(run, FINGERPRINT_FILE), "f1\n")
    storage.write_text(storage.join(run, CODE_FILE), "c1\n")
    storage.write_text(storage.join(run, "checkpoint_000", "model.safetensors"), "weights")
    assert plan_run(run, "auto", "f1", "c1") == (True, None) and plan_run(run, "must", "f1", "c1") == (True, None)
    with pytest.raises(InputError, match="other params"):
        plan_run(run, "must", "f2", "c1")
    # changed training code: "must" carries the run on (and records the new code), "auto" moves it aside
    assert plan_run(run, "must", "f1", "c2") == (True, None)
    assert storage.read_text(storage.join(run, CODE_FILE)).strip() == "c2"
    resume, aside = plan_run(run, "auto", "f1", "c3")
    assert not resume and storage.read_text(storage.join(aside, "checkpoint_000", "model.safetensors")) == "weights"
    storage.move(aside, run)
    resume, aside = plan_run(run, "auto", "f2")
    assert not resume and not storage.exists(run) and aside.startswith(run + ".")
    assert storage.read_text(storage.join(aside, "checkpoint_000", "model.safetensors")) == "weights"


def test_a_knob_added_at_its_default_keeps_a_runs_fingerprint(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fingerprint holds only what differs from the defaults: after a new knob joins the params (here a loss
    weight), a run written before it, at its default, is the same run; a value other than the default is another."""
    import dataclasses

    import pipeline.train
    from cs2fusion.config import LossParams, TrainParams
    from pipeline.train import fingerprint

    params = load_params(REPO / "presets" / "roadscene" / "params.yaml")
    before = fingerprint(params, "0" * 64)
    later = dataclasses.make_dataclass("LaterLoss", [("new_weight", float, 0.0)], bases=(LossParams,), frozen=True)
    monkeypatch.setattr(pipeline.train, "Params", lambda: Params(train=TrainParams(loss=later())))

    def with_new(value: float) -> Params:
        loss = later(**dataclasses.asdict(params.train.loss), new_weight=value)
        return dataclasses.replace(params, train=dataclasses.replace(params.train, loss=loss))

    assert fingerprint(with_new(0.0), "0" * 64) == before
    assert fingerprint(with_new(0.5), "0" * 64) != before


def test_a_run_resumes_on_another_cluster_shape(tmp_path: Path) -> None:
    """Any cluster shape trains the same model: the worker count (or range), GPU, threads and the tracking knobs leave
    the fingerprint as it is, so the run resumes; a change of the step (here the batch) is another run."""
    import dataclasses

    from cs2fusion.config import RunTrackingParams, ScalingParams
    from pipeline.train import FINGERPRINT_FILE, RUN_ID_FILE, fingerprint, plan_run

    params = load_params(REPO / "params.yaml")  # starts from the shipped model
    params = dataclasses.replace(params, train=dataclasses.replace(params.train,
                                                                   init_from=str(REPO / params.train.init_from)))
    shape = dataclasses.replace(params.train, scaling=ScalingParams(num_workers=(1, 8), use_gpu=True,
                                                                    cpus_per_worker=4.0, threads_per_worker=4,
                                                                    loader_workers=3),
                                tracking=RunTrackingParams(experiment="elsewhere", log_every=1))
    other = dataclasses.replace(params, train=shape)
    assert fingerprint(other, "0" * 64) == fingerprint(params, "0" * 64)
    run = tmp_path / "run"
    run.mkdir()
    (run / FINGERPRINT_FILE).write_text(fingerprint(params, "0" * 64) + "\n")
    (run / RUN_ID_FILE).write_text("abc\n")
    assert plan_run(run, "must", fingerprint(other, "0" * 64)) == (True, None)
    batch = dataclasses.replace(params, train=dataclasses.replace(params.train, batch_size=32))
    assert fingerprint(batch, "0" * 64) != fingerprint(params, "0" * 64)


def test_a_run_resumed_where_its_mlflow_run_is_unknown_continues_in_a_linked_run(tmp_path: Path) -> None:
    """A run's state carried to another machine (e.g. pulled from a DVC remote) names an MLflow run that store lacks:
    the stage opens a new run tagged ``continues_run`` and stores its id beside the checkpoints; evaluate and
    register, given a model whose training run the store lacks, log to a new run tagged ``model_run``."""
    from mlflow.tracking import MlflowClient

    from pipeline.mlflow_adapter import Tracker, model_run, run_status
    from pipeline.train import RUN_ID_FILE, _new_tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert run_status(Tracker(uri, "0123456789abcdef0123456789abcdef")) is None
    params = build(Params, {"tracking": {"artifact_root": str(tmp_path / "artifacts")}})
    run_dir = str(tmp_path / "runs" / "train")
    tracker = _new_tracker(params, uri, tmp_path, "ab" * 32, run_dir, continues="0123456789abcdef")
    assert run_status(tracker) == "RUNNING"
    assert storage.read_text(storage.join(run_dir, RUN_ID_FILE)) == tracker.run_id
    tags = MlflowClient(uri).get_run(tracker.run_id).data.tags
    assert tags["continues_run"] == "0123456789abcdef" and tags["storage"] == run_dir
    # evaluate and register log to the model's training run, or (a model pulled from elsewhere) to a linked new run
    assert model_run(uri, tracker.run_id, "cs2fusion", None, "evaluate").run_id == tracker.run_id
    elsewhere = model_run(uri, "0123456789abcdef0123456789abcdef", "cs2fusion", None, "evaluate")
    tags = MlflowClient(uri).get_run(elsewhere.run_id).data.tags
    assert elsewhere.run_id != tracker.run_id and tags["model_run"] == "0123456789abcdef0123456789abcdef"
    # a union evaluation set's name (a/x+b/y) in a metric key: MLflow refuses "+", so it is spelled as the shards do
    elsewhere.metrics({"eval/roadscene/val+msrs/val/EN": 6.5}, step=0)
    logged = MlflowClient(uri).get_run(elsewhere.run_id).data.metrics
    assert logged == {"eval/roadscene/val_and_msrs/val/EN": 6.5}


def test_the_kept_checkpoint_is_the_best_scored_or_the_last() -> None:
    """``train.keep``: best = highest ``val/score`` among Ray's kept checkpoints (a tie goes to the later epoch); last
    = Ray's latest; without scores, the latest. The metadata's reason names the epoch and the score."""
    import types

    from pipeline.train import _final_checkpoint

    metrics = [{"epoch": 1, "val/score": 0.9}, {"epoch": 2, "val/score": 0.7}, {"epoch": 3, "val/score": 0.8}]
    result = types.SimpleNamespace(best_checkpoints=[(f"ckpt{m['epoch']}", m) for m in metrics],
                                   checkpoint="ckpt3", metrics=metrics[-1])
    from cs2fusion.config import TrainParams

    train = TrainParams(val_set="x/test", epochs=3)
    assert _final_checkpoint(result, train) == ("ckpt1", "best val/score (composite) 0.9000 at epoch 1 of 3")
    last = TrainParams(val_set="x/test", epochs=3, keep="last")
    assert _final_checkpoint(result, last) == ("ckpt3", "last epoch (3 of 3)")
    unscored = types.SimpleNamespace(best_checkpoints=[("ckpt3", {"epoch": 3})], checkpoint="ckpt3",
                                     metrics={"epoch": 3})
    assert _final_checkpoint(unscored, train)[0] == "ckpt3"


def test_composite_score_is_the_mean_ratio_to_the_pixel_mean_fusion_and_copies_score_0() -> None:
    from typing import get_args, get_type_hints

    from cs2fusion.config import TrainParams
    from cs2fusion.validation import SELECTABLE, selection_score

    baseline = {**{m: float(k + 1) for k, m in enumerate(MAIN_METRICS)}, "corr_ir": 0.8, "corr_vis": 0.5}
    doubled = {**{m: 2 * baseline[m] for m in MAIN_METRICS}, "corr_ir": 0.5, "corr_vis": 0.6}
    assert selection_score(doubled, baseline, "composite") == pytest.approx(2.0)
    assert selection_score({**baseline, "Qabf": 3.5}, baseline, "Qabf") == 3.5
    # a copy of the infrared image (the full recipe's epoch 2 with norm_scope batch: 0.993 / -0.018) is no fusion
    assert selection_score({**doubled, "corr_ir": 0.993, "corr_vis": -0.018}, baseline, "composite") == 0.0
    assert set(SELECTABLE) == set(get_args(get_type_hints(TrainParams)["select"]))


@pytest.mark.data
def test_selection_stats_tell_a_selection_from_a_blend() -> None:
    """On real pairs: the pixel maximum is all "near the brighter source", the pixel mean all "between"; the paper's
    own outputs select (the gap issue 17 measured: ~0.95 near the brighter source, ~3 grey levels from the max)."""
    from cs2fusion.metrics import grey_like_reference
    from cs2fusion.validation import mean_scores, selection_stats

    root = DATA / "cs2fusion_roadscene40"
    rows = {"max": [], "mean": [], "published": []}
    for name in ("1.png", "10.png", "20.png"):
        ir, vi, pub = (grey_like_reference(read_image(root / d / name)) for d in ("ir", "vi", "fused_published"))
        rows["max"].append(selection_stats(np.maximum(ir, vi), ir, vi))
        rows["mean"].append(selection_stats((ir + vi) / 2, ir, vi))
        rows["published"].append(selection_stats(pub, ir, vi))
    top, mid, pub = (mean_scores(rows[k]) for k in ("max", "mean", "published"))
    assert (top["near_brighter"], top["near_darker"], top["between"], top["dist_max"]) == (1.0, 0.0, 0.0, 0.0)
    assert (mid["near_brighter"], mid["between"]) == (0.0, 1.0) and mid["dist_max"] > 5
    assert pub["near_brighter"] > 0.85 and pub["between"] < 0.1 and pub["dist_max"] < 5
    same = selection_stats(ir, ir, ir)  # nothing to select between: undefined shares, not a score
    assert np.isnan(same["near_brighter"]) and np.isnan(same["between"]) and same["dist_max"] == 0.0


def test_unsent_metrics_are_spilled_not_lost(tmp_path: Path) -> None:
    from pipeline.mlflow_adapter import BufferedTracker, Tracker, quick_http

    quick_http()
    spill = tmp_path / "unlogged.jsonl"
    buffered = BufferedTracker(Tracker(f"http://127.0.0.1:{free_port()}", "run"), spill)
    start = time.monotonic()
    for step in range(3):
        buffered.metrics({"loss": float(step)}, step=step)  # returns at once: the sender thread does the waiting
    assert time.monotonic() - start < 1
    assert not buffered.drain(1.0)  # an epoch's end waits a bounded time for an unreachable server, then trains on
    assert buffered.close(timeout_s=2) == 3
    lines = [json.loads(line) for line in spill.read_text().splitlines()]
    assert [(x["data"], x["step_or_folder"]) for x in lines] == [({"loss": float(s)}, s) for s in range(3)]


def test_drain_returns_once_the_buffered_metrics_are_in_the_store(tmp_path: Path) -> None:
    """What the epoch's end relies on before it reports (a sweep's scheduler may stop the trial right after)."""
    from mlflow.tracking import MlflowClient

    from pipeline.mlflow_adapter import BufferedTracker, new_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    buffered = BufferedTracker(new_run(uri, "e", str(tmp_path / "artifacts"), "r"), tmp_path / "spill.jsonl")
    for step in range(3):
        buffered.metrics({"val/score": float(step)}, step=step)
    assert buffered.drain(30)
    history = MlflowClient(uri).get_metric_history(buffered.run_id, "val/score")
    assert sorted((m.step, m.value) for m in history) == [(s, float(s)) for s in range(3)]
    assert buffered.close(timeout_s=5) == 0


def test_cluster_preflight_names_every_local_store(monkeypatch: pytest.MonkeyPatch) -> None:
    """Attached to a cluster, a local MLflow store, run folder or shard path is refused in one line (before Ray
    starts), unless ``cluster.shared_fs`` says every node mounts them; object stores and servers pass."""
    from pipeline.cluster import FORWARDED_ENV, check_stores, runtime_env

    for key in (*FORWARDED_ENV, "RAY_ADDRESS", "RAY_JOB_CONFIG_JSON_ENV_VAR"):
        monkeypatch.delenv(key, raising=False)
    params = Params()
    local = {"shards": "/data/shards", "tracking_uri": "sqlite:////x/mlflow.db", "storage_path": "/x/runs"}
    check_stores(params, **local)  # not attached: a local run may use anything
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    with pytest.raises(InputError) as err:
        check_stores(params, **local)
    line = str(err.value)
    assert "\n" not in line and all(v in line for v in local.values()) and "cluster.shared_fs" in line
    check_stores(build(Params, {"cluster": {"shared_fs": True}}), **local)
    check_stores(params, shards="s3://b/shards", tracking_uri="http://mlflow:5000", storage_path="s3://b/runs")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    shipped = runtime_env()
    assert {Path(m).name for m in shipped["py_modules"]} == {"cs2fusion", "pipeline"}
    assert shipped["env_vars"] == {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "AWS_SECRET_ACCESS_KEY": "secret"}
    # inside `ray job submit --working-dir . --runtime-env-json '{"env_vars": …}'`: nothing the job already sets
    job = {"runtime_env": {"py_modules": ["s3://b/code.zip"], "env_vars": {"MLFLOW_TRACKING_URI": "http://x"}}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    assert runtime_env() == {"env_vars": {"AWS_SECRET_ACCESS_KEY": "secret"}}


# issue 38: an empty params file, a moved checkout

STAGE_ARGS = {  # every stage of dvc.yaml (and the presets' ship), with its arguments
    "synth": [], "prepare": ["--out", "data/manifest.json"],
    "shard": ["--manifest", "data/manifest.json", "--out", "data/shards"],
    "train": ["--shards", "data/shards", "--out", "models/model.safetensors", "--metrics", "metrics/train.json"],
    "fuse": ["--model", "models/model.safetensors", "--shards", "data/shards", "--out", "fused"],
    "evaluate": ["--fused", "fused", "--shards", "data/shards", "--model", "models/model.safetensors", "--metrics",
                 "metrics/evaluate.json", "--report", "reports"],
    "register": ["--model", "models/model.safetensors", "--evaluation", "metrics/evaluate.json", "--out",
                 "metrics/register.json"],
    "ship": ["--model", "models/model.safetensors", "--evaluation", "metrics/evaluate.json", "--notes", "notes.md",
             "--out", "shipped.safetensors", "--card", "card.md"],
}


def test_an_empty_params_file_stops_every_stage_before_it_touches_anything(tmp_path: Path) -> None:
    """A 0-byte params.yaml: every stage exits 2 with one line, and what earlier runs wrote stays (before: the shard
    stage replaced data/shards with an empty set, fuse emptied fused/, register registered a version, all exit 0).
    A file of comments only, or ``{}``, is as empty."""
    (tmp_path / "params.yaml").write_text("")
    for folder in ("fused", "data/shards", "models"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "earlier.bin").write_bytes(b"an earlier run's output")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for name, args in STAGE_ARGS.items():
        proc = subprocess.run([sys.executable, "-m", f"pipeline.{name}", *args], cwd=tmp_path, env=env(),
                              capture_output=True, text=True, timeout=120)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, (name, proc.stderr[-2000:])
        assert errors == ["error: params.yaml: no sections (empty params file); expected some of model, impair, "
                          "synth, prepare, shard, train, fuse, evaluate, register, tracking, cluster"], (name, errors)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    for content in ("# nothing but a comment\n", "{}\n"):
        (tmp_path / "params.yaml").write_text(content)
        with pytest.raises(ParamsError, match="no sections"):
            load_params(tmp_path / "params.yaml")


def test_a_moved_checkout_keeps_its_runs_fingerprint(tmp_path: Path) -> None:
    """The start checkpoint enters a run's fingerprint by its content, not its absolute path: the same file in a
    re-cloned or moved checkout is the same run (before: the run was moved aside and started over); another start
    checkpoint is another run."""
    import dataclasses
    import shutil

    from pipeline.train import fingerprint

    from cs2fusion.checkpoint import save_checkpoint
    from cs2fusion.model import Backbone

    params = load_params(REPO / "params.yaml")  # starts from the shipped model
    init = REPO / params.train.init_from
    prints = []
    for checkout in ("first", "moved"):
        copy = tmp_path / checkout / params.train.init_from
        copy.parent.mkdir(parents=True)
        shutil.copy(init, copy)
        moved = dataclasses.replace(params, train=dataclasses.replace(params.train, init_from=str(copy)))
        prints.append(fingerprint(moved, "0" * 64))
    assert prints[0] == prints[1]
    save_checkpoint(tmp_path / "other.safetensors", Backbone())
    other = dataclasses.replace(params, train=dataclasses.replace(params.train,
                                                                  init_from=str(tmp_path / "other.safetensors")))
    assert fingerprint(other, "0" * 64) != prints[0]


# round three, item 5: failed starts and SIGTERM end their MLflow runs


def _runs(project: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


@pytest.mark.parametrize("where", ["a file", "/proc/cs2fusion-runs"])
def test_an_unusable_storage_path_is_one_line_and_leaves_no_running_run(where: str, tmp_path: Path) -> None:
    """``train.storage_path`` a file or under /proc: one line before any MLflow run exists (each attempt used to
    leave a run RUNNING)."""
    target = str(tmp_path / "runs.txt") if where == "a file" else where
    if where == "a file":
        Path(target).write_text("not a folder")
    proj = _project(tmp_path / "p", train={"storage_path": target, "batch_size": 2})
    for _ in range(2):
        _one_line_error(_stage(proj, "train", "--shards", "data/shards", "--out", "m.safetensors"), target)
    assert not any(r.info.status == "RUNNING" for r in _runs(proj))


@pytest.mark.slow
def test_sigterm_stops_training_cleanly_and_ends_the_run_killed(tmp_path: Path) -> None:
    """SIGTERM mid-training: exit status 143 with one line (was 134, a C++ stack dump and a FAILED run), the MLflow
    run KILLED with the reason, and the run folder kept for a rerun to continue."""
    proj = _project(tmp_path, train={"batch_size": 2, "epochs": 50, "scaling": {"num_workers": 1, "loader_workers": 0},
                                     "tracking": {"log_every": 1}})
    proc = started(subprocess.Popen([sys.executable, "-m", "pipeline.train", "--shards", "data/shards", "--out",
                                     "m.safetensors"], cwd=proj, env=env(), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True))
    try:
        deadline = time.time() + 240
        while not any("loss/backbone" in r.data.metrics for r in _runs(proj) if r.info.status == "RUNNING"):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
            time.sleep(1)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr[-3000:]
    assert "Traceback" not in stderr and "terminate called" not in stderr, stderr[-3000:]
    assert [line for line in stderr.splitlines() if line.startswith("error: ")] == [
        "error: stopped by SIGTERM; rerun the stage to continue from the latest checkpoint"]
    (run,) = _runs(proj)
    assert run.info.status == "KILLED" and run.data.tags["failure"] == "stopped by SIGTERM"
    assert (proj / "runs" / "train" / "mlflow_run_id").read_text().strip() == run.info.run_id


# round three, item 4: one trainer per run


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_run_has_one_trainer_and_a_dead_holders_lease_is_taken_over(where: str, tmp_path: Path,
                                                                       request: pytest.FixtureRequest) -> None:
    """A live trainer's lease refuses a second trainer of the same run in one line naming it (was: both "resumed"
    the run, duplicating metrics and mixing checkpoints); an expired lease, or one of a dead process on this host, is
    taken over; on object storage too."""
    import socket

    from pipeline.lease import RunLease

    root = str(tmp_path) if where == "local" else request.getfixturevalue("s3")
    run = storage.join(root, "runs", "train")
    holder = RunLease(run, ttl_s=30, settle_s=0.1)
    holder.acquire()
    with pytest.raises(InputError, match=f"being trained by {socket.gethostname()}:{os.getpid()}"):
        RunLease(run, settle_s=0.1).acquire()
    holder.release()
    assert not storage.exists(run + ".lease")
    zombie = subprocess.Popen(["sleep", "60"])  # killed and not reaped yet: signal 0 still reaches it
    zombie.kill()
    time.sleep(0.5)
    for lease in ({"holder": "node-2:17", "host": "node-2", "pid": 17, "token": "t", "since": 0, "expires": 1},
                  {"holder": "x:1", "host": socket.gethostname(), "pid": 2 ** 22 + 7, "token": "t", "since": 0,
                   "expires": time.time() + 600},
                  {"holder": f"x:{zombie.pid}", "host": socket.gethostname(), "pid": zombie.pid, "token": "t",
                   "since": 0, "expires": time.time() + 600}):  # expired / a dead process of this host / a zombie
        storage.write_text(run + ".lease", json.dumps(lease))
        with RunLease(run, settle_s=0.1) as taken:
            assert taken.read()["token"] == taken.token
    zombie.wait()
    storage.write_text(run + ".lease", json.dumps({"holder": "node-2:17", "host": "node-2", "pid": 17, "token": "t",
                                                   "since": 0, "expires": time.time() + 600}))
    with pytest.raises(InputError, match="being trained by node-2:17"):
        RunLease(run, settle_s=0.1).acquire()


def test_a_second_train_stage_of_a_held_run_is_one_line_and_starts_nothing(tmp_path: Path) -> None:
    """The train stage beside a live holder of the same run (another process): one line naming it, exit 2, no MLflow
    run opened."""
    import socket

    proj = _project(tmp_path, train={"batch_size": 2})
    holder = started(subprocess.Popen([sys.executable, "-c", "import time; from pipeline.lease import RunLease; "
                               f"RunLease({str(proj / 'runs' / 'train')!r}).acquire(); print('held', flush=True); "
                               "time.sleep(120)"], cwd=REPO, env=env(), stdout=subprocess.PIPE, text=True))
    try:
        assert holder.stdout.readline().strip() == "held"
        _one_line_error(_stage(proj, "train", "--shards", "data/shards", "--out", "m.safetensors"),
                        f"being trained by {socket.gethostname()}:{holder.pid}")
        assert not _runs(proj)
    finally:
        holder.kill()
        holder.wait()
