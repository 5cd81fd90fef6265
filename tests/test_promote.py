"""The champion gate: better promotes, worse keeps, unlike splits are re-scored, datasets never mix."""

import errno
import json
from pathlib import Path

import h5py
import numpy as np
import pytest

import tnflow.tasks.release.promote as promote_module
from tnflow.tasks.cache.contents import dataset_key
from tnflow.tasks.core.errors import DiskFullError
from tnflow.tasks.release.champions import read_champion
from tnflow.tasks.release.promote import promote
from tnflow.tasks.tf.model_files import read_model_dir, write_model_json


def fake_model(root: Path, name: str) -> Path:
    model = root / name
    model.mkdir(parents=True)
    meta = {"model": "vgg19", "head": "gap", "num_classes": 2, "class_names": ["cat", "dog"], "image_size": 32}
    write_model_json(model, {**meta, "tag": name})
    (model / "model.ckpt.index").write_bytes(name.encode())
    (model / "model.ckpt.data-00000-of-00001").write_bytes(name.encode() * 10)
    (model / "saved_model" / "variables").mkdir(parents=True)  # what the export stage adds
    (model / "saved_model" / "saved_model.pb").write_bytes(name.encode() * 3)
    (model / "saved_model" / "variables" / "variables.index").write_bytes(name.encode() * 4)
    (model / "model.onnx").write_bytes(name.encode() * 5)
    return model


def tree(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


N = 200  # test images: a 5-point gain on them is no accident (McNemar)


def fake_cache(path: Path, labels=None, source_md5="a" * 32, classes=("cat", "dog")) -> Path:
    with h5py.File(path, "w") as f:
        f["test/labels"] = np.asarray(labels if labels is not None else [i % 2 for i in range(N)])
        f.attrs["dataset"], f.attrs["source_md5"], f.attrs["class_names"] = "cifar10", source_md5, list(classes)
    return path


def labels_of(cache: Path) -> np.ndarray:
    with h5py.File(cache, "r") as f:
        return f["test/labels"][:]


def predictions_at(labels: np.ndarray, accuracy: float) -> np.ndarray:
    """The first round(accuracy x n) images right, the rest wrong: a better model is right where a worse one is."""
    right = round(accuracy * len(labels))
    predicted = (labels + 1) % 2
    predicted[:right] = labels[:right]
    return predicted


class Rescore:
    """Stands in for evaluating the champion on a test split; remembers what it was asked."""

    def __init__(self, accuracy: float):
        self.accuracy, self.calls = accuracy, []

    def __call__(self, champion: str, cache: str) -> np.ndarray:
        self.calls.append((read_model_dir(champion).model_extra["tag"], Path(cache).name))
        return predictions_at(labels_of(Path(cache)), self.accuracy)


@pytest.fixture
def gate(tmp_path):
    out = tmp_path / "runs"
    full = fake_cache(tmp_path / "full.h5")

    def run(name, accuracy, cache=full, rescore=None, margin=0.0, predictions=None, **options):
        return promote(
            fake_model(tmp_path, name),
            run_id=f"run-{name}",
            predictions=predictions if predictions is not None else predictions_at(labels_of(cache), accuracy),
            cache_path=cache,
            output_dir=out,
            rescore=rescore or Rescore(float("nan")),
            margin=margin,
            **options,
        )

    return run, out, full


def champion_tag(out: Path) -> str:
    return read_model_dir(out / "champion").model_extra["tag"]


def test_first_model_becomes_champion_and_better_ones_replace_it(gate):
    run, out, full = gate
    first = run("a", 0.80)
    assert first.promoted and "first champion" in first.reason and champion_tag(out) == "a"
    better = run("b", 0.85)
    assert better.promoted and better.champion_accuracy == 0.80 and champion_tag(out) == "b"
    assert "on the same test split" in better.reason and not better.rescored
    record = read_champion(out, dataset_key(full))
    assert (record.run_id, record.test_accuracy, record.replaced_accuracy) == ("run-b", 0.85, 0.80)
    history = (out / "champions" / dataset_key(full) / "history.jsonl").read_text().splitlines()
    assert [json.loads(line)["run_id"] for line in history] == ["run-a", "run-b"]


@pytest.mark.parametrize(
    "accuracy, margin", [(0.80, 0.0), (0.79, 0.0), (0.805, 0.01)], ids=["equal", "worse", "in-margin"]
)
def test_worse_equal_or_within_margin_keeps_the_champion(gate, accuracy, margin):
    run, out, full = gate
    run("a", 0.80)
    kept = run("b", accuracy, margin=margin)
    assert not kept.promoted and "kept the champion" in kept.reason and champion_tag(out) == "a"
    assert not (out / "champions" / dataset_key(full) / "run-b").exists()


def test_a_champion_from_another_split_is_rescored_and_a_better_model_wins(gate, tmp_path):
    """The smoke-run trap: a champion measured on a subset must not block every later run."""
    run, out, full = gate
    smoke = fake_cache(tmp_path / "smoke.h5", [i % 2 for i in range(100)])
    run("smoke", 0.99, cache=smoke)  # a tiny test split makes any accuracy easy
    rescore = Rescore(0.40)
    better = run("full", 0.75, cache=full, rescore=rescore)
    assert rescore.calls == [("smoke", "full.h5")], "the champion is scored on the candidate's test images"
    assert better.promoted and better.rescored and better.champion_accuracy == 0.40 and champion_tag(out) == "full"
    assert "scored on it now" in better.reason and "0.9900" in better.reason
    history = [
        json.loads(x) for x in (out / "champions" / dataset_key(full) / "history.jsonl").read_text().splitlines()
    ]
    assert history[-1]["replaced_rescored"] is True and history[-1]["replaced_accuracy"] == 0.40


def test_a_rescored_champion_that_is_still_better_stays(gate, tmp_path):
    run, out, full = gate
    run("old", 0.90, cache=fake_cache(tmp_path / "other.h5", [(i + 1) % 2 for i in range(150)]))
    kept = run("new", 0.70, cache=full, rescore=Rescore(0.88))
    assert not kept.promoted and kept.rescored and champion_tag(out) == "old"


def test_datasets_keep_their_own_champions(gate, tmp_path):
    run, out, full = gate
    run("cifar", 0.90)
    other = fake_cache(tmp_path / "mine.h5", source_md5="b" * 32, classes=("apple", "pear"))
    rescore = Rescore(0.0)
    mine = run("mine", 0.70, cache=other, rescore=rescore)
    assert mine.promoted and "first champion" in mine.reason and rescore.calls == []
    assert read_champion(out, dataset_key(full)).run_id == "run-cifar", "the other line is untouched"
    assert champion_tag(out) == "mine", "<output>/champion is the latest promotion"


def test_an_interrupted_promotion_leaves_the_old_champion_whole(gate, monkeypatch):
    run, out, full = gate
    run("a", 0.80)
    before = tree(out / "champion")
    assert {"saved_model/saved_model.pb", "model.onnx", "model_card.md"} <= set(before)

    def killed(link, target):
        raise KeyboardInterrupt("process stopped before the switch")

    monkeypatch.setattr(promote_module, "switch_symlink", killed)
    with pytest.raises(KeyboardInterrupt):
        run("b", 0.90)
    assert tree(out / "champion") == before, "the old champion's checkpoint, exports and card, all as they were"
    assert champion_tag(out) == "a" and read_champion(out, dataset_key(full)).run_id == "run-a"

    monkeypatch.undo()
    again = run("c", 0.90)
    assert again.promoted and champion_tag(out) == "c"
    after = tree(out / "champion")
    assert after["saved_model/saved_model.pb"] == b"ccc" and after["model.onnx"] == b"c" * 5
    card = after["model_card.md"].decode()
    assert "| run-a |" in card and "| run-c |" in card, "the champion's card lists the line's promotions"


# -- starting from a trained model (--init-from) ------------------------------------------


def test_init_from_champion_is_this_datasets_champion_once_there_is_one(gate, tmp_path):
    from tnflow.tasks.training.starting_point import starting_model

    run, _, cache = gate
    assert starting_model("champion", tmp_path / "runs", cache) is None  # the first weekly run: --weights
    run("a", 0.8)
    other = fake_cache(tmp_path / "other.h5", [0, 1], source_md5="b" * 32)
    assert starting_model("champion", tmp_path / "runs", other) is None, "another dataset's champion is not ours"
    found = starting_model("champion", tmp_path / "runs", cache)
    assert found.name == "run-a" and read_model_dir(found).model_extra["tag"] == "a"
    assert starting_model(str(tmp_path / "x"), tmp_path / "runs", cache) == tmp_path / "x"


def test_a_starting_model_must_match_backbone_head_and_classes(tmp_path):
    from tnflow.tasks.core.errors import TnflowError
    from tnflow.tasks.release.model_card import add_champion_history
    from tnflow.tasks.tf.model_files import check_can_start_from, model_digest

    model = tmp_path / "m"
    model.mkdir()
    write_model_json(model, {"model": "vgg19", "head": "gap", "num_classes": 2, "image_size": 32,
                             "class_names": ["cat", "dog"]})  # fmt: skip
    (model / "model.ckpt.index").write_bytes(b"weights")
    with pytest.raises(TnflowError, match=r"is damaged: its index model\.ckpt\.index is unreadable"):
        check_can_start_from(model, "vgg19", "gap", ["cat", "dog"])  # the right model, but no real checkpoint
    with pytest.raises(TnflowError, match=r"other classes than this dataset's \(differs in: fox\)"):
        check_can_start_from(model, "vgg19", "gap", ["cat", "dog", "fox"])
    with pytest.raises(TnflowError, match="another order"):
        check_can_start_from(model, "vgg19", "gap", ["dog", "cat"])
    with pytest.raises(TnflowError, match="the gap head; this run trains a vgg19 with the full head"):
        check_can_start_from(model, "vgg19", "full", ["cat", "dog"])
    with pytest.raises(TnflowError, match="not a tnflow model directory"):
        check_can_start_from(tmp_path, "vgg19", "gap", ["cat", "dog"])
    before = model_digest(model)
    add_champion_history(model, [{"run_id": "r", "promoted_at": "now", "test_accuracy": 0.5}])
    assert model_digest(model) == before, "a card that gained a promotion is the same starting model"
    (model / "model.ckpt.index").write_bytes(b"other weights")
    assert model_digest(model) != before, "the training key must see a different starting model"


# -- a damaged champion record heals --------------------------------------------------------


def test_a_damaged_champion_json_is_rebuilt_from_the_history(gate, caplog):
    run, out, full = gate
    run("a", 0.80)
    record = out / "champions" / dataset_key(full) / "current" / "champion.json"
    whole = record.read_text()
    record.write_text(whole[: len(whole) // 2])  # truncated by a crash or a full disk
    kept = run("b", 0.79)
    assert not kept.promoted and kept.champion_accuracy == 0.80, "the champion is still the champion"
    assert "champion.json was damaged (kept as champion.json.damaged): rebuilt from history.jsonl" in caplog.text
    assert json.loads(record.read_text()) == json.loads(whole)
    assert record.with_name("champion.json.damaged").read_text() == whole[: len(whole) // 2]


def test_a_damaged_champion_json_with_no_history_leaves_no_champion(gate, caplog):
    run, out, full = gate
    run("a", 0.80)
    line = out / "champions" / dataset_key(full)
    (line / "current" / "champion.json").write_text("{")
    (line / "history.jsonl").write_text("")
    fresh = run("b", 0.60)
    assert fresh.promoted and "first champion" in fresh.reason and champion_tag(out) == "b"
    assert "and is not in history.jsonl: no champion" in caplog.text
    assert (line / "run-a" / "champion.json.damaged").read_text() == "{"


def test_a_torn_history_line_is_left_out_with_a_warning(gate, caplog):
    run, out, full = gate
    run("a", 0.80)
    history = out / "champions" / dataset_key(full) / "history.jsonl"
    with open(history, "a") as torn:
        torn.write('{"run_id": "run-x", "test_accu')
    assert run("b", 0.90).promoted
    assert "history.jsonl has damaged lines" in caplog.text
    rows = [json.loads(row) for row in history.read_text().splitlines() if row.endswith("}")]
    assert [r["run_id"] for r in rows] == ["run-a", "run-b"]


def test_a_full_disk_while_promoting_is_one_line_and_the_champion_stays_whole(gate, monkeypatch):
    run, out, _ = gate
    run("a", 0.80)
    before = tree(out / "champion")

    def no_space(source, target):
        raise OSError(errno.ENOSPC, "No space left on device", str(target))

    monkeypatch.setattr(promote_module, "link_tree", no_space)
    with pytest.raises(DiskFullError, match=r"^no space left on .*run-b.* while promoting the champion; free space"):
        run("b", 0.90)
    monkeypatch.undo()
    assert tree(out / "champion") == before and champion_tag(out) == "a"
    assert run("c", 0.90).promoted, "the next run promotes as if nothing happened"


# -- a significant gain ------------------------------------------------------------------


def discordant(labels: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Predictions that are right exactly where `right` is."""
    return np.where(right, labels, (labels + 1) % 2)


def thousand(tmp_path):
    return fake_cache(tmp_path / "thousand.h5", [i % 2 for i in range(1000)])


def test_three_tenths_of_a_point_on_1000_images_is_noise_and_five_points_is_not(gate, tmp_path):
    run, out, _ = gate
    cache = thousand(tmp_path)
    labels = labels_of(cache)
    champion = np.arange(1000) < 800  # 800 right
    run("champion", 0.0, cache=cache, predictions=discordant(labels, champion))
    # +0.3 points: 13 images only the candidate gets right, 10 only the champion.
    noise = champion.copy()
    noise[800:813], noise[:10] = True, False
    kept = run("noise", 0.0, cache=cache, predictions=discordant(labels, noise))
    assert not kept.promoted and champion_tag(out) == "champion"
    assert kept.comparison == {
        **kept.comparison,
        "both_right": 790, "only_candidate": 13, "only_champion": 10, "both_wrong": 187,
    }  # fmt: skip
    assert "could be chance: McNemar's p = 0.678, not below --promote-alpha 0.05" in kept.reason
    assert "both right 790, only the candidate 13, only the champion 10, both wrong 187" in kept.reason
    # +5 points: 60 against 10.
    better = champion.copy()
    better[800:860], better[:10] = True, False
    promoted = run("better", 0.0, cache=cache, predictions=discordant(labels, better))
    assert promoted.promoted and champion_tag(out) == "better" and promoted.comparison["p_value"] < 1e-9
    assert "+5.0 points" in promoted.reason and "only the candidate 60, only the champion 10" in promoted.reason
    record = read_champion(out, dataset_key(cache))
    assert record.comparison["only_candidate"] == 60 and record.alpha == 0.05, "the history keeps the counts"
    assert not run("noise-again", 0.0, cache=cache, predictions=discordant(labels, noise), alpha=1.0).promoted, (
        "against the new champion it is worse"
    )


def test_alpha_one_turns_the_test_off(gate, tmp_path):
    run, *_ = gate
    cache = thousand(tmp_path)
    labels = labels_of(cache)
    run("champion", 0.0, cache=cache, predictions=discordant(labels, np.arange(1000) < 800))
    noise = np.arange(1000) < 800
    noise[800:813], noise[:10] = True, False
    assert not run("strict", 0.0, cache=cache, predictions=discordant(labels, noise)).promoted
    assert run("plain", 0.0, cache=cache, predictions=discordant(labels, noise), alpha=1.0).promoted


@pytest.mark.parametrize(("only_candidate", "only_champion"), [(0, 0), (5, 0), (13, 10), (60, 10), (400, 380), (1, 9)])
def test_the_p_value_is_the_exact_binomial_test_on_the_discordant_images(only_candidate, only_champion):
    from scipy.stats import binomtest

    from tnflow.tasks.release.significance import mcnemar_exact

    n = only_candidate + only_champion
    reference = binomtest(only_candidate, n, 0.5).pvalue if n else 1.0
    assert mcnemar_exact(only_candidate, only_champion) == pytest.approx(reference, rel=1e-9)


def test_the_champion_is_scored_once_per_test_split(gate, tmp_path):
    run, _, full = gate
    smoke = fake_cache(tmp_path / "smoke.h5", [i % 2 for i in range(100)])
    run("champion", 0.99, cache=smoke)
    rescore = Rescore(0.80)
    assert not run("first", 0.80, cache=full, rescore=rescore).promoted
    assert not run("second", 0.79, cache=full, rescore=rescore).promoted
    assert rescore.calls == [("champion", "full.h5")], "its predictions on the full split were kept"
    assert run("third", 0.99, cache=full, rescore=rescore).promoted and len(rescore.calls) == 1


def test_a_candidate_that_loses_a_class_is_refused_when_asked(gate):
    run, _, full = gate
    labels = labels_of(full)
    cats, dogs = labels == 0, labels == 1
    champion = np.where(cats, np.arange(N) < 160, np.arange(N) < 120)  # cats 80 of 100 right, dogs 60
    run("champion", 0.0, predictions=discordant(labels, champion))
    candidate = (cats & (np.arange(N) < 140)) | dogs  # cats 70 right, every dog right: +15 points overall
    options = {"predictions": discordant(labels, candidate)}
    refused = run("candidate", 0.0, max_class_drop=5, **options)
    assert not refused.promoted and "loses 10.0 points on class 'cat', more than --max-class-drop 5" in refused.reason
    assert run("candidate-2", 0.0, max_class_drop=20, **options).promoted, "within the allowed drop"


# -- what the test split can tell ------------------------------------------------------------


def five_classes(tmp_path: Path, n: int = 100) -> Path:
    names = ("roses", "tulips", "daisy", "dandelion", "sunflowers")
    return fake_cache(tmp_path / "flowers.h5", [i % 5 for i in range(n)], source_md5="f" * 32, classes=names)


def right_on(labels: np.ndarray, right: int) -> np.ndarray:
    """The first `right` pictures right, every other one called the next class."""
    predicted = (labels + 1) % 5
    predicted[:right] = labels[:right]
    return predicted


def test_a_model_at_chance_is_no_first_champion_and_a_better_one_is(gate, tmp_path):
    run, out, _ = gate
    flowers = five_classes(tmp_path)
    labels = labels_of(flowers)
    roses = run("roses", 0.0, cache=flowers, predictions=np.zeros(100, dtype=np.int64))
    assert not roses.promoted and not (out / "champion").exists()
    assert roses.reason.startswith("no champion yet: 0.200 is not better than always answering 'roses' (0.200, p = ")
    assert roses.baseline["p_value"] > 0.4 and roses.baseline["class_name"] == "roses"
    assert "with 100 test pictures, gains under 11 points cannot be told from chance: add test pictures" in roses.reason
    better = run("better", 0.0, cache=flowers, predictions=right_on(labels, 35))
    assert better.promoted and "first champion" in better.reason and champion_tag(out) == "better"
    assert "0.350 is better than always answering 'roses' (0.200, p = 0.00034)" in better.reason


def test_a_champion_at_chance_gives_way_to_any_model_better_than_the_baseline(gate, tmp_path):
    run, out, _ = gate
    flowers = five_classes(tmp_path)
    labels = labels_of(flowers)
    assert run("roses", 0.0, cache=flowers, predictions=np.zeros(100, dtype=np.int64), alpha=1.0).promoted, (
        "as the gate did before the baseline rule"
    )
    weak = run("weak", 0.0, cache=flowers, predictions=right_on(labels, 24))
    assert not weak.promoted and "0.240 is not better than always answering 'roses'" in weak.reason
    no_roses = (labels + 1) % 5
    picked = (np.arange(100) < 39) & (labels != 0)
    no_roses[picked] = labels[picked]  # 31 other flowers right, where the champion had 20 roses right
    better = run("better", 0.0, cache=flowers, predictions=no_roses)
    assert better.promoted and champion_tag(out) == "better"
    assert "scores 0.200, no better than always answering 'roses' (0.200), so any model that is better" in better.reason
    assert better.comparison["p_value"] > 0.05, "McNemar alone would have kept the champion at chance"
    again = run("again", 0.0, cache=flowers, predictions=right_on(labels, 36))
    assert not again.promoted and "could be chance: McNemar's p" in again.reason, "a real champion is gated as ever"


def test_every_decision_says_what_its_test_split_can_detect(gate, tmp_path):
    run, _, full = gate
    labels = labels_of(full)
    run("champion", 0.0, predictions=discordant(labels, np.arange(N) < 160))
    candidate = np.arange(N) < 160
    candidate[160:170], candidate[:4] = True, False  # +3 points, 14 disagreements of 200
    kept = run("candidate", 0.0, predictions=discordant(labels, candidate))
    assert not kept.promoted
    assert kept.reason.endswith(
        "with 200 test pictures and 7% disagreement, gains under 5 points cannot be told from chance: add test pictures"
    )
    assert kept.detectable_gain == pytest.approx(0.054, abs=0.001)


def test_the_detectable_gain_is_the_smallest_one_found_four_times_in_five():
    from scipy.stats import binom

    from tnflow.tasks.release.significance import detectable_gain, mcnemar_exact

    for images, disagreements in [(100, 30), (1000, 80), (50_000, 4_000)]:
        gain = detectable_gain(images, disagreements, 0.05)
        share = (1 + gain * images / disagreements) / 2
        half = range(disagreements // 2, disagreements + 1)
        rejects = min(k for k in half if mcnemar_exact(k, disagreements - k) < 0.05)
        assert binom.sf(rejects - 1, disagreements, share) == pytest.approx(0.8, abs=1e-6)
    assert detectable_gain(100, 30, 0.05) == pytest.approx(0.149, abs=0.002), "15 points on 100 pictures"
    assert detectable_gain(100, 5, 0.05) is None, "5 disagreements can never reach p < 0.05"
    assert detectable_gain(10_000, 3_000, 0.05) < detectable_gain(1_000, 300, 0.05) < detectable_gain(100, 30, 0.05)


def disagreeing(images: int, disagreements: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, candidate, champion) over 10 classes: the champion 80% right, the two differing on `disagreements`."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, images)
    champion = np.where(rng.random(images) < 0.8, labels, (labels + 1) % 10)
    candidate = champion.copy()
    flip = rng.permutation(images)[:disagreements]
    candidate[flip] = np.where(champion[flip] == labels[flip], (labels[flip] + 1) % 10, labels[flip])
    return labels, candidate, champion


def test_the_gate_compares_200000_test_images_in_linear_time():
    import time

    from scipy.stats import binomtest

    from tnflow.tasks.release.significance import compare

    labels, candidate, champion = disagreeing(200_000, 40_000)
    started = time.perf_counter()
    result = compare(candidate, champion, labels, [f"c{i}" for i in range(10)])
    seconds = time.perf_counter() - started
    assert result.only_candidate + result.only_champion == 40_000
    assert result.p_value == pytest.approx(binomtest(result.only_candidate, 40_000, 0.5).pvalue, rel=1e-9)
    assert seconds < 2, f"{seconds:.1f} s for 200,000 images (quadratic: about a minute)"


class CountingLabels(np.ndarray):
    """Labels that count the whole-array comparisons made with them (`labels == x`)."""

    comparisons = 0

    def __eq__(self, other):
        CountingLabels.comparisons += 1
        return np.asarray(self) == np.asarray(other)


def test_the_per_class_guard_is_one_pass_over_the_images_whatever_the_number_of_classes():
    """ImageNet's 1,000 classes: a scan of the test split per class made the gate cost 1,000 passes."""
    from tnflow.tasks.release.significance import compare

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 1000, 20_000)
    champion = np.where(rng.random(20_000) < 0.7, labels, (labels + 1) % 1000)
    candidate = np.where(rng.random(20_000) < 0.7, labels, (labels + 3) % 1000)
    names = [f"c{i}" for i in range(1000)]
    CountingLabels.comparisons = 0
    result = compare(candidate, champion, labels.view(CountingLabels), names)
    assert CountingLabels.comparisons <= 2, f"{CountingLabels.comparisons} passes over the labels for 1,000 classes"
    drops = {n: 100 * ((champion == labels)[labels == i].mean() - (candidate == labels)[labels == i].mean())
             for i, n in enumerate(names) if (labels == i).any()}  # fmt: skip
    assert result.worst_class_drop == pytest.approx(max(drops.values()))
    assert drops[result.worst_class] == pytest.approx(result.worst_class_drop), "a class that loses the most"
