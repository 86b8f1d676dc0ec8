"""census.py: attacks of known strategies (world.crafted_pair draws them exactly) are labelled as drawn, by the
pixels and through the MLLM path with a scripted judge; a judge answer that names no kind is counted."""
import collections

import numpy as np

import census
import world


def confusion(labels_of, n: int = 30, seed: int = 0) -> dict:
    table = {}
    for kind in world.CRAFTED:
        pairs = [world.crafted_pair(i, kind, seed) for i in range(n)]
        table[kind] = collections.Counter(labels_of(pairs))
    return table


def geometry(pairs):
    return [r["strategy"] for r in census.census([(p["scene"], p["attacked"], p["boxes"]) for p in pairs])]


def test_components_grow_and_the_changed_area_of_a_hand_made_case():
    m = np.zeros((8, 8), dtype=bool)
    m[1:3, 1:3] = True                    # a 2 x 2 block
    m[5, 5] = m[6, 6] = True              # two pixels touching at a corner: one 8-connected component
    labels, n = census.components(m)
    assert n == 2 and len(set(labels[1:3, 1:3].ravel())) == 1 and labels[5, 5] == labels[6, 6] != labels[1, 1]
    assert census.grow(m[:4, :4]).sum() == 16 and census.shrink(m[:4, :4]).sum() == 0
    assert census.strategy_of([]) == "none" and census.strategy_of(["removal", "removal"]) == "removal"
    assert census.strategy_of(["addition", "perturbation"]) == "hybrid"


def test_crafted_attacks_are_labelled_as_drawn_by_their_pixels():
    table = confusion(geometry)
    print({k: dict(v) for k, v in table.items()})             # the confusion table (pytest -s shows it)
    for kind, counts in table.items():
        assert counts[kind] / sum(counts.values()) >= 0.9, (kind, dict(counts))


def test_a_shape_added_on_the_background_is_one_addition_region_where_it_was_drawn():
    p = world.crafted_pair(3, "addition")
    (kind, box), = p["edits"]
    r = census.census([(p["scene"], p["attacked"], p["boxes"])])[0]
    assert r["regions"] == ["addition"] and r["diffuse"] < 15
    regions, _ = census.changed_regions(census.rgb(p["scene"]), census.rgb(p["attacked"]), p["boxes"],
                                        census.Thresholds())
    ys, xs = np.nonzero(regions[0])
    assert abs(xs.mean() - (box[0] + box[2]) / 2) < 3 and abs(ys.mean() - (box[1] + box[3]) / 2) < 4


def scripted_judge(pairs, malformed_every: int = 0):
    """Answers each region with the crafted edit whose box holds the region's centre (perturbation for a
    region outside every edit), as an MLLM that sees the crops would; every ``malformed_every``-th answer is
    a sentence that names no kind."""
    asked = []

    def judge(asks):
        answers = []
        for a in asks:
            asked.append(a)
            x, y = (a["bbox"][0] + a["bbox"][2]) / 2, (a["bbox"][1] + a["bbox"][3]) / 2
            kinds = [k for k, b in pairs[a["pair"]]["edits"] if b[0] - 2 <= x <= b[2] + 2 and b[1] - 2 <= y <= b[3] + 2
                     and k != "perturbation"]
            answers.append(f"{(kinds or ['perturbation'])[0].capitalize()}.")
            if malformed_every and len(asked) % malformed_every == 0:
                answers[-1] = "I cannot tell from these crops"
        return answers
    return judge, asked


def test_the_judge_path_labels_crafted_attacks_as_the_pixels_do_and_counts_malformed_answers():
    def with_judge(pairs):
        judge, asked = scripted_judge(pairs)
        out = census.census([(p["scene"], p["attacked"], p["boxes"]) for p in pairs], judge=judge)
        assert all(a["prompt"] == census.JUDGE_PROMPT and a["image"].height == 224 for a in asked)
        return [r["strategy"] for r in out]
    table = confusion(with_judge, n=20)
    for kind, counts in table.items():
        assert counts[kind] / sum(counts.values()) >= 0.9, (kind, dict(counts))
    pairs = [world.crafted_pair(i, "addition") for i in range(6)]
    judge, asked = scripted_judge(pairs, malformed_every=2)
    out = census.census([(p["scene"], p["attacked"], p["boxes"]) for p in pairs], judge=judge)
    assert len(asked) == 6 and sum(r["unparsed"] for r in out) == 3
    assert [r["strategy"] for r in out].count("unjudged") == 3 and [r["strategy"] for r in out].count("addition") == 3
    assert census.parse_kind("The edit is a REPLACEMENT of the cup") == "replacement" and census.parse_kind("{}") is None
