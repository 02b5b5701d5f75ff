"""Writes the bad-input corpus: one file per class, JSONL and Parquet, each
holding the bad record `bad` beside a good record `good` (the job must go
on). tests/it/bad_input.rs holds the error each must produce.
Run: python3 make.py (needs pyarrow)."""
import json
import pyarrow as pa, pyarrow.parquet as pq

GOOD = {"id": "good", "prompt": "Say hello."}
LONG = "word " * 400
CLASSES = {
    "missing_prompt": {"id": "bad"},
    "null_prompt": {"id": "bad", "prompt": None},
    "wrong_type": {"id": "bad", "prompt": 42},
    "empty_prompt": {"id": "bad", "prompt": "   "},
    "too_long": {"id": "bad", "prompt": LONG},
    "param_out_of_range": {"id": "bad", "prompt": "Say hi.", "temperature": -1.0},
}
for name, bad in CLASSES.items():
    with open(f"{name}.jsonl", "w") as f:
        f.write(json.dumps(bad) + "\n" + json.dumps(GOOD) + "\n")
    rows = [bad, GOOD]
    cols = sorted({k for r in rows for k in r})
    arrays = {}
    for c in cols:
        vals = [r.get(c) for r in rows]
        if c == "prompt" and name == "wrong_type":
            vals = ["Say hi.", GOOD["prompt"]]  # Parquet: see the temperature column below
        arrays[c] = pa.array(vals)
    if name == "wrong_type":
        # A Parquet column has one type: the wrong type is a whole column
        # (here a per-record parameter), null for the good record.
        arrays["temperature"] = pa.array(["hot", None], type=pa.string())
    if name == "missing_prompt":
        # Parquet has no per-row "missing": the column exists, the cell is null.
        arrays["prompt"] = pa.array([None, GOOD["prompt"]], type=pa.string())
    pq.write_table(pa.table(arrays), f"{name}.parquet")
# JSONL-only classes.
with open("malformed_json.jsonl", "w") as f:
    f.write('{"id": "bad", "prompt": "unterminated\n' + json.dumps(GOOD) + "\n")
with open("invalid_utf8.jsonl", "wb") as f:
    f.write(b'{"id": "bad", "prompt": "caf\xe9"}\n' + json.dumps(GOOD).encode() + b"\n")
# Parquet: a binary prompt column whose bad cell is not UTF-8.
pq.write_table(pa.table({"id": ["bad", "good"], "prompt": pa.array([b"caf\xe9", b"Say hello."], type=pa.binary())}),
               "invalid_utf8.parquet")
# Job-level classes.
with open("duplicate_ids.jsonl", "w") as f:
    f.write(json.dumps({"id": "a", "prompt": "x"}) + "\n" + json.dumps({"id": "b", "prompt": "y"}) + "\n"
            + json.dumps({"id": "a", "prompt": "z"}) + "\n")
pq.write_table(pa.table({"id": ["a", "b", "a"], "prompt": ["x", "y", "z"]}), "duplicate_ids.parquet")
pq.write_table(pa.table({"id": ["a"], "text": ["x"]}), "unknown_column.parquet")
