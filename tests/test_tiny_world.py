"""The tiny world: its scenes (world.scene) and edit pairs are what they claim (checked against their own
geometry), and the models tiny_world.py trains are saved as ordinary model directories the stages load by path."""
import dataclasses
import json
import time

import numpy as np
import pytest
import torch

import common
import editing
import rundir
import tiny_world
import world
from world import SIZE as WORLD_SIZE


def centre(box, axis):
    return (box[axis] + box[axis + 2]) / 2


def test_world_scenes_answer_their_question_from_the_drawn_geometry():
    kinds = set()
    for i in range(90):
        s = world.scene(i, seed=7, option_order="fixed")
        kinds.add(s["kind"])
        objs = {o["name"]: o["bbox"] for o in s["objects"]}
        assert set(objs) <= {"red circle", "blue square"} and "blue square" in objs   # the targets, nothing else
        for t in s["targets"]:   # targets inside the central 2/3 that stage 01 extends outwards
            assert WORLD_SIZE // 6 <= min(t["bbox"]) and max(t["bbox"]) <= WORLD_SIZE - WORLD_SIZE // 6
        if s["kind"] == "exists":
            assert s["options"] == [] and s["answer"] == ("Yes" if "red circle" in objs else "No")
            assert [t["name"] for t in s["targets"]] == (["red circle"] if s["answer"] == "Yes" else [])
        else:
            axis = 0 if s["kind"] == "horizontal" else 1
            c, q = centre(objs["red circle"], axis), centre(objs["blue square"], axis)
            assert abs(c - q) >= WORLD_SIZE / 5
            assert s["answer"] == ("A" if c < q else "B")
            assert s["options"] == (["left", "right"] if axis == 0 else ["above", "below"])
        # the pixels at a target's centre are its colour (drawn, not only described)
        for t in s["targets"]:
            x, y = (int(centre(t["bbox"], a)) for a in (0, 1))
            r, g, b = np.asarray(s["image"])[y, x]
            assert (r > 180 and b < 80) if t["name"] == "red circle" else (b > 180 and r < 80)
    assert kinds == {"horizontal", "vertical", "exists"}
    a, b = world.scene(5, seed=7), world.scene(5, seed=7)
    assert a["image"].tobytes() == b["image"].tobytes() and a["question"] == b["question"]


def test_world_options_in_a_random_order_name_the_same_answer_on_the_same_scene():
    """option_order="random" (the default): both orders of both spatial questions occur, the letter still names the drawn
    relation, and the scene (image, question, targets) is the fixed-order one; anything else is an error."""
    orders, flipped = set(), 0
    for i in range(90):
        f, r = world.scene(i, seed=7, option_order="fixed"), world.scene(i, seed=7)
        assert r["image"].tobytes() == f["image"].tobytes() and (r["question"], r["targets"]) == (f["question"], f["targets"])
        if f["options"]:
            assert r["options"][ord(r["answer"]) - 65] == f["options"][ord(f["answer"]) - 65]   # the same word
            orders.add(tuple(r["options"]))
            flipped += r["options"] != f["options"]
        else:
            assert (r["options"], r["answer"]) == (f["options"], f["answer"])
    assert orders == {("left", "right"), ("right", "left"), ("above", "below"), ("below", "above")}
    assert 15 <= flipped <= 45                                       # about half of ~60 spatial scenes
    assert world.seed_item(3, 0.2, 7)["options"] == world.scene(3, 7)["options"]
    with pytest.raises(ValueError, match="option_order"):
        world.scene(0, option_order="shuffled")


def test_world_seed_item_is_the_central_crop_with_shifted_boxes():
    m = WORLD_SIZE // 6
    s, row = world.scene(3, seed=0), world.seed_item(3, 0.2, 0)
    assert row["image"].size == (WORLD_SIZE - 2 * m,) * 2
    assert row["image"].tobytes() == s["image"].crop((m, m, WORLD_SIZE - m, WORLD_SIZE - m)).tobytes()
    for t, u in zip(s["targets"], row["targets"]):
        assert u["bbox"] == [v - m for v in t["bbox"]] and 0 <= min(u["bbox"]) and max(u["bbox"]) <= row["image"].width
    rows = [world.seed_item(i, 0.25, 0) for i in range(600)]
    assert 0.18 < [r["split"] for r in rows].count("test") / 600 < 0.32
    # the split does not decide the question: every kind is in both splits at about a third each (at seed 0
    # the split once drew from the scene's own generator, and the test split held left/right questions only)
    for split in ("train", "test"):
        questions = [r["question"] for r in rows if r["split"] == split]
        assert all(0.22 < questions.count(q) / len(questions) < 0.45 for q, _ in world.QUESTIONS.values())


def test_place_name_and_implant_instruction():
    assert common.place_name([0, 0, 10, 10], 90, 90) == "top left"
    assert common.place_name([40, 40, 50, 50], 90, 90) == "center"
    assert common.place_name([80, 40, 90, 50], 90, 90) == "right"
    assert common.place_name([30, 70, 40, 90], 90, 90) == "bottom"
    assert common.place_name([85, 85, 90, 90], 90, 90) == "bottom right"
    assert common.implant_instruction("small clock", [0, 80, 10, 90], 90, 90) == \
        "Add a small clock at the bottom left of the image."


def test_edit_pairs_change_only_what_the_instruction_names():
    seen = set()
    for i in range(40):
        cond, instr, target = world.edit_pair(i, seed=9)
        a, b = np.asarray(cond, dtype=int), np.asarray(target, dtype=int)
        if instr == world.KEEP:
            seen.add("keep")
            assert (a == b).all()
        elif instr == world.EXTEND:
            seen.add("extend")
            m = WORLD_SIZE // 6
            assert (a[m:-m, m:-m] == b[m:-m, m:-m]).all() and not (a == b).all()
        else:
            seen.add("add")
            ys, xs = np.nonzero((a != b).any(-1))
            assert len(ys) > 50      # a shape of >= 15 px was drawn ...
            box = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            assert instr == common.implant_instruction(instr[6:instr.index(" at the ")], box, WORLD_SIZE, WORLD_SIZE)
    assert seen == {"keep", "add", "extend"}


def test_editor_noise_levels_lean_towards_pure_noise_as_their_power_grows():
    """s = 1 - (1 - u)^p: the same u at every power, in [0, 1]; p = 1 uniform, u bit for bit (mean 1/2),
    p = 2 mean 2/3 with P(s > 1/2) = (1/2)^(1/2) = 0.707, p = 3 mean 3/4 with P(s > 1/2) = (1/2)^(1/3) = 0.794."""
    n = 200_000
    u = torch.rand(n, generator=torch.Generator().manual_seed(0))
    for p, mean, above in ((1.0, 0.5, 0.5), (2.0, 2 / 3, 0.5 ** 0.5), (3.0, 0.75, 0.5 ** (1 / 3))):
        s = tiny_world.noise_levels(n, p, torch.Generator().manual_seed(0))
        assert torch.allclose(s, 1 - (1 - u) ** p) and 0 <= s.min() and s.max() <= 1
        assert torch.equal(s, u) == (p == 1.0)       # uniform is the generator's own draw: the default world
        assert abs(s.mean().item() - mean) < 0.003 and abs((s > 0.5).float().mean().item() - above) < 0.003


def test_add_hit_asks_whether_the_drawn_shape_appeared():
    from PIL import Image, ImageDraw
    scene = Image.new("RGB", (32, 32), (100, 100, 100))
    target = scene.copy()
    ImageDraw.Draw(target).rectangle([4, 4, 11, 11], fill=(230, 30, 30))      # 64 drawn pixels
    assert world.add_hit(scene, target, target) is True
    assert world.add_hit(scene, target, scene) is False
    assert world.add_hit(scene, scene, target) is None                  # nothing to add
    half = np.asarray(scene).copy()
    half[4:12, 4:12] = (170, 60, 60)           # 4/7 of the way to the red: closer to the target
    assert world.add_hit(scene, target, Image.fromarray(half)) is True
    half[4:12, 4:12] = (150, 80, 80)           # 3/7 of the way: still closer to the unedited scene
    assert world.add_hit(scene, target, Image.fromarray(half)) is False
    moved = scene.copy()
    ImageDraw.Draw(moved).rectangle([20, 20, 27, 27], fill=(230, 30, 30))     # right shape, wrong place
    assert world.add_hit(scene, target, moved) is False
    # change elsewhere: 0 for the exact target; the moved square's 64 pixels of |130|+|70|+|70| / 3 = 90
    # over the 32 x 32 - 27 x 27 pixels away from the asked box (dilated by 8: [0, 19] x [0, 19] -> 400)
    assert world.change_elsewhere(scene, target, target) == 0.0
    assert abs(world.change_elsewhere(scene, target, moved) - 64 * 90 / (1024 - 400)) < 1e-4


def test_oracle_distractor_sits_beyond_the_square_and_touches_nothing():
    n_far = n_relations = 0
    for i in range(24):
        s = world.scene(i, seed=2)
        image, name, box = world.oracle_distractor(s, i)
        assert box is not None and name == "red triangle"
        assert box[2] - box[0] == WORLD_SIZE // 4
        for o in s["objects"]:       # disjoint from every object, which are all still drawn as they were
            b = o["bbox"]
            assert box[2] <= b[0] or b[2] <= box[0] or box[3] <= b[1] or b[3] <= box[1]
            x1, y1, x2, y2 = (int(v) for v in b)
            assert np.array_equal(np.asarray(image)[y1:y2, x1:x2], np.asarray(s["image"])[y1:y2, x1:x2])
        if s["kind"] != "exists":
            n_relations += 1
            a = 0 if s["kind"] == "horizontal" else 1
            named = {o["name"]: o["bbox"] for o in s["objects"]}
            box_c, circle_c, square_c = ((b[a] + b[a + 2]) / 2 for b in (box, named["red circle"], named["blue square"]))
            n_far += (box_c - square_c) * (circle_c - square_c) < 0
    assert n_far == n_relations == 18     # every relation scene (the other 6 ask about existence)


def test_preset_paths_name_the_run_directory():
    from dataclasses import dataclass, field

    @dataclass
    class A:
        run_dir: str = field(default="runs/x")
        preset: str | None = field(default=None)
        model: str = field(default="hub/id")
        steps: int = field(default=1)
    presets = {"w": dict(model="{run_dir}/models/editor", steps=3)}
    a = rundir.parse_args(A, presets, ["--preset", "w", "--run_dir", "/tmp/r"])
    assert a.model == "/tmp/r/models/editor" and a.steps == 3
    a = rundir.parse_args(A, presets, ["--preset", "w", "--model", "mine"])
    assert a.model == "mine"


def test_every_script_prints_its_help():
    """`python SCRIPT --help` formats every field's help (argparse %-formats it: a bare '%' crashed
    tiny_world.py's); the help shows each field, and a '%%' shows as '%'."""
    import sys

    from conftest import ROOT, load_script
    from transformers import HfArgumentParser
    sys.path.insert(0, str(ROOT / "bench"))
    import rollout_temperature
    import world_gate
    scripts = [load_script(n) for n in ("01_build_sft_data.py", "02_sft_attacker.py", "03_train_attacker.py",
                                        "04_train_defender.py", "05_eval.py")] + [tiny_world, world_gate, rollout_temperature]
    for mod in scripts:
        text = HfArgumentParser(mod.Args).format_help()
        for name in mod.Args.__dataclass_fields__:
            assert f"--{name}" in text, (mod.__name__, name)
    assert "fewer % of 96 validation scenes" in " ".join(HfArgumentParser(tiny_world.Args).format_help().split())


def test_thumbnail_init_makes_the_vae_an_8x_mean_pool_and_a_smooth_upsampler():
    from diffusers import AutoencoderKLQwenImage
    torch.manual_seed(0)
    vae = tiny_world.thumbnail_init(AutoencoderKLQwenImage(
        base_dim=16, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True]))
    scenes = [world.scene(i, seed=3)["image"] for i in range(4)]
    x = editing.images_to_tensor(scenes, WORLD_SIZE, WORLD_SIZE)
    with torch.no_grad():
        z = vae.encode(x.unsqueeze(2)).latent_dist.mode()[:, :, 0]
        rec = vae.decode(z.unsqueeze(2)).sample[:, :, 0]
    # channels 0-2 hold each 8 x 8 block's mean colour (to ~1%: the linearised SiLU); the others vary
    # (a zero-variance channel would divide the pipeline's latent normalisation by 0)
    block_mean = x.unfold(2, 8, 8).unfold(3, 8, 8).mean((-1, -2))
    assert (z[:, :3] - block_mean).abs().max() < 0.02 and z[:, 3:].std((0, 2, 3)).min() > 1e-3
    psnr = 10 * torch.log10(4 / (rec - x).pow(2).mean((1, 2, 3)))
    assert psnr.min() > 24.0    # untrained (these four: 24.4-27.5 dB); default init: ~16 dB after 600 steps


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    """The build with a few steps of each model: the directories, not the learning, are under test."""
    out = tmp_path_factory.mktemp("world") / "models"
    args = tiny_world.Args(out=str(out), defender_steps=2, defender_scenes=32, defender_min_acc=0.0, vae_steps=2,
                           vae_images=16, editor_steps=2, editor_add_steps=2, editor_min_hit=0.0, editor_pairs=32,
                           check_items=8)
    tiny_world.build(args)
    return out, args


def test_build_writes_model_directories_that_load_by_path(small_world):
    out, args = small_world
    info = json.loads((out / "world.json").read_text())
    for k in ("defender_test_acc", "defender_oracle_acc", "vae_psnr", "editor_psnr_add", "editor_add_hit",
              "editor_add_change_elsewhere", "editor_keep_change", "total_s"):
        assert k in info
    assert (out / "editor_samples.png").exists() and (out / "build_log.jsonl").read_text().count("\n") >= 3
    model, processor = common.load_defender(str(out / "defender"))
    img = world.scene(0)["image"]
    inputs = common.defender_inputs(processor, [img], ["Is there a red circle in the image?"], "cpu")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 16   # 112 px -> 4 x 4 merged patches
    for question, _ in world.QUESTIONS.values():          # the saved tokenizer kept its added sentences
        assert processor.tokenizer.tokenize(question) == [question]
    assert inputs["input_ids"].shape[1] == 33      # the chat turns (14), the question (1), the image (16 + 2), a sentence a token
    pipe = editing.load_attacker(str(out / "editor"))
    assert type(pipe).__name__ == "QwenImageEditPipeline" and pipe.transformer.config.num_layers == 2
    te = dict(pipe.text_encoder.named_parameters())
    assert all(torch.equal(p, te[n]) for n, p in model.named_parameters())   # the defender is the text encoder
    assert len(pipe.vae.config.latents_mean) == 16 and min(pipe.vae.config.latents_std) > 0
    assert pipe.vae.config.latents_std != [1.0] * 16
    ctx = editing.encode_edit(pipe, [img], [world.KEEP], WORLD_SIZE)
    assert ctx.cond_latents.shape == (1, 49, 64)
    # cached: a second build returns at once and leaves the directory as it was
    stamp = (out / "world.json").stat().st_mtime
    t0 = time.time()
    tiny_world.build(args)
    assert time.time() - t0 < 1 and (out / "world.json").stat().st_mtime == stamp


def test_build_around_another_worlds_defender_keeps_it_and_trains_the_rest(small_world, tmp_path):
    """--defender_from: the defender's weights (also the editor's text encoder) and world.json's defender_*
    entries are the source world's; the VAE and the editor are trained anew (they differ from the source's)."""
    src, args = small_world
    out = tmp_path / "models"
    tiny_world.build(dataclasses.replace(args, out=str(out), defender_from=str(src), vae_steps=3, vae_lr=1e-3))
    old, new = (json.loads((d / "world.json").read_text()) for d in (src, out))
    assert new.pop("defender_from") == str(src) and "defender_steps" in new
    mine = {k: v for k, v in new.items() if k.startswith("defender_")}
    assert mine == {k: v for k, v in old.items() if k.startswith("defender_")}
    for f in (src / "defender").iterdir():                 # its files copied as they were
        assert tiny_world.sha256(out / "defender" / f.name) == tiny_world.sha256(f), f.name
    a, _ = common.load_defender(str(src / "defender"))
    b = dict(editing.load_attacker(str(out / "editor")).text_encoder.named_parameters())
    assert all(torch.equal(p, b[n]) for n, p in a.named_parameters())
    vae = [editing.load_attacker(str(d / "editor")).vae.encoder.conv_in.weight for d in (src, out)]
    assert not torch.equal(*vae)


def test_editor_with_no_plain_phase_trains_only_the_weighted_phase(small_world):
    out, _ = small_world
    pipe = editing.load_attacker(str(out / "editor"))
    before = {n: p.detach().clone() for n, p in pipe.transformer.named_parameters()}
    logged = []
    tiny_world.train_world_editor(pipe, steps=0, add_steps=2, batch=8, n_train=16, log=logged.append)
    assert [d["part"] for d in logged] == ["editor_add"] and logged[-1]["step"] == 2
    moved = [n for n, p in pipe.transformer.named_parameters() if not torch.equal(p, before[n])]
    assert len(moved) > len(before) // 2 and not pipe.transformer.training


def test_editor_below_the_hit_bar_trains_on_in_top_ups_that_continue_a_saved_editor_exactly(small_world):
    """An editor far below an unreachable bar gets exactly max_more top-ups, a hit rate checked after each; a
    top-up of the editor as saved gives the very weights the same top-up gives inside one call (the claim that
    lets a built world's editor be topped up later); at a bar of 0 there is no check and no top-up."""
    out, _ = small_world
    kw = dict(steps=0, batch=8, n_train=16, more_steps=2, val_pairs=8)
    one, logged = editing.load_attacker(str(out / "editor")), []
    hits = tiny_world.train_world_editor(one, add_steps=2, min_add_hit=1.01, max_more=2, log=logged.append, **kw)
    assert len(hits) == 3 and all(0 <= h <= 1 for h in hits)
    assert [d["part"] for d in logged if "loss" in d] == ["editor_add", "editor_more", "editor_more"]
    assert not one.transformer.training
    two = editing.load_attacker(str(out / "editor"))
    assert tiny_world.train_world_editor(two, add_steps=2, min_add_hit=0.0, log=logged.append, **kw) == []
    before = {n: p.clone() for n, p in two.transformer.named_parameters()}
    assert tiny_world.train_world_editor(two, add_steps=0, min_add_hit=1.01, max_more=2, log=logged.append, **kw) == hits
    after = dict(one.transformer.named_parameters())
    assert all(torch.equal(p, after[n]) for n, p in two.transformer.named_parameters())
    assert sum(not torch.equal(p, before[n]) for n, p in two.transformer.named_parameters()) > len(before) // 2


def test_defender_below_the_validation_bar_trains_on_in_top_ups():
    """A 2-step defender is far below 101%: it gets exactly max_more top-ups of more_steps, each continuing
    from the last, and its validation accuracy is recorded before and after each; at a bar of 0 there is no
    check and no top-up."""
    logs = []
    model, _, info = tiny_world.train_world_defender(steps=2, n_train=32, n_test=8, min_val_acc=101.0, max_more=2,
                                                     more_steps=3, log=logs.append)
    assert info["defender_steps"] == 2 + 2 * 3 and len(info["defender_val_acc"]) == 3
    assert not model.training                       # returned ready for the editor's text encoder and the checks
    assert [d["step"] for d in logs if d["part"] == "defender_more"] == [3, 3]
    assert all(0 <= a <= 100 for a in info["defender_val_acc"])
    _, _, none = tiny_world.train_world_defender(steps=2, n_train=32, n_test=8, min_val_acc=0.0, log=logs.append)
    assert none["defender_steps"] == 2 and none["defender_val_acc"] == []          # bar 0: never checked
    _, _, fixed = tiny_world.train_world_defender(steps=2, n_train=32, n_test=8, min_val_acc=101.0, max_more=1,
                                                  more_steps=2, option_order="fixed", log=logs.append)
    assert fixed["defender_steps"] == 2 + 2 and len(fixed["defender_val_acc"]) == 2   # the fixed-order worlds' recipe


def test_world_gate_versions_and_table_on_exact_edits():
    """bench/world_gate.py: the three versions change the first target's pixels only (recoloured: its shape
    in green; erased: the scene's own background, noise and all), and with an exact edit the untouched
    scene scores local SSIM 1 and passes every gate while a changed target fails a gate of 0.99."""
    import sys

    from conftest import ROOT
    sys.path.insert(0, str(ROOT / "bench"))
    import world_gate
    indices = [i for i in range(12) if world.scene(i, 5)["targets"]]
    items = [world_gate.versions(i) for i in indices]
    for i, (s, (untouched, recoloured, erased)) in zip(indices, items):
        x1, y1, x2, y2 = (int(v) for v in s["targets"][0]["bbox"])
        a, r, e = (np.asarray(im, dtype=int) for im in (untouched, recoloured, erased))
        inside = np.zeros(a.shape[:2], bool)
        inside[y1:y2, x1:x2] = True
        assert (r[~inside] == a[~inside]).all() and (e[~inside] == a[~inside]).all()
        assert (r[inside] != a[inside]).any(-1).sum() > 40                      # the target, redrawn in green
        assert (e[inside] == world.background(WORLD_SIZE, 5 * 1_000_003 + i)[inside]).all()
        assert (e[inside] != a[inside]).any(-1).sum() > 40                      # ... or gone
    table = world_gate.gate_table(items, lambda images: images, [0.5, 0.99])
    assert table["n"] == len(items) >= 8 and table["ssim"]["untouched"] == 1.0
    assert table["passed"][0.5]["untouched"] == table["passed"][0.99]["untouched"] == 100.0
    assert table["passed"][0.99]["recoloured"] == table["passed"][0.99]["erased"] == 0.0
    assert table["ssim"]["recoloured"] < 0.99 and table["ssim"]["erased"] < 0.99
    # --reference: compared with the erased scenes, the erased version is the exact one and the untouched fails
    vs_erased = world_gate.gate_table(items, lambda images: images, [0.99], references=[v[2] for _, v in items])
    assert vs_erased["ssim"]["erased"] == 1.0 and vs_erased["passed"][0.99]["untouched"] == 0.0


def test_sft_bound_counts_dapo_groups_by_right_answer(monkeypatch):
    """bench/world_sft_bound.py --groups: each item's 16 sampled answers make a group that is all right, mixed
    (the only kind with an advantage) or all wrong, counted per right answer."""
    import sys

    from conftest import ROOT

    import common
    sys.path.insert(0, str(ROOT / "bench"))
    import world_sft_bound
    items = [dict(image=None, question="q", options=["left", "right"], answer=a) for a in ("A", "A", "B", "B")] + \
        [dict(image=None, question="q", options=[], answer="Yes")]
    right = [16, 3, 0, 15, 16]                     # the right answers each item's group of 16 will hold
    texts = {"A": "\\boxed{A}", "B": "\\boxed{B}", "Yes": "\\boxed{Yes}", "No": "\\boxed{No}"}
    wrong = {"A": "B", "B": "A", "Yes": "No"}
    answers = [texts[it["answer"] if j < n else wrong[it["answer"]]] for it, n in zip(items, right) for j in range(16)]
    monkeypatch.setattr(common, "defender_generate", lambda *a, **k: answers)
    assert world_sft_bound.group_counts(None, None, items) == {"A": [1, 1, 0], "B": [0, 1, 1], "Yes": [1, 0, 0]}


def test_the_shipped_world_matches_its_manifest_and_loads(tmp_path):
    """run_rounds.sh installs models/tiny_world: every file as its manifest's sha256 says, the editor's text
    encoder restored from the defender's weights, both models loading through from_pretrained and the
    defender answering the world's scenes; a file that differs from the manifest is refused by name."""
    import shutil
    shipped = tiny_world.SHIPPED
    manifest = json.loads((shipped / "manifest.json").read_text())
    assert sum((shipped / rel).stat().st_size for rel in manifest["files"]) < 16e6
    out = tiny_world.install(shipped, tmp_path / "models")
    for rel, digest in manifest["files"].items():
        assert tiny_world.sha256(out / rel) == digest, rel
    assert tiny_world.sha256(out / "editor/text_encoder/model.safetensors") == manifest["files"]["defender/model.safetensors"]
    info = json.loads((out / "world.json").read_text())
    assert info["vae_psnr"] > 32 and info["vae_target_ssim"] > 0.8   # the sharp VAE the 0.7 gate needs
    model, processor = common.load_defender(str(out / "defender"))
    assert sum(p.numel() for p in model.parameters()) == info["defender_params"]
    scenes = [world.scene(i, seed=11) for i in range(48)]
    assert tiny_world.world_accuracy(model, processor, scenes) >= 80.0   # the world's defender, not a random one
    pipe = editing.load_attacker(str(out / "editor"))
    assert pipe.transformer.config.num_layers == 2
    bad = tmp_path / "bad"
    shutil.copytree(shipped, bad)
    (bad / "editor/vae/config.json").write_text("{}")
    with pytest.raises(SystemExit, match="editor/vae/config.json"):
        tiny_world.install(bad, tmp_path / "models2")
    assert not (tmp_path / "models2").exists()
