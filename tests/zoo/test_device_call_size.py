"""What a GPU ``run`` call sends must fit the device tool's limit (64 MiB: the working tree plus the carry), and the
slimmed carry (``scripts/gpu_carry.sh``) must keep every library module the GPU scripts import. Both break
silently otherwise: a shipped model that grows the tree, or a new import of a left-out model family, is only
noticed when a lent GPU refuses the call or fails in it."""
from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CARRY_MIB = 2.9  # .carry/pylibs.tar.xz as scripts/gpu_carry.sh wrote it on 2026-12-03 (2,926,948 bytes)


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_a_device_call_with_the_carry_fits_the_64_mib_limit():
    size = load_script("device_tree_size")
    m = size.measure(ROOT, carry=[], assume_carry_mib=CARRY_MIB)  # the same figure on every machine
    assert not m["carry_measured"] and m["carry_bytes"] == int(CARRY_MIB * size.MIB)
    assert m["tree_bytes"] > 40 * size.MIB  # the zoo models are counted: the measure sees the tree
    assert m["fits"], f"the GPU call would send {m['total_bytes'] / size.MIB:.1f} MiB: {m['largest']}"


def test_the_size_check_fails_a_tree_over_the_limit(tmp_path):
    size = load_script("device_tree_size")
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "big.bin").write_bytes(b"\0" * (60 * size.MIB))
    (tmp_path / ".gitignore").write_text("ignored.bin\n")
    (tmp_path / "ignored.bin").write_bytes(b"\0" * (30 * size.MIB))  # ignored: does not travel
    assert size.main(["--root", str(tmp_path), "--carry", "nothing-here", "--assume-carry-mib", "3"]) == 0
    assert size.main(["--root", str(tmp_path), "--carry", "nothing-here", "--assume-carry-mib", "5"]) == 1
    (tmp_path / "carried").mkdir()
    (tmp_path / "carried" / "x").write_bytes(b"\0" * (5 * size.MIB))  # a present carry is measured, not assumed
    assert size.measure(tmp_path, ["carried"], 0.0)["carry_bytes"] == 5 * size.MIB


IMPORTS = """
import json, sys
sys.path.insert(0, "benchmarks")
import mmeff.zoo.load_pipeline as lp
from mmeff.zoo.load import load
for name in ("tiny-llava", "tiny-qwen2-vl"):
    load(name)
for name in ("tiny-sd3", "tiny-wan"):
    lp.open_pipeline(str(lp.MODELS_DIR / name))
import mmeff.zoo.train_gpu, mmeff.zoo.train_sd3, mmeff.zoo.train_wan, mmeff.eval.t2i_fidelity, mmeff.eval.video_fidelity
import bench_block_sparse_attn, bench_video_sparse_attn, bench_vlm_pruning, zooprune_cost
from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                          LlavaNextForConditionalGeneration, Qwen2VLForConditionalGeneration,
                          Qwen2_5_VLForConditionalGeneration)
from diffusers import (CogVideoXPipeline, FluxPipeline, HunyuanVideoPipeline, PixArtAlphaPipeline,
                       StableDiffusion3PAGPipeline, StableDiffusion3Pipeline, WanPipeline)
mods = list(sys.modules)
print(json.dumps({
    "transformers": sorted({m.split(".")[2] for m in mods if m.startswith("transformers.models.") and m.count(".") >= 2}),
    "diffusers": sorted({m.split(".")[2] for m in mods if m.startswith("diffusers.pipelines.") and m.count(".") >= 3}),
}))
"""


def kept(var: str) -> set[str]:
    text = (ROOT / "scripts" / "gpu_carry.sh").read_text()
    match = re.search(rf'{var}="([^"]*)"', text)
    assert match, f"{var} not found in scripts/gpu_carry.sh"
    return set(match.group(1).split())


def test_the_carry_keeps_every_model_family_and_pipeline_the_gpu_scripts_import():
    out = subprocess.run([sys.executable, "-c", IMPORTS], cwd=ROOT, check=True, capture_output=True, text=True,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    used = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"qwen2_vl", "llava", "umt5", "t5"} <= set(used["transformers"])  # the probe imported the real things
    assert {"wan", "stable_diffusion_3"} <= set(used["diffusers"])
    assert set(used["transformers"]) <= kept("KEEP_MODELS"), set(used["transformers"]) - kept("KEEP_MODELS")
    assert set(used["diffusers"]) <= kept("KEEP_PIPELINES"), set(used["diffusers"]) - kept("KEEP_PIPELINES")
