"""The shipped pretrained base: built from a public corpus that never meets a site's data, pinned by digest,
refused when altered, reproducible from `fedsecure model pretrain`, and a better start than the random preset."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from importlib import resources
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fedsecure.cli import app
from fedsecure.data.dataset import load_site
from fedsecure.data.synth import PUBLIC_INSTITUTIONS, public_corpus, public_styles, site_styles, synthesize
from fedsecure.data.tokenizer import bundled_tokenizer
from fedsecure.errors import ModelError
from fedsecure.model.presets import PRETRAINED, build_base_model, load_pretrained
from fedsecure.training.local import evaluate
from fedsecure.training.pretrain import PretrainSettings, pretrain

NAME = "deepseek-v3-tiny-clinical"
ASSET = Path(str(resources.files("fedsecure") / "assets" / PRETRAINED[NAME][1]))


def test_public_corpus_never_meets_a_sites_hospital_style_or_record(tmp_path):
    public = public_corpus(4000)
    assert len(set(public)) > 3900  # varied, not a handful of texts
    # every site hospital name there is (8 names, then numbered repeats), with their records
    dirs = synthesize(tmp_path, sites=17, records_per_site=60, seed=3)
    site_texts = [json.loads(x)["text"] for d in dirs for f in ("train.jsonl", "eval.jsonl")
                  for x in (d / f).read_text().splitlines()]
    site_names = {json.loads((d / "profile.json").read_text())["name"] for d in dirs}
    assert not set(public) & set(site_texts)
    assert not any(t.startswith(tuple(f"{n} - " for n in site_names)) for t in public)
    assert not any(n in t for n in PUBLIC_INSTITUTIONS for t in site_texts)
    assert all(t.split(" - ")[0] in PUBLIC_INSTITUTIONS for t in public)
    # the common note formats are shared (as any textbook shares them with a hospital); the sign-offs never are
    site_signs = [re.escape(s["sign"]).replace(re.escape("{i}"), r"\d+") + "$" for s in site_styles()]
    public_signs = [re.escape(s["sign"]).replace(re.escape("{i}"), r"\d+") + "$" for s in public_styles()]
    assert {s["sign"] for s in site_styles()}.isdisjoint(s["sign"] for s in public_styles())
    assert not any(re.search(p, t) for p in site_signs for t in public)
    assert not any(re.search(p, t) for p in public_signs for t in site_texts)
    assert all(any(re.search(p, t) for p in public_signs) for t in public)
    assert public_corpus(50) == public_corpus(50)  # reproducible


def test_the_shipped_base_is_the_pinned_file_and_small():
    digest = hashlib.sha256(ASSET.read_bytes()).hexdigest()
    assert digest == PRETRAINED[NAME][2]
    assert ASSET.stat().st_size < 2 * 2**20
    manifest = json.loads(ASSET.with_suffix(".json").read_text())
    assert manifest["sha256"] == digest and manifest["settings"]["preset"] == PRETRAINED[NAME][0]
    assert manifest["final_eval_loss"] < manifest["initial_eval_loss"]


def test_an_altered_or_missing_base_is_refused_with_the_fix(tmp_path):
    bad = tmp_path / ASSET.name
    shutil.copy(ASSET, bad)
    data = bytearray(bad.read_bytes())
    data[-3] ^= 1
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelError, match=r"not the pinned .*every site must start from the same base. Fix: reinstall"):
        load_pretrained(NAME, bad)
    with pytest.raises(ModelError, match=r"is missing .*Fix: reinstall fedsecure, or rebuild it with `fedsecure model"):
        load_pretrained(NAME, tmp_path / "nothing.safetensors")


def test_the_pretrained_base_starts_a_site_far_ahead_of_the_random_preset(tmp_path):
    [d] = synthesize(tmp_path, sites=1, records_per_site=80, seed=11)
    data = load_site(d, bundled_tokenizer(), 96)
    pretrained, _ = evaluate(build_base_model(NAME), data.eval, pad_id=0)
    random_base, _ = evaluate(build_base_model("deepseek-v3-tiny", 0), data.eval, pad_id=0)
    assert pretrained < 0.6 * random_base
    # and the site still has something of its own to learn: its notes are harder than the public ones
    manifest = json.loads(ASSET.with_suffix(".json").read_text())
    assert pretrained > manifest["final_eval_loss"] + 0.1


def test_pretraining_is_reproducible_and_trains_every_weight():
    s = PretrainSettings(steps=3, records=64, eval_records=16, warmup_steps=1)
    a, sa = pretrain(s)
    b, _ = pretrain(s)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb), ka
    start = build_base_model("deepseek-v3-tiny", 0).state_dict()
    changed = [k for k, v in a.state_dict().items() if not torch.equal(v, start[k])]
    assert len(changed) >= 0.9 * len(start)
    assert sa["final_eval_loss"] < sa["initial_eval_loss"]


def test_model_pretrain_command_writes_the_weights_and_names_the_digest(tmp_path):
    res = CliRunner().invoke(app, ["model", "pretrain", "--out", str(tmp_path), "--steps", "2", "--records", "64"])
    assert res.exit_code == 0, res.output
    path = tmp_path / ASSET.name
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert f"sha256 {digest}" in res.output
    assert json.loads(path.with_suffix(".json").read_text())["sha256"] == digest
    res = CliRunner().invoke(app, ["model", "pretrain", "--out", str(tmp_path), "--steps", "0"])
    assert res.exit_code != 0 and "--steps must be at least 1" in res.output


def test_a_flower_app_bundle_finds_the_base_in_the_installation_that_launched_it(tmp_path, monkeypatch):
    """A Flower app bundle (FAB) carries only source and text files: the apps it runs must find the binary base in
    the installation that started Flower's processes, and still check its digest."""
    from fedsecure.launch.engines import flower_env
    from fedsecure.model import presets

    env = flower_env(tmp_path / "home")
    assert (Path(env[presets.ASSETS_ENV]) / ASSET.name).is_file()
    monkeypatch.setattr(presets, "installed_assets", lambda: tmp_path / "fab" / "fedsecure" / "assets")
    monkeypatch.setenv(presets.ASSETS_ENV, env[presets.ASSETS_ENV])
    got = load_pretrained(NAME).state_dict()
    assert all(torch.equal(v, got[k]) for k, v in load_pretrained(NAME, ASSET).state_dict().items())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(ASSET, elsewhere / ASSET.name)
    data = bytearray((elsewhere / ASSET.name).read_bytes())
    data[-5] ^= 1
    (elsewhere / ASSET.name).write_bytes(bytes(data))
    monkeypatch.setenv(presets.ASSETS_ENV, str(elsewhere))
    with pytest.raises(ModelError, match="not the pinned"):
        load_pretrained(NAME)
    monkeypatch.delenv(presets.ASSETS_ENV)
    with pytest.raises(ModelError, match="is missing"):
        load_pretrained(NAME)
