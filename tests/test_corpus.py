"""Corpora in the formats people have (llmcli/text/corpus.py): Parquet, JSON lines, CSV and plain text, gzip- or
zstd-compressed, give the same documents; what is none of them, or damaged, is one line."""

import csv
import gzip
import json
import subprocess
import sys

import pytest
from conftest import ROOT, TINYSTORIES_VALID, run_cli

from llmcli.text.data import read_documents

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
zstandard = pytest.importorskip("zstandard")


@pytest.fixture(scope="module")
def stories() -> list[str]:
    text = TINYSTORIES_VALID.read_text(encoding="utf-8")
    return [s.strip() for s in text.split("<|endoftext|>") if s.strip()][:120]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory, stories) -> dict:
    """The same stories in every format taken."""
    d = tmp_path_factory.mktemp("corpora")
    records = "".join(json.dumps({"id": i, "text": s}) + "\n" for i, s in enumerate(stories))
    text = "".join(s + "\n<|endoftext|>\n" for s in stories)
    pq.write_table(pa.table({"id": list(range(len(stories))), "text": stories}), d / "s.parquet",
                   row_group_size=25)  # several row groups, read one after another
    (d / "s.jsonl").write_text(records)
    (d / "s.jsonl.gz").write_bytes(gzip.compress(records.encode()))
    (d / "s.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(text.encode()))
    (d / "s.parquet.gz").write_bytes(gzip.compress((d / "s.parquet").read_bytes()))
    with open(d / "s.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["title", "story"])
        writer.writerows([f"story {i}", s] for i, s in enumerate(stories))
    return {p.name: p for p in d.iterdir()}


def test_every_format_gives_the_same_documents(corpora, stories):
    for name in ("s.parquet", "s.jsonl", "s.jsonl.gz", "s.txt.zst", "s.parquet.gz"):
        assert list(read_documents([corpora[name]])) == stories, name
    assert list(read_documents([corpora["s.csv"]], text_field="story")) == stories


def test_pretrain_and_tokenize_train_read_parquet_and_csv(corpora, tmp_path):
    tok = run_cli("tokenize", "train", corpora["s.parquet"], "--vocab-size", "400", "-o", tmp_path / "tok")
    assert tok.returncode == 0, tok.stderr
    run = run_cli("pretrain", corpora["s.csv"], "--text-field", "story", "-t", tmp_path / "tok", "--preset", "nano",
                  "--max-steps", "2", "-o", tmp_path / "run")
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "run" / "model.safetensors").is_file()


def one_line_error(result, *fragments):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("llm: error:"), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_bad_corpora_are_one_line_each(corpora, tmp_path):
    whole = corpora["s.jsonl.gz"].read_bytes()
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[:len(whole) // 2])
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 40)
    pq.write_table(pa.table({"n": [1, 2]}), tmp_path / "numbers.parquet")
    cases = [
        ([tmp_path / "cut.jsonl.gz"], ["gzip stream is truncated"]),
        ([tmp_path / "blob.bin"], ["binary file", "Parquet", "JSON lines", "CSV", "zstd"]),
        ([corpora["s.parquet"], "--text-field", "content"], ["no column 'content'", "it has: id, text"]),
        ([tmp_path / "numbers.parquet", "--text-field", "n"], ["holds int64, not text"]),
        ([corpora["s.csv"]], ["no column 'text'", "it has: title, story"]),
    ]
    for args, fragments in cases:
        one_line_error(run_cli("tokenize", "train", *args, "-o", tmp_path / "tok"), *fragments)
    assert not (tmp_path / "tok").exists()


def test_a_compressed_corpus_is_read_in_flat_memory(tmp_path):
    """Ten times the text (10 MB, then 100 MB, each a gzip file of under 1 MB) costs no more memory: peak RSS of a
    process reading it through."""
    line = ("Once upon a time there was a cat who liked to read long books. " * 2)[:-1] + "\n"
    code = ("import resource, sys; from llmcli.text.data import document_pieces; "
            "n = sum(len(t) for t, _ in document_pieces([sys.argv[1]])); "
            "print(n, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)")
    peaks = []
    for megabytes in (10, 100):
        path = tmp_path / f"{megabytes}.txt.gz"
        with gzip.open(path, "wt", compresslevel=1) as f:
            for _ in range(megabytes * 2**20 // (len(line) * 1000)):
                f.write(line * 999 + "<|endoftext|>\n")
        out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                             env={"PYTHONPATH": str(ROOT), "OPENBLAS_NUM_THREADS": "1"}, timeout=300)
        assert out.returncode == 0, out.stderr
        chars, peak_mib = map(int, out.stdout.split())
        assert chars > 0.9 * megabytes * 2**20
        peaks.append(peak_mib)
    assert peaks[1] - peaks[0] < 16, peaks  # 90 MB more text read, not held
