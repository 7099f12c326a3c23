"""The readers against damaged and odd input: bad bytes, Unicode line separators, cut archives, mapped
columns that are not there, and a fuzz pass over readers and adapters."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stages.core.config.options import PrecomputeConfig
from stages.core.inputs.files import DataError, MalformedRow
from stages.core.inputs.formats import ADAPTERS, Columns, RowRejected, detect, normalise
from stages.core.inputs.readers import check_columns, read_rows
from stages.core.refs.plan import content_hash, pair_id

CFG = Columns()
ROWS = [{"prompt": f"Q{i}?", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(5)]


def _rows(path, **kw):
    return [r for _, r in read_rows(str(path), **kw)]


def _line(row) -> bytes:
    return json.dumps(row, ensure_ascii=False).encode()


# -- 1. one bad byte ------------------------------------------------------------------------------

def test_a_bad_byte_rejects_its_line_only(tmp_path):
    bad = b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}'  # latin-1, not UTF-8
    (tmp_path / "a.jsonl").write_bytes(b"\n".join([_line(ROWS[0]), bad, _line(ROWS[1])]) + b"\n")
    (tmp_path / "b.jsonl").write_bytes(_line(ROWS[2]) + b"\n")
    got = _rows(tmp_path)
    assert got[0] == ROWS[0] and got[2:] == [ROWS[1], ROWS[2]]
    m = got[1]
    assert isinstance(m, MalformedRow) and m.reason == "bad_encoding"
    assert m.file.endswith("a.jsonl") and m.line == 2 and "UTF-8" in m.error
    assert m.text == bad.decode("utf-8", "replace")
    content_hash(m)  # the precompute's row key still works on it


def test_malformed_row_reason_defaults_to_malformed_json(tmp_path):
    (tmp_path / "x.jsonl").write_text("{nope\n")
    (m,) = _rows(tmp_path / "x.jsonl")
    assert m.reason == "malformed_json" and m.line == 1


def test_bom_and_crlf(tmp_path):
    body = b"\r\n".join([_line(ROWS[0]), b"{broken", _line(ROWS[1])]) + b"\r\n"
    (tmp_path / "x.jsonl").write_bytes(b"\xef\xbb\xbf" + body)
    got = _rows(tmp_path / "x.jsonl")
    assert got[0] == ROWS[0] and got[2] == ROWS[1]
    assert isinstance(got[1], MalformedRow) and got[1].text == "{broken" and got[1].line == 2


# -- 2. lines end at "\n" only --------------------------------------------------------------------

def test_unicode_line_separators_stay_inside_strings(tmp_path):
    rows = [{"prompt": "a\u2028b", "chosen": "c", "rejected": "d"},
            {"prompt": "e", "chosen": "f\u2029g", "rejected": "h"},
            {"prompt": "i", "chosen": "j", "rejected": "k\x85l\x1c\x1d\x1e\x0b\x0cm"}]
    (tmp_path / "u.jsonl").write_bytes(b"\n".join(_line(r) for r in rows) + b"\n")
    assert [i for i, _ in read_rows(str(tmp_path / "u.jsonl"))] == [0, 1, 2]
    assert _rows(tmp_path / "u.jsonl") == rows


# -- 3. cut archives, .json and .csv --------------------------------------------------------------

def _gz_rows(n: int) -> list[dict]:
    # Incompressible content, so a cut in the middle of the archive lands in the middle of the rows.
    return [{"prompt": hashlib.sha256(f"p{i}".encode()).hexdigest(), "chosen": f"c{i}", "rejected": f"r{i}"}
            for i in range(n)]


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.999, 15 / 20000])
def test_cut_gzip_keeps_the_complete_rows_and_names_the_break(tmp_path, keep):
    rows = _gz_rows(300)
    data = gzip.compress(b"".join(_line(r) + b"\n" for r in rows))
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(data[: max(11, int(len(data) * keep))])
    got = _rows(path)
    *complete, tail = got
    assert complete == rows[: len(complete)]
    assert isinstance(tail, MalformedRow) and tail.reason == "truncated_file"
    assert tail.file == str(path) and tail.line == len(complete) + 1 and "ends" in tail.error
    content_hash(tail)


def test_gzip_streams(tmp_path):
    """A big archive is read a block at a time: memory stays far below the file's decompressed size."""
    import tracemalloc

    row = _line({"prompt": "p" * 200, "chosen": "c" * 150, "rejected": "r" * 150}) + b"\n"
    path = tmp_path / "big.jsonl.gz"
    path.write_bytes(gzip.compress(row * 20_000, compresslevel=1))  # 10 MB decompressed
    tracemalloc.start()
    try:
        assert sum(1 for _ in read_rows(str(path))) == 20_000
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8_000_000, peak  # reading it whole took 23 MB


def test_json_array_with_a_bad_byte_or_bad_json_names_the_file(tmp_path):
    (tmp_path / "b.json").write_bytes(b'[{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}]')
    with pytest.raises(DataError, match=r"b\.json.*UTF-8") as e:
        _rows(tmp_path / "b.json")
    assert "\n" not in str(e.value)
    (tmp_path / "s.json").write_text('[{"prompt": "q", "chosen": "\\udc80", "rejected": "r"}]')
    with pytest.raises(DataError, match=r"s\.json.*lone surrogate \\udc80"):
        _rows(tmp_path / "s.json")
    (tmp_path / "c.json").write_text('[{"prompt": "q"},')
    with pytest.raises(DataError, match=r"c\.json.*not valid JSON"):
        _rows(tmp_path / "c.json")
    full = gzip.compress(json.dumps(_gz_rows(300)).encode())
    (tmp_path / "d.json.gz").write_bytes(full[: len(full) // 2])
    with pytest.raises(DataError, match=r"d\.json\.gz.*ends"):
        _rows(tmp_path / "d.json.gz")


def test_csv_bad_byte_rejects_its_row(tmp_path):
    data = (b'\xef\xbb\xbf"prompt",chosen,rejected\nQ0?,good 0,bad 0\n"caf\xe9\nmulti",x,y\nQ1?,good 1,bad 1\n'
            b'"two\nlines",a,b\n\xff,a,b\n')
    (tmp_path / "d.csv").write_bytes(data)
    got = _rows(tmp_path / "d.csv")
    assert got[0] == ROWS[0] and got[2] == ROWS[1]  # the BOM is not part of the first column's name
    m = got[1]
    assert isinstance(m, MalformedRow) and m.reason == "bad_encoding" and m.line == 3 and m.file.endswith("d.csv")
    assert "caf\ufffd" in m.text
    assert got[3] == {"prompt": "two\nlines", "chosen": "a", "rejected": "b"} and got[4].line == 8  # records
    content_hash(m)                                                                                  # span lines


def test_csv_row_with_extra_fields_is_malformed(tmp_path):
    (tmp_path / "e.csv").write_text("prompt,chosen,rejected\nQ0?,good 0,bad 0,extra\nQ1?,good 1,bad 1\n")
    m, row = _rows(tmp_path / "e.csv")
    assert isinstance(m, MalformedRow) and m.reason == "malformed_csv" and m.line == 2
    assert row == ROWS[1]
    content_hash(m)


def test_deep_nesting_and_lone_surrogates_are_malformed_lines(tmp_path):
    lines = [b"[" * 100_000 + b"]" * 100_000, b'{"prompt": "q", "chosen": "\\ud800", "rejected": "r"}',
             b'{"prompt": "q", "chosen": "\\ud83d\\ude00", "rejected": "r"}']
    (tmp_path / "x.jsonl").write_bytes(b"\n".join(lines))
    deep, lone, pair = _rows(tmp_path / "x.jsonl")
    assert isinstance(deep, MalformedRow) and deep.reason == "malformed_json" and len(deep.text) <= 2000
    assert isinstance(lone, MalformedRow) and lone.reason == "bad_encoding" and lone.line == 2
    assert pair["chosen"] == "\U0001F600"
    for raw in (deep, lone, pair):
        content_hash(raw)


# -- 4. a mapped column that is not there ---------------------------------------------------------

def test_mapped_prompt_column_must_exist():
    cfg = Columns(prompt="question")
    with pytest.raises(DataError, match=r"'question'.*the input has: 'prompt', 'chosen', 'rejected'"):
        check_columns(ROWS[0], "standard", cfg)
    check_columns({"question": "q", "chosen": "a", "rejected": "b"}, "standard", cfg)
    check_columns({"chosen": "a", "rejected": "b"}, "standard", CFG)  # the default prompt stays optional


# -- formats: values the chat template would choke on ---------------------------------------------

@pytest.mark.parametrize("layout,row", [
    ("standard", {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
                  "rejected": [{"role": "assistant", "content": "b"}], "tools": 5}),
    ("standard", {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
                  "rejected": [{"role": "assistant", "content": "b"}], "tools": "not json"}),
    ("standard", {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
                  "rejected": [{"role": "assistant", "content": "b"}], "chat_template_kwargs": [1]}),
    ("standard", {"prompt": [{"role": 5, "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
                  "rejected": [{"role": "assistant", "content": "b"}]}),
    ("standard", {"prompt": [{"role": "user", "content": [1, 2]}], "chosen": [{"role": "assistant", "content": "a"}],
                  "rejected": [{"role": "assistant", "content": "b"}]}),
    ("helpsteer3", {"context": "q", "response1": "a", "response2": "b", "overall_preference": math.nan}),
    ("helpsteer3", {"context": "q", "response1": "a", "response2": 7, "overall_preference": 1}),
])
def test_values_a_template_cannot_render_are_bad_type(layout, row):
    with pytest.raises(RowRejected) as e:
        normalise(row, layout, Columns())
    assert e.value.reason == "bad_type"


# -- 5. fuzz --------------------------------------------------------------------------------------

ODD = ["\u2028", "\u2029", "\x85", "\U0001F600", "\x00", "\r", "\n", " ", "", "\ufeff",
       "\n\nHuman: hi\n\nAssistant: there", "\n\nHuman: hi\n\nAssistant: other"]
TEXT = st.one_of(st.text(max_size=12), st.sampled_from(ODD),
                 st.integers(5_000, 150_000).map(lambda n: "\u2028x" * (n // 2)))
SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), TEXT)
ROLE = st.one_of(st.sampled_from(["user", "assistant", "system", "tool", "human", "gpt", "function_call"]), SCALAR)
MESSAGE = st.fixed_dictionaries({}, optional={"role": ROLE, "content": st.one_of(SCALAR, st.lists(SCALAR, max_size=2)),
                                              "from": ROLE, "value": SCALAR})
MESSAGES = st.lists(st.one_of(MESSAGE, SCALAR), max_size=4)
VALUE = st.recursive(st.one_of(SCALAR, MESSAGES), lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(TEXT, inner, max_size=3)), max_leaves=8)
FIELD = st.one_of(TEXT, MESSAGES, MESSAGE, VALUE)
KEYS = ["prompt", "chosen", "rejected", "question", "conversations", "system", "preferred_output",
        "non_preferred_output", "context", "response1", "response2", "overall_preference", "tools",
        "chat_template_kwargs"]
ROW = st.one_of(
    st.fixed_dictionaries({}, optional={k: FIELD for k in KEYS} | {
        "input": st.one_of(FIELD, st.fixed_dictionaries({"messages": FIELD}, optional={"tools": FIELD}))}),
    VALUE)
JUNK = st.one_of(st.binary(max_size=40), st.sampled_from(
    [b"\xef\xbb\xbf{}", b"\xff", b"{\"a\": \"\\udc80\"}", b"[\"\\ud800\"]", b"NaN", b"[" * 5000, b"\x85", b"\r"]))
LINE = st.one_of(
    st.tuples(ROW, st.booleans()).map(lambda t: json.dumps(t[0], ensure_ascii=t[1]).encode("utf-8", "surrogatepass")),
    JUNK).map(lambda b: b.replace(b"\n", b" "))
LAYOUTS = sorted(ADAPTERS)
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                          HealthCheck.function_scoped_fixture,
                                                                          HealthCheck.large_base_example,
                                                                          HealthCheck.data_too_large])


def _through_adapters(raw) -> None:
    """Every layout either gives a row the precompute can key, hash and store, or a RowRejected."""
    content_hash(raw)
    if not isinstance(raw, MalformedRow):
        detect(raw)  # the precompute detects the layout from the first row that is not malformed
    for layout in LAYOUTS:
        cfg = Columns.of(PrecomputeConfig(format=layout))
        try:
            check_columns(raw, layout, cfg)
        except DataError:
            pass
        try:
            row = normalise(raw, layout, cfg)
        except RowRejected as e:
            assert isinstance(e.reason, str) and e.reason
            continue
        pair_id(row)
        json.dumps(row, ensure_ascii=False).encode("utf-8")


def _check_jsonl(path, lines: list[bytes]) -> list:
    got = list(read_rows(str(path)))
    assert [i for i, _ in got] == list(range(len(got)))
    numbered = [(n, line) for n, line in enumerate(lines, start=1) if line.strip()]
    assert len(got) == len(numbered)  # one row per non-blank line, blank lines skipped
    for (_, raw), (n, line) in zip(got, numbered):
        if isinstance(raw, MalformedRow):
            assert raw.line == n and raw.file == str(path) and len(raw.text) <= 2000
            assert raw.reason in ("malformed_json", "bad_encoding")
        else:
            assert json.dumps(raw) == json.dumps(json.loads(line.decode()))
        _through_adapters(raw)
    return got


@FUZZ
@given(lines=st.lists(st.one_of(LINE, st.sampled_from([b"", b"  ", b"\t"])), max_size=8),
       bom=st.booleans(), crlf=st.booleans(), compress=st.booleans())
def test_fuzz_jsonl(tmp_path, lines, bom, crlf, compress):
    lines = [b"\xef\xbb\xbf" + lines[0]] + lines[1:] if bom and lines else lines
    data = b"".join(line + (b"\r\n" if crlf else b"\n") for line in lines)
    path = tmp_path / ("f.jsonl.gz" if compress else "f.jsonl")
    path.write_bytes(gzip.compress(data) if compress else data)
    if lines and lines[0].startswith(b"\xef\xbb\xbf"):  # one BOM at the start of the file is not content
        lines[0] = lines[0][3:]
    _check_jsonl(path, lines)


@FUZZ
@given(rows=st.lists(ROW, max_size=6), cut=st.floats(0.0, 1.0))
def test_fuzz_cut_gzip(tmp_path, rows, cut):
    data = gzip.compress(b"".join(_line(r) + b"\n" for r in rows))
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(data[: int(len(data) * cut)])
    got = [r for _, r in read_rows(str(path))]
    broken = [r for r in got if isinstance(r, MalformedRow)]
    assert len(broken) <= 1 and (not broken or got[-1] is broken[0])
    assert [json.dumps(r) for r in got[: len(got) - len(broken)]] == [json.dumps(r) for r in rows[: len(got)
                                                                                               - len(broken)]]
    if cut < 1.0 and data[: int(len(data) * cut)]:
        assert broken, "a cut archive must not read as complete"
    for raw in got:
        _through_adapters(raw)


@FUZZ
@given(rows=st.lists(VALUE, max_size=6))
def test_fuzz_json_array(tmp_path, rows):
    path = tmp_path / "a.json"
    path.write_text(json.dumps(rows))
    got = list(read_rows(str(path)))
    assert [i for i, _ in got] == list(range(len(rows)))
    assert json.dumps([r for _, r in got]) == json.dumps(rows)
    for _, raw in got:
        _through_adapters(raw)


FLAT = st.one_of(st.none(), TEXT)


@FUZZ
@given(rows=st.lists(st.fixed_dictionaries({"prompt": FLAT, "chosen": FLAT, "rejected": FLAT}), min_size=1,
                     max_size=5),
       junk=st.lists(st.binary(max_size=20), max_size=2))
def test_fuzz_parquet_and_csv(tmp_path, rows, junk):
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    assert _rows(tmp_path / "p.parquet") == rows
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    writer.writerow(["prompt", "chosen", "rejected"])
    writer.writerows([[r[k] for k in ("prompt", "chosen", "rejected")] for r in rows])
    (tmp_path / "c.csv").write_bytes(buf.getvalue().encode() + b"\n".join(junk))
    try:
        got = _rows(tmp_path / "c.csv")
    except DataError as e:
        assert "c.csv" in str(e)
        return
    assert got[: len(rows)] == [{k: v or "" for k, v in r.items()} for r in rows]  # csv has no null
    for raw in got:
        _through_adapters(raw)


WORDS = st.text("ab ", min_size=1, max_size=6)
# Mostly well-formed messages, so that a fair share of rows gets through normalise to the template.
# Content None (tool calls) and lists of parts (images) are left out: whether those render depends
# on the model's template, which normalise cannot know.
CHAT = st.lists(st.fixed_dictionaries(
    {"role": st.one_of(st.sampled_from(["user", "assistant", "system"]), ROLE),
     "content": st.one_of(WORDS, WORDS, SCALAR.filter(lambda v: v is not None))},
    optional={"tool_calls": VALUE}), min_size=1, max_size=3)
CHAT_ROW = st.fixed_dictionaries({"chosen": st.one_of(CHAT, WORDS), "rejected": st.one_of(CHAT, WORDS)}, optional={
    "prompt": st.one_of(CHAT, WORDS), "tools": st.one_of(VALUE, st.lists(st.dictionaries(TEXT, SCALAR), max_size=2)),
    "chat_template_kwargs": st.one_of(VALUE, st.dictionaries(st.sampled_from(["tools", "add_generation_prompt", "x"]),
                                                             SCALAR))})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=CHAT_ROW)
def test_fuzz_what_normalise_accepts_the_chat_template_renders(tokenizer, raw):
    """A row normalise lets through is tokenized inside a Ray task, where an exception stops the run."""
    from stages.core.inputs.tokenization import tokenize_row

    try:
        row = normalise(raw, "standard", CFG)
    except RowRejected:
        return
    try:
        tokenize_row(tokenizer, json.loads(json.dumps(row)))  # as the precompute hands it over: JSON
    except RowRejected:
        pass
