"""Bring your own data, through the CLI: files:PATH (labels in file names), csv:FILE (image lists and
feature tables), data that moved since the dump, the data checks that refuse with one line, and the
planned-size check before a dump. Data is generated in tmp_path (Fashion-MNIST rows from Debian's
package, or photos drawn from their index)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from kdpipe import KDPipeError
from kdpipe.data import load_dataset, moved_spec
from test_reliability_helpers import assert_one_line_error, run_cli

N_TRAIN, N_TEST = 100, 40  # Fashion-MNIST rows written out as image files (every class is among the first 100)


def ok(res):
    assert res.exit_code == 0, f"exit {res.exit_code}\n{res.output}\n{res.exception!r}"
    return res


@pytest.fixture(autouse=True)
def _own_decodes(tmp_path, monkeypatch):
    monkeypatch.setenv("KDPIPE_DATA_CACHE", str(tmp_path / "decoded"))


# ---------------------------------------------------------------- data built in tmp_path

def _png(arr: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def write_source(kind: str, root: Path, fm) -> str:
    """The Fashion-MNIST subset (N_TRAIN train, N_TEST test rows) as a `kind` source under root; its spec."""
    splits = {"train": (fm.x_train[:N_TRAIN], fm.y_train[:N_TRAIN]), "test": (fm.x_test[:N_TEST], fm.y_test[:N_TEST])}
    root.mkdir(parents=True, exist_ok=True)
    if kind == "npz":
        np.savez(root / "data.npz", x_train=splits["train"][0], y_train=splits["train"][1],
                 x_test=splits["test"][0], y_test=splits["test"][1])
        return f"npz:{root / 'data.npz'}"
    if kind == "imagefolder":
        for split, (x, y) in splits.items():
            for i, (img, label) in enumerate(zip(x, y)):
                _png(img, root / "fm" / split / f"c{label}" / f"{i:04d}.png")
        return f"imagefolder:{root / 'fm'}"
    if kind == "files":
        folders = {"train": "training", "test": "evaluation"}
        for split, (x, y) in splits.items():
            for i, (img, label) in enumerate(zip(x, y)):
                _png(img, root / "fm" / folders[split] / f"{label}_{i}.png")
        return f"files:{root / 'fm'}"
    if kind == "csv":
        lines = ["path,label,split"]
        for split, (x, y) in splits.items():
            for i, (img, label) in enumerate(zip(x, y)):
                _png(img, root / "img" / f"{split}{i}.png")
                lines.append(f"img/{split}{i}.png,{label},{split}")
        (root / "list.csv").write_text("\n".join(lines) + "\n")
        return f"csv:{root / 'list.csv'}"
    raise ValueError(kind)


def _dump(teacher, spec, out, *extra):
    return run_cli(["dump-logits", "--teacher", teacher, "--data", spec, "--views", 2, "--policy", "crop:2",
                    "--batch-size", 64, "--out", out, *extra])


def _student(cache, out, *extra):
    return run_cli(["train-student", "--cache", cache, "--student", "mlp_100", "--epochs", 1, "--batch-size", 32,
                    "--alpha", 0.9, "--out", out, *extra])


# ---------------------------------------------------------------- a folder of photos of any size and mode

CLASS_COLOURS = [(60, 20, 20), (40, 140, 40), (200, 200, 250)]  # distinct in colour and in brightness
MODES = ["L", "RGB", "RGBA", "P", "CMYK"]


def _photo(label: int, i: int, split: str) -> Image.Image:
    """An image of class `label`: its colour with noise, of a size (24..600 px a side) and mode drawn from
    (split, label, i). JPEG holds L, RGB and CMYK; RGBA and P are written as PNG."""
    rng = np.random.default_rng([{"train": 1, "test": 2}[split], label, i])
    w, h = rng.integers(24, 601, 2)
    arr = np.clip(np.array(CLASS_COLOURS[label])[None, None] + rng.normal(0, 20, (12, 12, 3)), 0, 255).astype(np.uint8)
    im = Image.fromarray(arr).resize((int(w), int(h)), Image.Resampling.NEAREST)  # blocks of noise, cheap to draw
    mode = MODES[(i + label) % len(MODES)]
    if mode == "RGBA":
        im.putalpha(Image.fromarray(rng.integers(128, 256, (12, 12)).astype(np.uint8)).resize((int(w), int(h))))
    elif mode == "P":
        im = im.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    elif mode in ("L", "CMYK"):
        im = im.convert(mode)
    return im


def write_photo_folder(root: Path, per_class: dict[str, int]) -> Path:
    for split, folder in (("train", "training"), ("test", "evaluation"), ("val", "validation")):
        for label in range(len(CLASS_COLOURS)):
            for i in range(per_class[split]):
                im = _photo(label, i, "test" if split == "val" else split)
                ext = ".png" if im.mode in ("RGBA", "P") else ".jpg"
                (root / folder).mkdir(parents=True, exist_ok=True)
                im.save(root / folder / f"{label}_{i}{ext}", **({"quality": 90} if ext == ".jpg" else {}))
    return root


def test_photo_folder_of_any_size_and_mode_runs_through_both_stages(tmp_path):
    """60 train photos (24-600 px, modes L, RGB, RGBA, P, CMYK; JPEG and PNG), labels in the file names:
    train-teacher, dump-logits, train-student, and verify-cache re-running the teacher on the replayed
    views finds the stored logits."""
    root = write_photo_folder(tmp_path / "food", {"train": 20, "test": 6, "val": 2})
    spec = f"files:{root}"
    data = load_dataset(spec, "train", image_size=32)
    test = load_dataset(spec, "test", image_size=32)
    assert data.kind == "photos" and data.image_shape == (3, 32, 32) and len(data) == 60 and len(test) == 18
    assert data.class_names == ["0", "1", "2"]
    names = sorted((root / "training").iterdir())
    assert data.labels.tolist() == [int(p.name.split("_")[0]) for p in names]
    sizes = {tuple(s) for s in data.sizes.tolist()}
    assert len(sizes) > 30 and min(min(s) for s in sizes) >= 24 and max(max(s) for s in sizes) <= 600

    teacher = tmp_path / "teacher.pt"
    ok(run_cli(["train-teacher", "--data", spec, "--image-size", 32, "--arch", "cnn_tiny", "--epochs", 4,
                "--batch-size", 10, "--lr", 0.05, "--policy", "crop:2+flip", "--out", teacher]))
    cache = tmp_path / "cache"
    res = ok(run_cli(["dump-logits", "--teacher", teacher, "--data", spec, "--image-size", 32, "--views", 2,
                      "--policy", "crop:2+flip", "--out", cache]))
    assert "planned cache size" in res.output
    m = json.loads((cache / "manifest.json").read_text())
    assert m["dataset"]["kind"] == "photos" and m["dataset"]["image_size"] == 32 and m["rows"] == 120
    ok(run_cli(["verify-cache", cache, "--teacher", teacher, "--sample", 40]))
    runs = tmp_path / "runs"
    ok(run_cli(["train-student", "--cache", cache, "--student", "cnn_tiny", "--epochs", 2, "--batch-size", 10,
                "--out", runs]))
    metrics = json.loads(next(runs.glob("*/metrics.json")).read_text())
    assert metrics["epochs"] == 2 and 0 <= metrics["test_top1"] <= 1


def test_files_layouts_and_names(tmp_path):
    """train/test folders work like training/evaluation; without a test folder, validation is the test
    split; class names that are words are sorted; a name without <label>_ is refused with the file's name."""
    root = tmp_path / "words"
    for split, folder in (("train", "train"), ("val", "val")):
        for label, name in enumerate(["zebra", "apple_pie"]):
            for i in range(2):
                _png(np.full((8, 8), 40 * label + i, np.uint8), root / folder / f"{name}_{i}.png")
    tr, te = load_dataset(f"files:{root}", "train"), load_dataset(f"files:{root}", "test")
    assert tr.class_names == ["apple_pie", "zebra"] and tr.labels.tolist() == [0, 0, 1, 1]
    assert te.source.endswith("val") and tr.image_shape == (1, 8, 8)
    _png(np.zeros((8, 8), np.uint8), root / "train" / "nolabel.png")
    with pytest.raises(KDPipeError, match="nolabel.png is not named <label>_<n>"):
        load_dataset(f"files:{root}", "train")


# ---------------------------------------------------------------- csv: image lists and feature tables

def test_a_folder_per_class_under_training_and_evaluation_is_pointed_to_its_layout(tmp_path):
    """Food-11 as Kaggle has it: training/, evaluation/ and validation/, each one folder per class. files: said
    "training holds no images" and imagefolder: "has no train folder", with nothing on what either reads."""
    for folder in ("training", "evaluation", "validation"):
        for c in ("Bread", "Dairy product"):
            _png(np.zeros((8, 8, 3), np.uint8), tmp_path / "food11" / folder / c / "0.jpg")
    with pytest.raises(KDPipeError, match=r"training holds folders \(Bread, Dairy product\), not images: files: reads "
                                          r"flat folders of <label>_<n>.jpg; for one folder per class use imagefolder"):
        load_dataset(f"files:{tmp_path / 'food11'}", "train")
    with pytest.raises(KDPipeError, match=r"has no train folder \(its folders: evaluation, training, validation\): "
                                          r"imagefolder: reads PATH/train and PATH/test \(or val\), .*: rename them"):
        load_dataset(f"imagefolder:{tmp_path / 'food11'}", "train")
    for folder, name in (("training", "train"), ("evaluation", "test"), ("validation", "val")):
        (tmp_path / "food11" / folder).rename(tmp_path / "food11" / name)
    assert load_dataset(f"imagefolder:{tmp_path / 'food11'}", "train").class_names == ["Bread", "Dairy product"]


def test_csv_names_as_labels_and_validation_as_test(tmp_path):
    """Names are classes in sorted order; val rows are the test split when there are no test rows, and
    are ignored when there are."""
    rows = ["label,split,a,b", "dog,train,1,2", "cat,train,3,4", "dog,val,5,6", "cat,training,7,8"]
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    tr, te = load_dataset(f"csv:{tmp_path / 't.csv'}", "train"), load_dataset(f"csv:{tmp_path / 't.csv'}", "test")
    assert tr.class_names == ["cat", "dog"] and tr.labels.tolist() == [1, 0, 0] and te.labels.tolist() == [1]
    np.testing.assert_array_equal(te.images, np.array([[5, 6]], np.float32))
    (tmp_path / "t.csv").write_text("\n".join(rows + ["cat,test,9,9"]) + "\n")
    te = load_dataset(f"csv:{tmp_path / 't.csv'}", "test")
    assert te.labels.tolist() == [0] and te.images.tolist() == [[9.0, 9.0]]


def test_a_large_csv_reports_how_its_reading_goes(tmp_path, monkeypatch, capsys):
    """A CSV of a million rows took a minute or more to read with no word (measured: 5 s per 100,000 rows of 32
    features, linear). A file of CSV_PROGRESS_BYTES or more reports its reading (in MB; its numbers are parsed as
    it is read); a small one says nothing, and what is read is the same."""
    from kdpipe import data
    rows = ["label,split,a,b"] + [f"{i % 2},{'train' if i % 4 else 'test'},{i}.5,{2 * i}" for i in range(400)]
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    quiet = load_dataset(f"csv:{tmp_path / 't.csv'}", "train")
    assert "reading t.csv" not in capsys.readouterr().err
    monkeypatch.setattr(data, "CSV_PROGRESS_BYTES", 1000, raising=False)
    d = load_dataset(f"csv:{tmp_path / 't.csv'}", "train")
    err = capsys.readouterr().err
    assert "  reading t.csv: 1/1 MB (100.0%)" in err
    np.testing.assert_array_equal(d.images, quiet.images)
    assert d.labels.tolist() == quiet.labels.tolist() and len(d) == 300


def test_a_feature_tables_numbers_are_parsed_as_read_not_held_as_text(tmp_path, monkeypatch):
    """A million rows of 28 features held 3.6 GB as Python strings (1.4 GB now, measured): a feature table keeps
    its label and split as text and parses its features block by block. Across blocks the numbers, the line that
    an error names and the first bad cell are those of reading the file whole."""
    from kdpipe import data
    monkeypatch.setattr(data, "CSV_BLOCK_ROWS", 3)
    lines = ["a,label,b,split"] + [f"{i}.25, {i % 2} ,{-2 * i}e-1 ,{'train' if i % 4 else 'test'}" for i in range(10)]
    lines.insert(5, " , ")  # a blank row: skipped, and the lines after it keep their numbers
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    t = data._read_csv("csv:t", tmp_path / "t.csv", numeric=True)
    assert t.features == ["a", "b"] and t.cols == {"label": 0, "split": 1} and len(t.rows) == 10 and t.bad is None
    assert t.rows[3] == ["1", "train"] and t.lines[4] == 7
    np.testing.assert_array_equal(t.x, [[float(f"{i}.25"), float(f"{-2 * i}e-1")] for i in range(10)])
    assert t.rows[0][1] is t.rows[4][1]  # one string object per distinct value
    d = load_dataset(f"csv:{tmp_path / 't.csv'}", "train")
    np.testing.assert_array_equal(d.images, np.float32([[i + 0.25, -0.2 * i] for i in range(10) if i % 4]))
    lines[9] = lines[9].replace("-14e-1", "n/a")  # row 7, in the third block
    lines[3] = lines[3].replace("-4e-1", '"1,5"')  # row 2, in the first: the first bad cell wins
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(KDPipeError, match=r"line 4: column 'b' holds '1,5', a number written with a comma"):
        load_dataset(f"csv:{tmp_path / 't.csv'}", "train")


def test_a_csv_of_label_and_split_only_is_one_line(tmp_path):
    (tmp_path / "t.csv").write_text("label,split\n0,train\n1,test\n")
    with pytest.raises(KDPipeError, match="has neither a path column nor feature columns"):
        load_dataset(f"csv:{tmp_path / 't.csv'}", "train")


def test_a_header_of_numbered_feature_columns_is_the_header(tmp_path):
    """pandas names a DataFrame(array)'s columns 0, 1, 2, ...: beside label and split that row is the header, not
    a first row of data ("has no header row (its first row holds the number 0)" refused the file)."""
    (tmp_path / "t.csv").write_text("0,1,label,split\n0.5,1.5,0,train\n2.5,3.5,1,train\n4.5,5.5,1,test\n")
    d = load_dataset(f"csv:{tmp_path / 't.csv'}", "train")
    assert d.images.tolist() == [[0.5, 1.5], [2.5, 3.5]] and d.labels.tolist() == [0, 1]


def test_class_names_that_differ_only_in_case_are_said_once(tmp_path, capsys):
    """'Cat' beside 'cat' (one class typed two ways, or letters' classes a and A) are two classes: said with
    their counts when the train split loads, where the rare spelling had split a class without a word."""
    rows = ["label,split,f0"] + [f"{c},train,{i}" for i, c in enumerate(["cat"] * 5 + ["Cat", "dog", "dog"])]
    (tmp_path / "t.csv").write_text("\n".join(rows + ["cat,test,1", "dog,test,2"]) + "\n")
    d = load_dataset(f"csv:{tmp_path / 't.csv'}", "train")
    assert d.class_names == ["Cat", "cat", "dog"]
    err = capsys.readouterr().err
    assert err.count("note:") == 1 and "differ only in case are classes of their own: 'Cat' (1) and 'cat' (5)" in err
    load_dataset(f"csv:{tmp_path / 't.csv'}", "test")
    assert "note:" not in capsys.readouterr().err


def test_a_class_name_written_in_two_unicode_forms_is_refused(tmp_path):
    """'crème' composed (NFC) beside 'crème' decomposed (NFD, as macOS writes file names): two classes that print
    alike, which split one class's samples without a word; in the test split only, it was 'no train sample of
    crème', a name the train split shows."""
    nfc, nfd = "cr\u00e8me", "cre\u0300me"
    rows = ["label,split,f0"] + [f"{c},train,{i}" for i, c in enumerate([nfc, nfd, "pie", "pie", nfc])]
    (tmp_path / "t.csv").write_text("\n".join(rows + [f"{nfc},test,1", "pie,test,2"]) + "\n", encoding="utf-8")
    for split in ("train", "test"):
        with pytest.raises(KDPipeError, match=r"the labels write the class 'cre\u0300me' in 2 Unicode forms "
                                              r"\('cre\\u0300me', 'cr\\xe8me'\).*normalize the names to NFC"):
            load_dataset(f"csv:{tmp_path / 't.csv'}", split)
    (tmp_path / "t.csv").write_text("\n".join(rows[:2] + rows[3:] + [f"{nfd},test,1", "pie,test,2"]) + "\n",
                                    encoding="utf-8")
    with pytest.raises(KDPipeError, match="in 2 Unicode forms"):
        load_dataset(f"csv:{tmp_path / 't.csv'}", "test")


def _leak_table(path, extra: str, value) -> str:
    """A feature table sorted by class (as Kaggle's Iris is), 4 rows per class, with a column `extra` whose value
    for row i of class c is value(i, c)."""
    lines = [f"{extra},f0,label,split"]
    for i, c in enumerate(["setosa"] * 4 + ["versicolor"] * 4 + ["virginica"] * 4):
        lines.append(f"{value(i, c)},{(i * 7) % 5 + 0.5},{c},{'test' if i % 4 == 3 else 'train'}")
    path.write_text("\n".join(lines) + "\n")
    return f"csv:{path}"


@pytest.mark.parametrize("extra, value, fragment", [
    ("Id", lambda i, c: i + 1, "column 'Id' numbers the rows (1, 2, ..., distinct whole numbers)"),
    ("row", lambda i, c: (i * 5) % 12, "column 'row' numbers the rows (0, 5, ..."),  # shuffled, named as an id
    ("Unnamed: 0", lambda i, c: i, "column 'Unnamed: 0' numbers the rows"),  # pandas' index, read and written again
    ("target", lambda i, c: {"setosa": 2, "versicolor": 0, "virginica": 1}[c],
     "column 'target' takes one value per class on every row (3 values for its classes): a copy or code of the label"),
])
def test_an_id_or_a_copy_of_the_label_is_no_feature(tmp_path, extra, value, fragment):
    """A row number, or the label under another name, was a feature the model read the answer off (rows sorted by
    class: the id tells the class) and a teacher of 100% looked like a fine one: refused, naming the column."""
    spec = _leak_table(tmp_path / "t.csv", extra, value)
    for split in ("train", "test"):
        with pytest.raises(KDPipeError, match=re.escape(fragment)):
            load_dataset(spec, split)


def test_whole_number_features_that_are_no_id_load(tmp_path):
    """Distinct whole numbers not one apart under another name (counts, prices), a column of few values that is
    not one per class, and a file too small to tell (2 rows per class) are features."""
    spec = _leak_table(tmp_path / "t.csv", "price", lambda i, c: 100 + i * i)
    assert load_dataset(spec, "train").images[:2, 0].tolist() == [100, 101]
    spec = _leak_table(tmp_path / "t.csv", "citric_acid", lambda i, c: i % 3)
    assert load_dataset(spec, "train").image_shape == (2,)
    (tmp_path / "t.csv").write_text("label,split,f0\n0,train,5\n1,train,7\n0,test,5\n1,test,7\n")
    assert load_dataset(f"csv:{tmp_path / 't.csv'}", "train").images[:, 0].tolist() == [5, 7]


def test_whole_number_labels_written_as_floats_are_class_indices(tmp_path):
    """pandas writes an integer column that had a missing value as 0.0, 1.0, ...: those are the classes 0, 1,
    ..., as 0, 1, ... are; they were names, sorted as text, so of 11 classes "10.0" became class 2 and the
    model's output 2 meant the label 10. A label of non-ASCII digits is a name, not a traceback."""
    lines = ["label,split,f0"] + [f"{c}.0,{s},{c}" for s in ("train", "test") for c in range(11)]
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    d = load_dataset(f"csv:{tmp_path / 't.csv'}", "train")
    assert d.class_names == [str(c) for c in range(11)]
    assert d.labels.tolist() == list(range(11)) and d.images[:, 0].tolist() == list(range(11))
    for label in ("10.00", "010", "10."):  # the same class, however written
        (tmp_path / "t.csv").write_text("\n".join(lines + [f"{label},test,10"]) + "\n")
        assert load_dataset(f"csv:{tmp_path / 't.csv'}", "test").labels.tolist() == list(range(11)) + [10]
    (tmp_path / "t.csv").write_text("label,split,f0\n\u00b2,train,1\n0,train,2\n0,test,3\n")
    with pytest.raises(KDPipeError, match="the labels mix numbers .0, .... and names .\u00b2"):
        load_dataset(f"csv:{tmp_path / 't.csv'}", "train")


def test_two_folders_naming_one_split_are_refused(tmp_path):
    """train/ beside training/, or test/ beside evaluation/: which the user means cannot be told, and the
    first in kdpipe's order was taken while the other was dropped without a word."""
    root = tmp_path / "f"
    for folder in ("training", "evaluation", "test"):
        for label in (0, 1):
            _png(np.full((8, 8), label, np.uint8), root / folder / f"{label}_0.png")
    with pytest.raises(KDPipeError, match="has folders test and evaluation, which both name its test split"):
        load_dataset(f"files:{root}", "test")
    (root / "test").rename(root / "validation")  # the validation split beside the test split: fine
    assert load_dataset(f"files:{root}", "test").source.endswith("evaluation")
    (root / "validation").rename(root / "train")
    with pytest.raises(KDPipeError, match="has folders train and training, which both name its train split"):
        load_dataset(f"files:{root}", "train")


def test_date_like_labels_are_refused_without_listing_every_class(tmp_path):
    """Labels like 20240101 (a photo named by its date) are whole numbers, so class indices with 20 million
    gaps: refused at once, naming their range, not after a list of 20 million class names (a Unix time
    would exhaust memory)."""
    root = tmp_path / "f"
    for i, label in enumerate((20240101, 20240102)):
        _png(np.full((8, 8), i, np.uint8), root / "train" / f"{label}_0.png")
        _png(np.full((8, 8), i, np.uint8), root / "test" / f"{label}_0.png")
    with pytest.raises(KDPipeError, match="these run 20240101..20240102 with 2 distinct values"):
        load_dataset(f"files:{root}", "train")


def test_file_labels_from_one_are_refused(tmp_path):
    root = tmp_path / "f"
    for label in (1, 2, 3):
        _png(np.full((8, 8), label, np.uint8), root / "train" / f"{label}_0.png")
        _png(np.full((8, 8), label, np.uint8), root / "test" / f"{label}_0.png")
    res = run_cli(["train-teacher", "--data", f"files:{root}", "--arch", "mlp_100", "--epochs", 1,
                   "--out", tmp_path / "t.pt"])
    assert_one_line_error(res, "the labels start at 1, not 0")


def test_csv_image_list_equals_the_arrays(tmp_path, fmnist):
    spec = write_source("csv", tmp_path / "d", fmnist)
    d = load_dataset(spec, "train")
    np.testing.assert_array_equal(d.images[:, 0], fmnist.x_train[:N_TRAIN])
    np.testing.assert_array_equal(d.labels, fmnist.y_train[:N_TRAIN])
    assert d.num_classes == 10 and len(load_dataset(spec, "test")) == N_TEST


def _features_csv(path: Path, d: int, n_train=150, n_test=45, header=True) -> str:
    rng = np.random.default_rng(0)
    lines = ["split,label," + ",".join(f"f{j}" for j in range(d))] if header else []
    for split, n in (("train", n_train), ("test", n_test)):
        y = np.arange(n) % 3
        x = rng.normal(0, 0.5, (n, d)) + y[:, None]
        lines += [f"{split},{y[i]}," + ",".join(f"{v:.6f}" for v in x[i]) for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return f"csv:{path}"


def test_csv_feature_table_through_both_stages_and_the_size_check(tmp_path):
    """A CSV of numeric features loads as float32 features; its cache of 4 views takes more than 10x
    the 2-feature table, so the dump is refused saying its planned size until --yes is given."""
    spec = _features_csv(tmp_path / "tab.csv", d=2)
    data = load_dataset(spec, "train")
    assert data.kind == "features" and data.image_shape == (2,) and data.images.dtype == np.float32
    teacher = tmp_path / "t.pt"
    ok(run_cli(["train-teacher", "--data", spec, "--arch", "mlp_100", "--epochs", 3, "--batch-size", 30,
                "--policy", "none", "--out", teacher]))
    cache = tmp_path / "cache"
    args = ["dump-logits", "--teacher", teacher, "--data", spec, "--views", 4, "--policy", "gauss:0.1", "--out", cache]
    # 600 rows x (3 float16 logits + 1 int32 seed + sample, view and label indices) = 600 x 30 bytes
    assert_one_line_error(run_cli(args), "the cache would take 18.9 KB (600 rows x 30 bytes, plus 900 bytes of "
                          "test logits), more than 10x the decoded dataset (1.2 KB): pass --yes")
    assert not (cache / "manifest.json").exists()
    assert "more than 10x" in ok(run_cli(args + ["--yes"])).output
    ok(run_cli(["train-student", "--cache", cache, "--student", "mlp_100", "--epochs", 2, "--batch-size", 30,
                "--out", tmp_path / "runs"]))


def test_a_feature_tables_column_names_reach_the_card_and_name_nothing_else(tmp_path):
    """The card of a model trained on a CSV table said "the columns in the order of the training file": a deployed
    model fed the same features in another order answers wrongly without a word. The card now lists the header's
    names in order. They are recorded only: the same numbers under other names are the same teacher (kept by
    --overwrite) and the same cache (same id), and caches made before they were recorded stay valid."""
    from kdpipe.export import load_model, preprocessing
    path = tmp_path / "tab.csv"
    spec = _features_csv(path, d=3)
    assert load_dataset(spec, "train").identity()["columns"] == ["f0", "f1", "f2"]
    teacher, cache = tmp_path / "t.pt", tmp_path / "cache"
    train = ["train-teacher", "--data", spec, "--arch", "mlp_100", "--epochs", 1, "--policy", "none", "--out", teacher]
    ok(run_cli(train))
    ok(run_cli(["dump-logits", "--teacher", teacher, "--data", spec, "--views", 1, "--policy", "none", "--yes",
                "--out", cache]))
    ok(run_cli(["train-student", "--cache", cache, "--student", "mlp_100", "--epochs", 1, "--out", tmp_path / "runs"]))
    (run,) = (tmp_path / "runs").iterdir()
    for ckpt in (teacher, run / "student.pt"):
        assert preprocessing(load_model(ckpt))[0].startswith(
            "float32 feature vectors (B, 3): the columns f0, f1, f2, in this order (as in the training file, csv:")
    before = teacher.read_bytes()
    path.write_text(path.read_text().replace("f0,f1,f2", "height,width,depth", 1))
    assert "kept" in ok(run_cli(train + ["--overwrite"])).output and teacher.read_bytes() == before
    ok(run_cli(["dump-logits", "--teacher", teacher, "--data", spec, "--views", 1, "--policy", "none", "--yes",
                "--out", tmp_path / "renamed"]))
    ids = [json.loads((c / "manifest.json").read_text())["cache_id"] for c in (cache, tmp_path / "renamed")]
    assert ids[0] == ids[1]
    assert json.loads((tmp_path / "renamed" / "manifest.json").read_text())["dataset"]["columns"] == [
        "height", "width", "depth"]
    ok(run_cli(["verify-cache", cache, "--teacher", teacher]))  # the data named otherwise is still the cache's


def test_dump_larger_than_the_free_space_needs_yes(tmp_path, teacher_ckpt, fmnist, monkeypatch):
    spec = write_source("npz", tmp_path / "d", fmnist)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: SimpleNamespace(total=10**9, used=10**9, free=5000))
    res = _dump(teacher_ckpt, spec, tmp_path / "c")
    # 200 rows x (10 float16 logits + 2 int32 crop offsets + sample, view and label indices) + 40 x 48 test bytes
    assert_one_line_error(res, "the cache would take 11.5 KB (200 rows x 48 bytes, plus 1.9 KB of test logits), "
                          "more than the 5.0 KB free on")
    monkeypatch.undo()
    ok(_dump(teacher_ckpt, spec, tmp_path / "c", "--yes"))


CSV_CASES = {
    "no label column": ("path,split\na.png,train\n", "no label column"),
    "no split column": ("label,f0\n0,1.5\n", "no split column"),
    "path and more columns": ("path,label,split,f0\na.png,0,train,1\n", "has a path column and also f0"),
    "a word among features": ("label,split,f0,f1\n0,train,1.0,x\n", "column 'f1' holds 'x', not a number"),
    "labels mix numbers and names": ("label,split,f0\n0,train,1\ncat,train,2\n", "the labels mix numbers"),
    "labels -1 and 1": ("label,split,f0\n-1,train,1\n1,train,2\n", "the labels are whole numbers, some negative "
                        "(-1, ...), and whole-number labels are the class indices 0..N-1: renumber them from 0"),
    "no header": ("0,train,1.0\n1,train,2.0\n", "has no header row"),
    "a short row": ("label,split,f0\n0,train\n", "line 2 has 2 fields, the header 3"),
    "a listed image is missing": ("path,label,split\nnope.png,0,train\n", "nope.png (listed in bad.csv"),
    "an unknown split": ("label,split,f0\n0,holdout,1\n", "split 'holdout' is not train, test or val"),
    "a NaN feature": ("label,split,f0\n0,train,1\n0,train,nan\n", "train row 1 holds NaN or infinite values"),
    "a feature past float32": ("label,split,f0\n0,train,1\n0,train,1e39\n", "train row 1 holds NaN or infinite "
                               "values, or values past float32's range"),
    "no rows": ("label,split,f0\n", "has a header but no rows"),
    # the reasons these are refused are named, not 'empty or repeated column names' or 'no label column'
    "no header, values repeated": ("0,train,0\n1,train,2.0\n", "has no header row (its first row holds the number 0)"),
    "semicolons": ("label;split;f0\n0;train;1,5\n", "columns are separated by ';', not commas"),
    "tabs": ("label\tsplit\tf0\n0\ttrain\t1\n", "columns are separated by '\\t', not commas"),
    "pandas' index": (",label,split,f0\n0,0,train,1\n", "first column has no name: the row index pandas writes"),
    "an image in both splits": ("path,label,split\na.png,0,train\nb.png,1,train\na.png,0,test\n",
                                "lists a.png on line 2 (train, label 0) and line 4 (test, label 0): list each image once"),
    "an image with two labels": ("path,label,split\na.png,0,train\n./a.png,1,train\n",
                                 "lists ./a.png on line 2 (train, label 0) and line 3 (train, label 1)"),
    "a Windows path": ("path,label,split\nimg\\a.png,0,train\n", "is missing: write its path with /"),
    "latin-1": (b"label,split,f0\ncaf\xe9,train,1\n", "): save it as UTF-8"),
    # the line in the file, past blank lines (they were counted out, so the line named was another one)
    "a short row past blank lines": ("label,split,f0\n0,train,1\n\n\n1,train,2,3\n", "line 5 has 4 fields"),
    "a missing value": ("label,split,f0,f1\n0,train,1,2\n\n1,train,3,\n", "line 4: column 'f1' holds '', a missing "
                        "value: fill it or drop the row"),
    "a decimal comma": ('label,split,f0\n0,train,"2,5"\n', "line 2: column 'f0' holds '2,5', a number written with "
                        "a comma: write numbers with '.' as the decimal point and no thousands separators"),
    "thousands separators": ('label,split,f0\n0,train,1\n0,train,"1,000.5"\n', "holds '1,000.5', a number written"),
    "NA": ("label,split,f0\n0,train,1\n1,test,NA\n", "line 3: column 'f0' holds 'NA', a missing value"),
    "an empty label": ("label,split,f0\n0,train,1\n\n,train,2\n", "line 4 has an empty label: fill it or drop the row"),
    "a NaN past a blank line": ("label,split,f0\n0,train,1\n\n1,train,nan\n", "line 4: train row 1 holds NaN"),
}


@pytest.mark.parametrize("header, fragment", [
    # Kaggle's MNIST CSV: label and 784 pixel columns, no split column (the message listed all 785 names, 7.9 kB)
    (["label"] + [f"pixel{i}" for i in range(784)], "has no split column (it has label, pixel0, pixel1, pixel2, "
     "pixel3, ... (785 in all)): a CSV needs columns label, split"),
    # one name repeated among 300 (all 300 were listed, and the repeated one not said)
    (["label", "split"] + [f"f{i}" for i in range(300)] + ["f7"], "empty or repeated column names (f7 repeated): "
     "give each column a name of its own"),
    (["label", "split", "", "f1"], "(column(s) 3 unnamed)"),
    # capitalised as pandas exports often are: the line said only that a CSV needs columns label and split
    (["Label", "Split", "f0"], "has no label or split column (it has Label, Split, f0): rename Label to label and "
     "Split to split (kdpipe's column names are lowercase)"),
])
def test_a_wide_csvs_bad_header_is_named_in_a_short_line(tmp_path, header, fragment):
    (tmp_path / "wide.csv").write_text(",".join(header) + "\n" + ",".join(["0", "train"] + ["1"] * (len(header) - 2))
                                       + "\n")
    res = run_cli(["train-teacher", "--data", f"csv:{tmp_path / 'wide.csv'}", "--arch", "mlp_100", "--epochs", 1,
                   "--out", tmp_path / "t.pt"])
    assert_one_line_error(res, fragment)
    assert len(res.stderr) < 400, res.stderr


@pytest.mark.parametrize("case", list(CSV_CASES))
def test_ambiguous_or_broken_csv_is_refused_with_one_line(tmp_path, case):
    text, fragment = CSV_CASES[case]
    (tmp_path / "bad.csv").write_bytes(text if isinstance(text, bytes) else text.encode())
    res = run_cli(["train-teacher", "--data", f"csv:{tmp_path / 'bad.csv'}", "--arch", "mlp_100", "--epochs", 1,
                   "--out", tmp_path / "t.pt"])
    assert_one_line_error(res, fragment)
    assert not (tmp_path / "t.pt").exists()


# ---------------------------------------------------------------- moved data

@pytest.mark.parametrize("kind", ["npz", "imagefolder", "files", "csv"])
def test_moved_data_is_found_with_data_root_and_checked_by_fingerprint(tmp_path, teacher_ckpt, fmnist, kind):
    spec = write_source(kind, tmp_path / "old", fmnist)
    cache = tmp_path / "cache"
    ok(_dump(teacher_ckpt, spec, cache))
    shutil.move(tmp_path / "old", tmp_path / "new")
    assert_one_line_error(_student(cache, tmp_path / "r0"), "--data-root DIR or --data SPEC")
    ok(_student(cache, tmp_path / "r1", "--data-root", tmp_path / "new"))
    ok(run_cli(["verify-cache", cache, "--teacher", teacher_ckpt, "--sample", 20, "--data-root", tmp_path / "new"]))
    new_spec = moved_spec(spec, tmp_path / "new")
    assert new_spec == spec.replace("/old/", "/new/")
    if kind in ("imagefolder", "files"):  # --data-root may also name the dataset's folder itself
        assert moved_spec(spec, tmp_path / "new" / "fm") == new_spec
    ok(_student(cache, tmp_path / "r2", "--data", new_spec))


@pytest.mark.parametrize("kind", ["npz", "imagefolder"])
def test_a_relative_data_path_is_read_from_the_dumps_folder_by_stage_two_run_elsewhere(tmp_path, teacher_ckpt, fmnist,
                                                                                         kind, monkeypatch):
    """`--data imagefolder:photos` dumped in a project folder, then train-student, verify-cache and the API from
    another folder (a notebook in notebooks/, a shell in runs/): the data had not moved, yet it was looked for
    from the new folder and refused as moved."""
    proj = tmp_path / "proj"
    spec = write_source(kind, proj / "data", fmnist)
    kind_, _, path = spec.partition(":")
    monkeypatch.chdir(proj)
    ok(_dump(teacher_ckpt, f"{kind_}:{Path(path).relative_to(proj)}", "cache"))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    ok(_student("../proj/cache", "runs"))
    ok(run_cli(["verify-cache", "../proj/cache", "--teacher", teacher_ckpt, "--sample", 20]))
    import kdpipe
    assert len(kdpipe.open_cache("../proj/cache").train) == N_TRAIN
    shutil.move(proj / "data", tmp_path / "moved")  # moved for real: still said so, naming the recorded path
    assert_one_line_error(_student("../proj/cache", "runs2"), "--data-root DIR or --data SPEC")


@pytest.mark.parametrize("kind", ["npz", "csv"])
def test_a_data_file_renamed_as_it_moved_is_asked_for_by_name(tmp_path, teacher_ckpt, fmnist, kind):
    """--data-root DIR where the npz or CSV file now has another name: DIR holds no file of the old name, and
    the error says so (it said "no such file DIR"); the file itself is found."""
    spec = write_source(kind, tmp_path / "old", fmnist)
    cache = tmp_path / "cache"
    ok(_dump(teacher_ckpt, spec, cache))
    old = Path(spec.partition(":")[2])
    (tmp_path / "new").mkdir()
    renamed = tmp_path / "new" / f"renamed{old.suffix}"
    shutil.copy(old, renamed)
    if kind == "csv":  # an image list's images lie beside the CSV
        shutil.copytree(old.parent, tmp_path / "new", dirs_exist_ok=True, ignore=shutil.ignore_patterns(old.name))
    res = _student(cache, tmp_path / "r0", "--data-root", tmp_path / "new")
    assert_one_line_error(res, f"--data-root {tmp_path / 'new'} holds no {old.name} (the cache's {kind} file): "
                               f"give the file itself, --data {kind}:FILE")
    ok(_student(cache, tmp_path / "r1", "--data", f"{kind}:{renamed}"))


def test_another_dataset_at_the_new_place_is_refused_by_fingerprint(tmp_path, teacher_ckpt, fmnist):
    spec = write_source("npz", tmp_path / "old", fmnist)
    cache = tmp_path / "cache"
    ok(_dump(teacher_ckpt, spec, cache))
    (tmp_path / "new").mkdir()
    z = dict(np.load(tmp_path / "old" / "data.npz"))
    z["x_train"] = z["x_train"].copy()
    z["x_train"][3, 5, 5] ^= 1  # one pixel differs
    np.savez(tmp_path / "new" / "data.npz", **z)
    res = _student(cache, tmp_path / "r", "--data-root", tmp_path / "new")
    assert_one_line_error(res, "the dataset does not match cache", "fingerprint: cache has")
    res = run_cli(["verify-cache", cache, "--teacher", teacher_ckpt, "--data", f"npz:{tmp_path / 'new' / 'data.npz'}"])
    assert_one_line_error(res, "fingerprint: cache has", progress=True)  # after the checksum pass's progress


# ---------------------------------------------------------------- data checks

def _npz(path, x_train, y_train, x_test, y_test) -> str:
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return f"npz:{path}"


def _bad_npz(fm, path, case) -> str:
    x, y, xt, yt = fm.x_train[:N_TRAIN], fm.y_train[:N_TRAIN], fm.x_test[:N_TEST], fm.y_test[:N_TEST]
    if case == "labels 1..10":
        return _npz(path, x, y + 1, xt, yt + 1)
    if case == "a skipped class":
        return _npz(path, x, np.where(y == 4, 5, y), xt, np.where(yt == 4, 5, yt))
    if case == "train has fewer classes than test":
        keep = y != 9
        return _npz(path, x[keep], y[keep], xt, yt)
    if case == "test images of another shape":
        return _npz(path, x, y, np.zeros((N_TEST, 32, 32), np.uint8), yt)
    raise ValueError(case)


DATA_CHECKS = {
    "labels 1..10": "the labels start at 1, not 0",
    "a skipped class": "no train sample has class(es) 4 of 0..9",
    "train has fewer classes than test": "the train split has fewer classes (9) than the test split (10)",
    "test images of another shape": "the test samples are dense (1, 32, 32), the train samples dense (1, 28, 28)",
}


@pytest.mark.parametrize("case", list(DATA_CHECKS))
def test_data_checks_refuse_with_one_line(tmp_path, fmnist, teacher_ckpt, case):
    spec = _bad_npz(fmnist, tmp_path / "bad.npz", case)
    res = run_cli(["train-teacher", "--data", spec, "--arch", "mlp_100", "--epochs", 1, "--out", tmp_path / "t.pt"])
    assert_one_line_error(res, DATA_CHECKS[case])
    assert_one_line_error(_dump(teacher_ckpt, spec, tmp_path / "c"), DATA_CHECKS[case])
    assert not (tmp_path / "c").exists()


def test_files_with_names_the_test_split_lacks_in_train(tmp_path):
    root = tmp_path / "f"
    for folder, names in (("training", ["cat", "dog"]), ("evaluation", ["cat", "dog", "emu"])):
        for name in names:
            _png(np.zeros((8, 8), np.uint8), root / folder / f"{name}_0.png")
    res = run_cli(["train-teacher", "--data", f"files:{root}", "--arch", "mlp_100", "--epochs", 1,
                   "--out", tmp_path / "t.pt"])
    assert_one_line_error(res, "the train split has fewer classes (2) than the test split: no train sample of emu")


def test_a_test_split_cache_needs_allow_test_split(tmp_path, teacher_ckpt, fmnist):
    spec = write_source("npz", tmp_path / "d", fmnist)
    cache = tmp_path / "cache"
    ok(_dump(teacher_ckpt, spec, cache, "--split", "test"))
    res = _student(cache, tmp_path / "r")
    assert_one_line_error(res, "was dumped from the test split", "--allow-test-split")
    assert not (tmp_path / "r").exists()
    ok(_student(cache, tmp_path / "r", "--allow-test-split"))


def test_pipeline_dump_passes_yes(tmp_path):
    from kdpipe.pipeline import load_pipeline, make_rules
    text = (Path(__file__).resolve().parents[1] / "pipelines" / "default.toml").read_text()
    (tmp_path / "p.toml").write_text(text.replace("# yes = true", "yes = true"))
    dump = [line for line in make_rules(load_pipeline(tmp_path / "p.toml")).splitlines() if "dump-logits" in line]
    assert len(dump) == 1 and " --yes " in dump[0]
    (tmp_path / "q.toml").write_text(text)
    assert "--yes" not in make_rules(load_pipeline(tmp_path / "q.toml"))


def test_sixteen_bit_grey_images_are_scaled_not_clipped(tmp_path, fmnist):
    """A 16-bit grey PNG holds 0..65535: stored as v / 257, so Fashion-MNIST rows written at 16 bits
    (v * 257) come back as their 8-bit pixels. (Pillow's own conversion clips at 255: nearly every pixel
    of such an image would be stored white.)"""
    root = tmp_path / "fm16"
    x, y = fmnist.x_train[:N_TRAIN], fmnist.y_train[:N_TRAIN]
    for split, (xs, ys) in {"train": (x, y), "test": (fmnist.x_test[:N_TEST], fmnist.y_test[:N_TEST])}.items():
        for i, (img, label) in enumerate(zip(xs, ys)):
            _png(img.astype(np.uint16) * 257, root / split / f"c{label}" / f"{i:04d}.png")
    assert Image.open(next((root / "train").rglob("*.png"))).mode == "I;16"
    data = load_dataset(f"imagefolder:{root}", "train")
    order = np.argsort([f"c{label}/{i:04d}" for i, label in enumerate(y)], kind="stable")
    assert data.image_shape == (1, 28, 28)
    np.testing.assert_array_equal(np.asarray(data.images)[:, 0], x[order])


def test_sixteen_bit_images_of_twelve_bit_data_are_said_to_keep_few_levels(tmp_path, capsys):
    """A 12-bit sensor's images saved as 16-bit PNGs (values up to 4095, as microscopes and medical
    scanners write them) keep 16 grey levels at 8 bits: said in a note, not left to read as near-black
    images; full-range 16-bit images get no note."""
    rng = np.random.default_rng(0)
    for name, scale in (("d12", 1), ("d16", 16)):
        for split in ("train", "test"):
            for c in ("a", "b"):
                for i in range(2):
                    _png((rng.integers(0, 4096, (8, 8)) * scale).astype(np.uint16), tmp_path / name / split / c
                         / f"{i}.png")
        capsys.readouterr()
        data = load_dataset(f"imagefolder:{tmp_path / name}", "train")
        err = capsys.readouterr().err
        if scale == 1:
            assert int(np.asarray(data.images).max()) == 16
            assert "the 4 16-bit image(s) use values up to about 4112 of 65535" in err and "keep 17 grey levels" in err
        else:
            assert "16-bit" not in err


def test_float_or_32_bit_images_are_refused_with_one_line(tmp_path):
    root = tmp_path / "f"
    for i in range(2):
        for c in ("a", "b"):
            _png(np.zeros((8, 8), np.uint8), root / "train" / c / f"{i}.png")
            _png(np.zeros((8, 8), np.uint8), root / "test" / c / f"{i}.png")
    Image.fromarray(np.random.default_rng(0).random((8, 8), dtype=np.float32)).save(root / "train" / "a" / "x.tif")
    res = run_cli(["train-teacher", "--data", f"imagefolder:{root}", "--arch", "mlp_100", "--epochs", 1,
                   "--out", tmp_path / "t.pt"])
    assert_one_line_error(res, "x.tif has 32-bit float pixels (mode F)", "convert the images to 8 or 16 bits")


def test_other_image_formats_are_read_and_other_files_named(tmp_path, fmnist, capsys):
    """BMP, WebP, TIFF and GIF photos are read as JPEG and PNG are, and so are images in subfolders of
    a class folder (torchvision's ImageFolder reads these, GIF aside); a file that is no image (a
    README, a .heic kdpipe cannot decode) is skipped with a note naming its kind, not dropped without a
    word."""
    root = tmp_path / "mixed"
    exts = [".png", ".bmp", ".webp", ".tif", ".gif", ".JPG"]
    x, y = fmnist.x_train[:60], fmnist.y_train[:60]
    for split in ("train", "test"):
        for i, (img, label) in enumerate(zip(x, y)):
            path = root / split / f"c{label}" / f"{i:04d}{exts[i % len(exts)]}"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(path, **({"lossless": True} if path.suffix == ".webp" else
                                               {"quality": 100} if path.suffix == ".JPG" else {}))
    nested = root / "train" / f"c{y[2]}" / "more" / "deeper"  # read, as torchvision's ImageFolder reads it
    nested.mkdir(parents=True)
    shutil.move(root / "train" / f"c{y[2]}" / f"0002{exts[2]}", nested / f"0002{exts[2]}")
    (root / "train" / f"c{y[0]}" / "notes.txt").write_text("not an image")
    (root / "train" / f"c{y[1]}" / "IMG_1.heic").write_bytes(b"\0" * 16)
    (root / "train" / f"c{y[1]}" / ".DS_Store").write_bytes(b"\0" * 16)
    data = load_dataset(f"imagefolder:{root}", "train")
    assert len(data) == 60
    err = capsys.readouterr().err
    assert "skipped 2 item(s)" in err and ".heic, .txt" in err and ".DS_Store" not in err
    names = sorted(f"c{label}/{'more/deeper/' if i == 2 else ''}{i:04d}" for i, label in enumerate(y))
    by_name = {f"c{label}/{'more/deeper/' if i == 2 else ''}{i:04d}": (img, i % len(exts))
               for i, (img, label) in enumerate(zip(x, y))}
    assert data.labels.tolist() == [int(n.split("/")[0][1:]) for n in names]
    for row, name in enumerate(names):
        img, kind = by_name[name]
        stored = np.asarray(data.images)[row, 0].astype(int)
        if exts[kind] == ".JPG":  # lossy even at quality 100
            assert np.abs(stored - img).mean() < 2
        else:
            np.testing.assert_array_equal(stored, img, err_msg=f"{name}{exts[kind]}")
    capsys.readouterr()
    load_dataset(f"imagefolder:{root}", "test")
    assert "skipped" not in capsys.readouterr().err  # the train folder's note is not repeated for the test split
